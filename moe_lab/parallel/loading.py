"""Loading a checkpoint under expert parallelism with only this rank's experts in memory.

The model is built on the meta device, patched and sharded (each experts tensor becomes
[E/ep_size, ...]), materialised empty, then filled from the checkpoint's safetensors files: expert
tensors are read as slices of their first dimension, everything else whole. Non-persistent buffers
(rotary tables) are rebuilt from the config. This module knows checkpoints, not moe_lab's layers:
the caller hands in the function that patches and shards the model on the meta device.

Checkpoint layouts read here (what v5's `save_pretrained` writes, and the hub's originals):
- the model's own keys (fused 3D experts, e.g. GPT-OSS);
- one tensor per expert, `experts.<e>.{gate_proj,up_proj,down_proj}.weight` (Qwen-MoE, DeepSeek-V3,
  OLMoE, ...), fused here into v5's `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`;
- Mixtral's `block_sparse_moe.` prefix with `experts.<e>.{w1,w3,w2}.weight` (gate, up, down).
Only a local directory of safetensors files and the keyword arguments `dtype` and
`attn_implementation` take this path; anything else (other layouts, quantisation, device maps, hub
ids) loads through v5 in full, then shards: correct, only not frugal. `load_local_experts` returns
None to say so.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

_SUPPORTED_KWARGS = {"dtype", "attn_implementation"}


def _checkpoint_files(path: Path) -> dict[str, Path] | None:
    """{tensor name: safetensors file} of a local checkpoint directory, or None."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    return None


_QUANTIZED_SUFFIXES = ("_scale_inv", "_scale", "_blocks", "_scales")
_PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class _CheckpointReader:
    """Reads the model's tensors (or slices of them) from safetensors files in the layouts above."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles = {}

    def _get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files[key]
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="pt")
        if rows is None:
            return self.handles[file].get_tensor(key)
        return self.handles[file].get_slice(key)[rows]

    def _aliases(self, name: str) -> list[str]:
        return [name, name.replace(".mlp.", ".block_sparse_moe.")]

    def _per_expert(self, name: str):
        """(prefix, (gate, up, down) names) if `name` is a fused experts tensor stored per expert."""
        for suffix in ("experts.gate_up_proj", "experts.down_proj"):
            if name.endswith(suffix):
                for base in self._aliases(name[: -len(suffix)] + "experts."):
                    for names in _PER_EXPERT_NAMES:
                        if f"{base}0.{names[0]}.weight" in self.files:
                            return base, names
        return None

    def can_read(self, name: str) -> bool:
        return any(a in self.files for a in self._aliases(name)) or self._per_expert(name) is not None

    def read(self, name: str, shard) -> torch.Tensor:
        """The tensor `name`; for an expert shard (lo, hi, E) only experts lo..hi-1."""
        rows = None if shard is None else slice(shard[0], shard[1])
        for alias in self._aliases(name):
            if alias in self.files:
                return self._get(alias, rows)
        base, (gate, up, down) = self._per_expert(name)
        experts = range(shard[0], shard[1]) if shard is not None else range(self._count(base, gate))
        if name.endswith("gate_up_proj"):
            return torch.stack([torch.cat([self._get(f"{base}{e}.{gate}.weight"), self._get(f"{base}{e}.{up}.weight")])
                                for e in experts])
        return torch.stack([self._get(f"{base}{e}.{down}.weight") for e in experts])

    def _count(self, base: str, gate: str) -> int:
        count = 0
        while f"{base}{count}.{gate}.weight" in self.files:
            count += 1
        return count


def _rebuild_non_persistent_buffers(model: nn.Module, device) -> bool:
    """Recompute buffers that checkpoints do not hold (rotary tables) by rebuilding their modules."""
    for name, module in list(model.named_modules()):
        if not getattr(module, "_non_persistent_buffers_set", None):
            continue
        if list(module.parameters(recurse=False)):
            logger.info("ep loading: %s holds parameters and non-persistent buffers; cannot rebuild it", name)
            return False
        params = list(inspect.signature(type(module).__init__).parameters)
        config = getattr(module, "config", None)
        if len(params) < 2 or params[1] != "config" or config is None:
            logger.info("ep loading: cannot rebuild the buffers of %s (%s)", name, type(module).__name__)
            return False
        with torch.device(device):
            fresh = type(module)(config)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
    return True


def load_local_experts(path, shard, device="cpu", **kwargs):
    """The expert-sharded model with only this rank's experts read, or None (see module doc).

    `shard(model)` makes the v5 model built here on the meta device expert-parallel (moe_lab's
    layers, each experts tensor cut to this rank's shard) and returns it; `hf.py` passes
    `_patch_moe_blocks(model, choice, ep_size=N)`. What comes after loading (FSDP2, the whole-step
    options) is the caller's."""
    import transformers

    path = Path(path)
    if set(kwargs) - _SUPPORTED_KWARGS or not path.is_dir():
        return None
    files = _checkpoint_files(path)
    if files is None:
        return None
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) or any(k.endswith(_QUANTIZED_SUFFIXES) for k in files):
        logger.info("ep loading: %s is quantised; v5 loads it", path)
        return None
    dtype = kwargs.get("dtype")
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=kwargs.get("attn_implementation"))
    model = shard(model)  # on meta: shapes only, nothing allocated
    reader = _CheckpointReader(files)
    unreadable = [k for k in model.state_dict() if not reader.can_read(k) and not _is_tied(model, k)]
    if unreadable:
        logger.info("ep loading: the checkpoint has no tensor for %s; loading in full", unreadable[:3])
        return None
    shards = {name: p.moe_lab_expert_shard for name, p in model.named_parameters() if hasattr(p, "moe_lab_expert_shard")}
    model.to_empty(device=device)  # new tensors: the shard marks go on them again
    for name, param in model.named_parameters():
        if name in shards:
            param.moe_lab_expert_shard = shards[name]
    if not _rebuild_non_persistent_buffers(model, device):
        return None
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not reader.can_read(name):
                continue  # tied to another tensor: tie_weights() below
            data = reader.read(name, getattr(tensor, "moe_lab_expert_shard", None))
            if data.is_floating_point() != tensor.is_floating_point() or (data.is_floating_point() and data.element_size() < 2):
                raise ValueError(f"{path}: {name} is stored as {data.dtype}; moe_lab's expert-parallel loader reads "
                                 "unquantised checkpoints only")
            if tuple(data.shape) != tuple(tensor.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(data.shape)}, the model expects {tuple(tensor.shape)}")
            tensor.copy_(data)
    model.tie_weights()
    model.eval()
    model.moe_lab_loaded_local_experts = True
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
