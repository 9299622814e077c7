"""Routing traces: record what every MoE router chose, per layer and step, and save it for NumPy/JAX.

    from moe_lab.analysis.trace import trace_routing, load_trace

    with trace_routing(model, logits=True, auto_step=False) as tracer:
        for batch in batches:
            model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
            tracer.next_step()
    tracer.save("results/traces/run.safetensors")
    trace = load_trace("results/traces/run.safetensors")    # NumPy only: no torch needed
    trace.ids(layer=0, step=3)                               # [T, k] expert ids

What is recorded, per (MoE layer, step), as NumPy arrays on the CPU:
    ids      [T, k]  int16 (int32 when E > 32767): the chosen experts, in the router's slot order
    weights  [T, k]  float32: their routing weights (as the router returned them: renormalised/scaled)
    counts   [E]     int64: routed (token, slot) pairs per expert
    logits   [T, E]  float32 (or float16), only with logits=True: the raw router logits
T is every token the layer saw in that step (micro-batches of one step are concatenated in call
order; under gather="rank0" the ranks' tokens are concatenated in rank order). Per step the tracer
also keeps the input batch shapes ([B, L] per forward) and, when the forward got a 2D
attention_mask of that shape, a token mask [T] (1 = real token).

How: a forward hook on every router module. v5 routers (and moe_lab's, which subclass them) return
(logits [T, E], weights [T, k], ids [T, k]); they are found through the model's
`_can_record_outputs["router_logits"]` target class, else as modules named `*.gate` / `*.router`
whose output is that 3-tuple. Hooks exist only inside the `with` block (zero cost outside it); a
step's tensors stay on their device until the step ends and then move to the CPU at once (one
synchronisation per step). Forward passes recomputed during backward (activation checkpointing)
are not recorded twice.

File format ("moe_lab.trace/1"): a safetensors file (or .npz) of arrays named
`l{layer:03d}.s{step:06d}.{ids,weights,counts,logits}` and `s{step:06d}.token_mask`, with JSON
metadata under the key "moe_lab_trace" (model, model_type, backend, dtype, device, logits_dtype,
num_experts, top_k, layer_names, layer_numbers, router_score, steps, batch_shapes, rank, world_size,
gather, tokens_per_rank). `safetensors.numpy.load_file` plus `json.loads` read it anywhere.

Expert parallelism: `rank` / `world_size` (default: torch.distributed's, else 0 / 1) and
gather="rank0" (all ranks call save(); rank 0 gathers with all_gather_object-style collectives and
writes one file) or gather="per_rank" (each rank writes `<stem>.rank{r:05d}-of-{w:05d}<suffix>`;
`load_trace(path)` finds and merges them when `path` itself does not exist).

This module imports torch lazily (only the recorder needs it), so reading traces works without it.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "moe_lab.trace/1"
META_KEY = "moe_lab_trace"
_KEY = re.compile(r"^l(\d+)\.s(\d+)\.(ids|weights|counts|logits)$")
_MASK_KEY = re.compile(r"^s(\d+)\.token_mask$")
_LAYER_NUMBER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
FIELDS = ("ids", "weights", "counts", "logits")


# ---- the trace: plain NumPy data + metadata ------------------------------------------------------
@dataclass
class RoutingTrace:
    """Recorded routing of one run. `records[(layer, step)]` maps field -> np.ndarray (see module doc);
    `layer` is the position in `meta["layer_names"]`; `token_masks[step]` is [T] uint8 where known."""

    meta: dict
    records: dict = field(default_factory=dict)
    token_masks: dict = field(default_factory=dict)

    # -- shape of the trace
    @property
    def layer_names(self) -> list[str]:
        return list(self.meta.get("layer_names", []))

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def steps(self) -> list[int]:
        return sorted({s for _, s in self.records})

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def has_logits(self) -> bool:
        return any("logits" in r for r in self.records.values())

    def __repr__(self) -> str:
        m = self.meta
        return (f"RoutingTrace(model={m.get('model')!r}, backend={m.get('backend')!r}, layers={self.num_layers}, "
                f"steps={len(self.steps)}, E={m.get('num_experts')}, k={m.get('top_k')}, logits={self.has_logits}, "
                f"rank={m.get('rank')}/{m.get('world_size')})")

    # -- access
    def _layer(self, layer) -> int:
        if isinstance(layer, str):
            return self.layer_names.index(layer)
        return int(layer) % max(self.num_layers, 1) if layer < 0 else int(layer)

    def record(self, layer, step: int) -> dict:
        """{field: array} of one layer (index or module name) at one step."""
        key = (self._layer(layer), int(step))
        if key not in self.records:
            raise KeyError(f"no record for layer {layer!r} at step {step}; steps are {self.steps}")
        return self.records[key]

    def ids(self, layer, step: int) -> np.ndarray:
        """[T, k] expert ids."""
        return self.record(layer, step)["ids"]

    def weights(self, layer, step: int) -> np.ndarray:
        """[T, k] routing weights (float32)."""
        return self.record(layer, step)["weights"]

    def counts(self, layer, step: int) -> np.ndarray:
        """[E] routed pairs per expert."""
        return self.record(layer, step)["counts"]

    def logits(self, layer, step: int) -> np.ndarray:
        """[T, E] router logits; only in traces recorded with logits=True."""
        rec = self.record(layer, step)
        if "logits" not in rec:
            raise KeyError("this trace has no router logits (record with trace_routing(..., logits=True))")
        return rec["logits"]

    def token_mask(self, step: int) -> np.ndarray | None:
        """[T] uint8 (1 = real token) of one step, or None where no attention mask was seen."""
        return self.token_masks.get(int(step))

    def counts_matrix(self) -> np.ndarray:
        """[S, L, E] int64 counts over all steps and layers (zeros where a layer was not recorded)."""
        steps = self.steps
        out = np.zeros((len(steps), self.num_layers, self.num_experts), dtype=np.int64)
        for (layer, step), rec in self.records.items():
            out[steps.index(step), layer] = rec["counts"]
        return out

    # -- files
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The flat {name: array} dict written to disk."""
        arrays = {}
        for (layer, step), rec in sorted(self.records.items()):
            for name, value in rec.items():
                arrays[f"l{layer:03d}.s{step:06d}.{name}"] = np.ascontiguousarray(value)
        for step, mask in sorted(self.token_masks.items()):
            arrays[f"s{step:06d}.token_mask"] = np.ascontiguousarray(mask)
        return arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors (default) or .npz (by suffix); returns the path."""
        path = Path(path)
        arrays = self.to_arrays()
        meta = json.dumps(self.meta, sort_keys=True)
        if path.suffix == ".npz":
            buf = io.BytesIO()
            np.savez(buf, **arrays, **{f"__{META_KEY}__": np.array(meta)})
            data = buf.getvalue()
        else:
            from safetensors.numpy import save

            flat = {"format": FORMAT, META_KEY: meta, "model": str(self.meta.get("model")),
                    "dtype": str(self.meta.get("dtype"))}
            data = save(arrays, metadata=flat)
        _write_atomic(path, data)
        log.info("moe_lab.analysis.trace: wrote %s (%d layers x %d steps, %.1f MiB)", path, self.num_layers,
                 len(self.steps), len(data) / 2**20)
        return path


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _from_arrays(arrays: dict, meta: dict) -> RoutingTrace:
    trace = RoutingTrace(meta)
    for name, value in arrays.items():
        m = _KEY.match(name)
        if m:
            trace.records.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = value
            continue
        m = _MASK_KEY.match(name)
        if m:
            trace.token_masks[int(m.group(1))] = value
    return trace


def rank_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The per-rank file of `path`: runs/t.safetensors -> runs/t.rank00001-of-00004.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank:05d}-of-{world_size:05d}{path.suffix}")


def _read_one(path: Path) -> RoutingTrace:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop(f"__{META_KEY}__")))
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        if META_KEY not in header:
            raise ValueError(f"{path} is a safetensors file but not a moe_lab routing trace (no {META_KEY!r} metadata)")
        meta = json.loads(header[META_KEY])
    if not str(meta.get("format", FORMAT)).startswith("moe_lab.trace/"):
        raise ValueError(f"{path}: unknown trace format {meta.get('format')!r}")
    return _from_arrays(arrays, meta)


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a trace written by `RoutingTrace.save` (NumPy only). If `path` does not exist but
    per-rank files of it do (gather="per_rank"), they are read and merged in rank order."""
    path = Path(path)
    if path.exists():
        return _read_one(path)
    pattern = str(path.with_name(f"{glob.escape(path.stem)}.rank*-of-*{path.suffix}"))
    parts = sorted(glob.glob(pattern))
    if not parts:
        raise FileNotFoundError(f"no routing trace at {path} (nor per-rank files {pattern})")
    return merge_rank_traces([_read_one(Path(p)) for p in parts])


def merge_rank_traces(traces: list[RoutingTrace]) -> RoutingTrace:
    """Merge the traces of all ranks (any order) into one: per (layer, step) tokens are concatenated
    in rank order and counts summed; meta gets world_size, gather="merged" and tokens_per_rank
    {"layer.step": [tokens of rank 0, 1, ...]}."""
    traces = sorted(traces, key=lambda t: int(t.meta.get("rank", 0)))
    if not traces:
        raise ValueError("merge_rank_traces needs at least one trace")
    first = traces[0].meta
    for t in traces[1:]:
        for key in ("num_experts", "top_k", "layer_names"):
            if t.meta.get(key) != first.get(key):
                raise ValueError(f"cannot merge rank traces: {key} differs ({t.meta.get(key)!r} vs {first.get(key)!r})")
    meta = dict(first, rank=0, world_size=len(traces), gather="merged",
                steps=sorted({s for t in traces for s in t.steps}), tokens_per_rank={})
    merged = RoutingTrace(meta)
    for key in sorted({k for t in traces for k in t.records}):
        parts = [t.records.get(key) for t in traces]
        present = [p for p in parts if p is not None]
        rec = {"counts": np.sum([p["counts"] for p in present], axis=0)}
        for name in ("ids", "weights", "logits"):
            if all(name in p for p in present):
                rec[name] = np.concatenate([p[name] for p in present])
        merged.records[key] = rec
        meta["tokens_per_rank"][f"{key[0]}.{key[1]}"] = [0 if p is None else int(p["ids"].shape[0]) for p in parts]
    for step in sorted({s for t in traces for s in t.token_masks}):
        if all(step in t.token_masks for t in traces):
            merged.token_masks[step] = np.concatenate([t.token_masks[step] for t in traces])
    return merged


# ---- the recorder ---------------------------------------------------------------------------------
def find_routers(model) -> list[tuple[str, object]]:
    """[(qualified name, module)] of the model's router modules, in module order.

    The model's `_can_record_outputs["router_logits"]` target class where v5 declares one (this
    also finds moe_lab's routers, which subclass v5's), else modules named `*.gate` / `*.router`
    that have a 2D `weight` (their output is checked to be a 3-tuple when they run).
    """
    target = None
    for holder in (model, getattr(model, "model", None)):
        recorders = getattr(holder, "_can_record_outputs", None) or {}
        spec = recorders.get("router_logits") if isinstance(recorders, dict) else None
        cls = getattr(spec, "target_class", spec)
        if isinstance(cls, type):
            target = cls
            break
    if target is not None:
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, target)]
        if found:
            return found
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in ("gate", "router") and getattr(weight, "dim", lambda: 0)() == 2:
            found.append((name, module))
    return found


def _layer_number(name: str, default: int) -> int:
    m = _LAYER_NUMBER.search(name)
    return int(m.group(1)) if m else default


def _device_name(param) -> str | None:
    """"cpu", or e.g. "cuda:0 (NVIDIA H200)": where the traced model ran (kept so readers know the source)."""
    if param is None:
        return None
    device = param.device
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - torch without distributed
        pass
    return 0, 1


class RoutingTracer:
    """Context manager that records the routing of every MoE router of `model` (see module doc).

    model: a v5 model or a moe_lab-patched one (any backend: it hooks the router module).
    logits: also keep the router logits [T, E] (large: T*E floats per layer and step).
    logits_dtype: "float32" or "float16" for stored logits.
    every: record one step in `every` (the others cost one flag check per router call).
    auto_step: each forward of `model` itself (a hook on it) starts a new step (right for inference
        and for one forward per optimizer step); set False and call `next_step()` with gradient
        accumulation, or when calling a submodule rather than `model`.
    start_step: the index of the first step.
    rank, world_size: this process's place under expert/data parallelism (default: torch.distributed).
    gather: "rank0" (save() gathers to rank 0, which writes) or "per_rank" (each rank writes its file).
    routers: [(name, module)] to hook instead of `find_routers(model)`.
    """

    def __init__(self, model, *, logits: bool = False, logits_dtype: str = "float32", every: int = 1,
                 auto_step: bool = True, start_step: int = 0, rank: int | None = None,
                 world_size: int | None = None, gather: str = "rank0", routers=None):
        if gather not in ("rank0", "per_rank"):
            raise ValueError(f"gather must be 'rank0' or 'per_rank', got {gather!r}")
        if logits_dtype not in ("float32", "float16"):
            raise ValueError(f"logits_dtype must be 'float32' or 'float16', got {logits_dtype!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        d_rank, d_world = _dist_rank_world()
        self.model = model
        self.keep_logits = logits
        self.logits_dtype = logits_dtype
        self.every = every
        self.auto_step = auto_step
        self.start_step = start_step
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        self.gather = gather
        self.routers = list(routers) if routers is not None else find_routers(model)
        if not self.routers:
            raise ValueError(f"no router modules found in {type(model).__name__}: it has no v5 router class in "
                             "_can_record_outputs['router_logits'] and no module named *.gate / *.router; pass routers=")
        self.step = start_step
        self._handles = []
        self._pending: dict[int, list] = {}
        self._pending_shapes: list = []
        self._pending_masks: list = []
        self._warned: set = set()
        self._layer_dtype: dict = {}
        self.trace = RoutingTrace(self._base_meta())

    # -- metadata
    def _base_meta(self) -> dict:
        config = getattr(self.model, "config", None)
        names = [n for n, _ in self.routers]
        param = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        try:
            from .. import __version__ as version
        except Exception:  # pragma: no cover
            version = None
        return {
            "format": FORMAT,
            "model": str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", type(self.model).__name__)),
            "model_type": getattr(config, "model_type", None),
            "model_class": type(self.model).__name__,
            "backend": getattr(self.model, "moe_lab_backend", "transformers"),
            "dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
            "device": _device_name(param),
            "logits_dtype": None,
            "stored_logits_dtype": self.logits_dtype if self.keep_logits else None,
            "num_experts": None,
            "top_k": None,
            "layer_names": names,
            "layer_numbers": [_layer_number(n, i) for i, n in enumerate(names)],
            "router_classes": [type(m).__name__ for _, m in self.routers],
            "router_score": self._router_score(),
            "steps": [],
            "batch_shapes": {},
            "rank": self.rank,
            "world_size": self.world_size,
            "gather": self.gather,
            "moe_lab_version": version,
        }

    def _router_score(self) -> str:
        """"sigmoid" (DeepSeek-V3-style routers, with a correction bias) or "softmax"."""
        for _, module in self.routers:
            spec = getattr(module, "moe_lab_routing", None)
            if spec is not None:
                return spec.score
            if hasattr(module, "e_score_correction_bias"):
                return "sigmoid"
        return "softmax"

    # -- hooks
    def __enter__(self) -> "RoutingTracer":
        if self._handles:
            raise RuntimeError("this RoutingTracer is already active")
        for index, (_, module) in enumerate(self.routers):
            self._handles.append(module.register_forward_hook(self._make_hook(index)))
        if hasattr(self.model, "register_forward_pre_hook"):
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        log.debug("moe_lab.analysis.trace: hooked %d routers", len(self.routers))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.flush()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    @property
    def recording(self) -> bool:
        return bool(self._handles) and (self.step - self.start_step) % self.every == 0

    def _model_pre_hook(self, module, args, kwargs):
        import torch

        if torch._C._current_graph_task_id() != -1:
            return
        if self.auto_step and (self._pending or self._pending_shapes):
            self.next_step()
        if not self.recording:
            return
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None or not hasattr(x, "shape") or x.dim() < 2:
            return
        shape = [int(x.shape[0]), int(x.shape[1])]
        self._pending_shapes.append(shape)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and list(mask.shape) == shape:
            self._pending_masks.append(mask.detach().reshape(-1))
        else:
            self._pending_masks.append(None)

    def _make_hook(self, index: int):
        def hook(module, args, output):
            if not self.recording:
                return
            import torch

            if torch._C._current_graph_task_id() != -1:  # recomputation inside backward (checkpointing)
                return
            if not (isinstance(output, tuple) and len(output) == 3):
                if index not in self._warned:
                    self._warned.add(index)
                    log.warning("moe_lab.analysis.trace: router %s returned %s, not (logits, weights, ids); not recorded",
                                self.routers[index][0], type(output).__name__)
                return
            logits, weights, ids = output
            k = ids.shape[-1]
            rec = {"ids": ids.detach().reshape(-1, k), "weights": weights.detach().reshape(-1, k)}
            if self.keep_logits:
                rec["logits"] = logits.detach().reshape(-1, logits.shape[-1])
            self._layer_dtype.setdefault("logits", str(logits.dtype).replace("torch.", ""))
            self._layer_dtype.setdefault("num_experts", int(logits.shape[-1]))
            self._layer_dtype.setdefault("top_k", int(k))
            self._pending.setdefault(index, []).append(rec)
        return hook

    # -- steps
    def next_step(self) -> None:
        """End the current step (move its records to the CPU) and start the next one."""
        self.flush()
        self.step += 1

    def flush(self) -> None:
        """Move the current step's pending records to NumPy (one device sync); idempotent."""
        import torch

        meta = self.trace.meta
        for key in ("num_experts", "top_k"):
            if meta[key] is None and key in self._layer_dtype:
                meta[key] = self._layer_dtype[key]
        if meta["logits_dtype"] is None and "logits" in self._layer_dtype:
            meta["logits_dtype"] = self._layer_dtype["logits"]
        num_experts = meta["num_experts"]
        id_dtype = torch.int16 if (num_experts or 0) <= 32767 else torch.int32
        logit_dtype = getattr(torch, self.logits_dtype)
        for index, parts in sorted(self._pending.items()):
            ids = torch.cat([p["ids"] for p in parts]).to(id_dtype).cpu().numpy()
            rec = {
                "ids": ids,
                "weights": torch.cat([p["weights"] for p in parts]).float().cpu().numpy(),
                "counts": np.bincount(ids.reshape(-1).astype(np.int64), minlength=num_experts).astype(np.int64),
            }
            if self.keep_logits:
                rec["logits"] = torch.cat([p["logits"] for p in parts]).to(logit_dtype).cpu().numpy()
            self.trace.records[(index, self.step)] = rec
        if self._pending:
            if self.step not in meta["steps"]:
                meta["steps"].append(self.step)
            if self._pending_shapes:
                meta["batch_shapes"][str(self.step)] = self._pending_shapes
            if self._pending_masks and all(m is not None for m in self._pending_masks):
                self.trace.token_masks[self.step] = torch.cat(self._pending_masks).to(torch.uint8).cpu().numpy()
        self._pending, self._pending_shapes, self._pending_masks = {}, [], []

    # -- saving, with expert parallelism in mind
    def save(self, path: str | os.PathLike) -> Path | None:
        """Write the trace. gather="per_rank": every rank writes `rank_path(path, rank, world_size)`.
        gather="rank0": every rank must call save(); rank 0 merges and writes `path`, others return None."""
        self.flush()
        if self.gather == "per_rank":
            target = rank_path(path, self.rank, self.world_size) if self.world_size > 1 or self.rank else Path(path)
            return self.trace.save(target)
        if self.world_size == 1:
            return self.trace.save(path)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"gather='rank0' with world_size={self.world_size} needs an initialised "
                               "torch.distributed process group; use gather='per_rank' to write one file per rank")
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, self.trace)
        if self.rank != 0:
            return None
        return merge_rank_traces(gathered).save(path)


def trace_routing(model, **kwargs) -> RoutingTracer:
    """A `RoutingTracer` for `model` (use it as a context manager); kwargs as `RoutingTracer`."""
    return RoutingTracer(model, **kwargs)
