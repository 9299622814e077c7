"""Peer systems: other tools a researcher would try, built at the harness's geometries.

One job: build each peer's model (for ``experiments.cell``'s step) or MoE layer (for
``experiments.block_bench``), and say which version ran, or why it cannot run. Nothing of a peer's
code lives here; each is an optional install (``pip install 'moe_lab[peers]'`` for Liger; NeMo
AutoModel and SonicMoE as results/NOTES.md "Session 10 — peers" describes). A peer that is missing,
or cannot run a geometry, raises ``PeerUnavailable`` with the reason: its cell and block rows are
recorded ``unavailable``; there is no fallback to another implementation.

Peers (the system names):

* ``v5-liger``: vanilla Transformers v5 (``experts_implementation="grouped_mm"``) with Liger
  Kernel applied the way ``transformers.Trainer`` applies it for ``use_liger_kernel=True``:
  ``transformers.integrations.liger.apply_liger_kernel(model, args.liger_kernel_config)`` with the
  default (empty) kernel config, i.e. Liger's ``_apply_liger_kernel_to_instance`` for the model type
  (RoPE, RMSNorm, SwiGLU experts, fused linear cross-entropy for ``qwen3_moe``).
* ``nemo-automodel``: NeMo AutoModel's ``NeMoAutoModelForCausalLM.from_config`` (the
  ``from_pretrained`` build path without a checkpoint: random weights from the geometry's config),
  one GPU, with the backend of its documented fastest recipes less what needs several GPUs
  (``NEMO_BACKEND``: TransformerEngine attention, linear and RMSNorm; ``torch._grouped_mm``
  experts; DeepEP is an expert-parallel dispatcher and has nothing to do on one GPU). Its model
  returns logits only; the harness's step gets its loss from NeMo's own ``MaskedCrossEntropy`` on
  the labels shifted as v5 shifts them (``_NemoCausalLM``).
* ``sonicmoe``: SonicMoE's ``MoE`` layer (Dao-AILab/sonic-moe, its CuTe-DSL kernels) in place of
  every v5 sparse MoE block, carrying that block's weights (router, gate/up interleaved as SonicMoE
  stores them, down), where SonicMoE computes the same function: top-k softmax routing
  renormalised over the chosen experts, SwiGLU experts without bias (Qwen3-MoE with
  ``norm_topk_prob``, Mixtral). CUDA (Hopper) only.

The routing regimes (``experiments.regimes``) hook v5's routers: NeMo's gate and SonicMoE's fused
router have none, so those two run real routing only (``check_routing``).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import sys

from .cell import _Unavailable

PEERS = ("v5-liger", "nemo-automodel", "sonicmoe")
# the distributions whose versions each peer's records carry (None where not installed)
DISTRIBUTIONS = {
    "v5-liger": ("liger-kernel", "transformers", "triton"),
    "nemo-automodel": ("nemo-automodel", "transformer-engine", "transformer-engine-cu13", "transformers"),
    "sonicmoe": ("sonicmoe", "quack-kernels", "nvidia-cutlass-dsl", "cuda-python"),
}
INSTALL = {
    "v5-liger": "pip install 'moe_lab[peers]' (liger-kernel)",
    "nemo-automodel": "pip install nemo-automodel and TransformerEngine (results/NOTES.md, Session 10 — peers)",
    "sonicmoe": "install SonicMoE from its repository, Dao-AILab/sonic-moe (results/NOTES.md, Session 10 — peers)",
}
# Liger's kernel config, as TrainingArguments.liger_kernel_config: None = Liger's defaults for the model type
LIGER_KERNEL_CONFIG = None
# NeMo AutoModel's BackendConfig on one GPU: its TE recipes' attn/linear/rms_norm, grouped_mm experts,
# the local (torch) dispatcher, learned routing (its benchmarks' fake_balanced_gate is a routing regime)
NEMO_BACKEND = dict(attn="te", linear="te", rms_norm="te", experts="torch_mm", dispatcher="torch",
                    fake_balanced_gate=False)
# where the SonicMoE source came from (set by whoever installed it, e.g. .peers/device-peers.sh)
SONICMOE_SOURCE_ENV = "MOE_LAB_SONICMOE_SOURCE"
# the v5 families whose sparse block SonicMoE computes exactly: model_type -> the config check
_SONIC_FAMILIES = ("qwen3_moe", "mixtral")


class PeerUnavailable(_Unavailable):
    """A peer that is not installed here, or cannot run this geometry or device (status ``unavailable``)."""


def is_peer(system) -> bool:
    return isinstance(system, str) and system in PEERS


def _check_name(name: str) -> None:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")


def versions(name: str) -> dict:
    """{distribution: installed version or None} for a peer (read from package metadata, nothing imported)."""
    _check_name(name)
    out = {}
    for dist in DISTRIBUTIONS[name]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    if name == "sonicmoe":
        out["source"] = os.environ.get(SONICMOE_SOURCE_ENV)
    return out


def settings(name: str) -> dict:
    """What the harness asks of a peer (recorded beside its versions)."""
    _check_name(name)
    if name == "v5-liger":
        return {"experts_implementation": "grouped_mm", "liger_kernel_config": LIGER_KERNEL_CONFIG,
                "applied_with": "transformers.integrations.liger.apply_liger_kernel (Trainer, use_liger_kernel=True)"}
    if name == "nemo-automodel":
        return {"build": "NeMoAutoModelForCausalLM.from_config", "backend": dict(NEMO_BACKEND),
                "loss": "nemo_automodel MaskedCrossEntropy on v5-shifted labels"}
    return {"layer": "sonicmoe.MoE (KernelBackendMoE.sonicmoe)", "activation": "swiglu",
            "weights": "the v5 block's (gate/up interleaved)"}


def describe(name: str) -> dict:
    """A peer's record: its name, versions and settings."""
    return {"peer": name, "versions": versions(name), "settings": settings(name)}


def _import(name: str, module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - missing or broken: the same answer, with the reason
        raise PeerUnavailable(f"{name}: cannot import {module} ({type(e).__name__}: {e}); {INSTALL[name]}") from e


def check_routing(name: str, routing: str) -> None:
    """The routing regimes hook v5's routers: NeMo's gate and SonicMoE's fused router run real routing only."""
    _check_name(name)
    if name != "v5-liger" and routing != "real":
        raise PeerUnavailable(f"{name}: the routing regime {routing!r} hooks v5's routers; {name} routes with its own "
                              "fused router and runs real routing only")


# ---- building ----------------------------------------------------------------------------------
def build_model(name: str, config, *, dtype, attn: str, device, world: int = 1):
    """The peer's causal LM at ``config``'s geometry on ``device`` (random init under the caller's
    seed): ``model(input_ids=, labels=, use_cache=)`` returns an output with ``.loss``. Raises
    ``PeerUnavailable`` with the reason where it cannot."""
    _check_name(name)
    if world != 1:
        raise ValueError(f"{name} is run on one GPU here, the cell has {world} processes")
    if name == "v5-liger":
        return _build_liger(config, dtype=dtype, attn=attn, device=device)
    if name == "nemo-automodel":
        return _build_nemo(config, dtype=dtype, device=device)
    return _build_sonic(config, dtype=dtype, attn=attn, device=device)


def _v5_model(config, *, dtype, attn, device):
    import torch
    import transformers

    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm",
                                                             attn_implementation=attn, dtype=dtype)


def _build_liger(config, *, dtype, attn, device, kernel_config=LIGER_KERNEL_CONFIG):
    _import("v5-liger", "liger_kernel.transformers")
    monkey_patch = _import("v5-liger", "liger_kernel.transformers.monkey_patch")
    known = getattr(monkey_patch, "MODEL_TYPE_TO_APPLY_LIGER_FN", {})
    if config.model_type not in known:  # Liger would log and do nothing: not a v5-liger run
        raise PeerUnavailable(f"v5-liger: liger-kernel {versions('v5-liger')['liger-kernel']} has no kernels for "
                              f"model type {config.model_type!r}")
    try:
        from transformers.integrations.liger import apply_liger_kernel
    except ImportError as e:
        raise PeerUnavailable(f"v5-liger: this transformers has no integrations.liger.apply_liger_kernel, the "
                              f"Trainer's use_liger_kernel path ({e})") from e
    model = _v5_model(config, dtype=dtype, attn=attn, device=device)
    apply_liger_kernel(model, kernel_config)
    model.peer_info = {**describe("v5-liger"), "liger_kernel_config": kernel_config}
    return model


def _build_nemo(config, *, dtype, device):
    import torch

    _import("nemo-automodel", "nemo_automodel")
    _import("nemo-automodel", "transformer_engine.pytorch")  # its fastest backends are TE's: no silent SDPA
    if torch.device(device).type != "cuda":
        raise PeerUnavailable("nemo-automodel: its TransformerEngine backends run on CUDA only")
    auto = _import("nemo-automodel", "nemo_automodel._transformers.auto_model")
    common = _import("nemo-automodel", "nemo_automodel.components.models.common")
    backend = common.BackendConfig(**NEMO_BACKEND)
    with torch.device(device):
        model = auto.NeMoAutoModelForCausalLM.from_config(config, backend=backend, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    implementation = f"{type(model).__module__}.{type(model).__qualname__}"
    if not type(model).__module__.startswith("nemo_automodel."):
        raise PeerUnavailable(f"nemo-automodel: built {implementation}, not one of NeMo's own models, for "
                              f"{config.model_type!r}: its backend settings would not apply")
    wrapped = _NemoCausalLM(model)
    wrapped.peer_info = {**describe("nemo-automodel"), "implementation": implementation}
    return wrapped


def _nemo_causal_lm_class():
    import torch
    from torch import nn

    class NemoCausalLM(nn.Module):
        """NeMo's model under the harness's call: ``(input_ids, labels, use_cache) -> .loss``, the loss
        NeMo's recipes use (``MaskedCrossEntropy``) on the labels shifted left by one, -100 last (as v5)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config
            from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy

            self.loss_fn = MaskedCrossEntropy()

        def forward(self, input_ids, labels=None, use_cache=None, **kwargs):
            from transformers.modeling_outputs import CausalLMOutputWithPast

            logits = self.inner(input_ids, **kwargs).logits
            loss = None
            if labels is not None:
                shifted = torch.full_like(labels, -100)
                shifted[:, :-1] = labels[:, 1:]
                loss = self.loss_fn(logits, shifted)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    return NemoCausalLM


def _NemoCausalLM(inner):  # noqa: N802 - a class built on first use (torch imported lazily)
    return _nemo_causal_lm_class()(inner)


def sonic_reason(config) -> str | None:
    """Why SonicMoE cannot compute this geometry's sparse block exactly (None: it can)."""
    mtype = config.model_type
    if mtype not in _SONIC_FAMILIES:
        return (f"sonicmoe: {mtype!r} is not a family whose block SonicMoE computes exactly "
                f"(top-k softmax renormalised, SwiGLU experts without bias: {', '.join(_SONIC_FAMILIES)})")
    if mtype == "qwen3_moe" and not getattr(config, "norm_topk_prob", False):
        return "sonicmoe: qwen3_moe without norm_topk_prob (SonicMoE renormalises the top-k weights)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"sonicmoe: hidden_act {config.hidden_act!r} (SonicMoE's SwiGLU is silu-gated)"
    return None


def _build_sonic(config, *, dtype, attn, device):
    import torch

    reason = sonic_reason(config)
    if reason:
        raise PeerUnavailable(reason)
    sonic = _import("sonicmoe", "sonicmoe")
    enums = _import("sonicmoe", "sonicmoe.enums")
    if torch.device(device).type != "cuda":
        raise PeerUnavailable("sonicmoe: its kernels run on CUDA (Hopper) only")
    model = _v5_model(config, dtype=dtype, attn=attn, device=device)
    swapped = 0
    for name, module in list(model.named_modules()):
        if hasattr(module, "gate") and hasattr(module, "experts") and hasattr(module.experts, "gate_up_proj"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _SonicBlock(module, sonic, enums))
            swapped += 1
    if not swapped:
        raise PeerUnavailable(f"sonicmoe: no v5 sparse MoE block found in {type(model).__name__}")
    model.peer_info = {**describe("sonicmoe"), "blocks_replaced": swapped}
    return model


def _sonic_block_class():
    import torch
    from torch import nn

    class SonicBlock(nn.Module):
        """SonicMoE's ``MoE`` carrying a v5 sparse block's weights: router <- gate, c_fc <- gate_up_proj
        with gate rows at even and up rows at odd positions (SonicMoE's interleaved SwiGLU), c_proj <- down_proj."""

        def __init__(self, v5_block, sonic, enums):
            super().__init__()
            experts, gate = v5_block.experts, v5_block.gate
            n_experts, two_i, hidden = experts.gate_up_proj.shape
            inter = two_i // 2
            top_k = getattr(gate, "top_k", None) or v5_block.top_k
            w = experts.gate_up_proj
            self.moe = sonic.MoE(num_experts=n_experts, num_experts_per_tok=top_k, hidden_size=hidden,
                                 intermediate_size=inter, activation_function=enums.ActivationType.SWIGLU,
                                 add_bias=False, std=0.02).to(device=w.device, dtype=w.dtype)
            self.kernel_backend = enums.KernelBackendMoE.sonicmoe
            with torch.no_grad():
                self.moe.router.weight.copy_(gate.weight)
                interleaved = torch.empty_like(w)
                interleaved[:, 0::2] = w[:, :inter]
                interleaved[:, 1::2] = w[:, inter:]
                self.moe.c_fc.weight.copy_(interleaved)
                self.moe.c_proj.weight.copy_(experts.down_proj)

        def forward(self, hidden_states):
            out, _aux = self.moe(hidden_states, kernel_backend_moe=self.kernel_backend)
            return out

    return SonicBlock


def _SonicBlock(v5_block, sonic, enums):  # noqa: N802
    return _sonic_block_class()(v5_block, sonic, enums)


def first_block(name: str, model):
    """The first MoE layer of a peer's model (what ``block_bench`` times)."""
    _check_name(name)
    if name == "v5-liger":
        for module in model.modules():
            if hasattr(module, "gate") and hasattr(module, "experts"):
                return module
    elif name == "sonicmoe":
        for module in model.modules():
            if type(module).__name__ == "SonicBlock":
                return module
    else:
        layers = importlib.import_module("nemo_automodel.components.moe.layers")
        for module in model.modules():
            if isinstance(module, layers.MoE):
                return module
    raise PeerUnavailable(f"{name}: no MoE layer found in {type(model).__name__}")


@contextlib.contextmanager
def scope(model_type: str | None = None):
    """Restore the v5 modeling modules' globals afterwards: Liger patches them process-wide (RoPE,
    RMSNorm and experts classes), which would change every model built later in the same process.
    ``model_type``: the family about to be built, whose modeling module is imported first (a module
    first imported inside the scope could not be restored)."""
    if model_type:
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    modules = {k: m for k, m in sys.modules.items() if k.startswith("transformers.models.") and m is not None}
    saved = {k: dict(vars(m)) for k, m in modules.items()}
    try:
        yield
    finally:
        for k, m in list(sys.modules.items()):
            if k in saved:
                d = vars(m)
                for attr in [a for a in d if a not in saved[k]]:
                    del d[attr]
                d.update(saved[k])
