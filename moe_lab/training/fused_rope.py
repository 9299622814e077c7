"""``fused_rope=True``: the rotary embedding of every attention layer as one Triton kernel each way.

v5's attention modules call their modeling file's ``apply_rotary_pos_emb(q, k, cos, sin)``. Enabling
this option (1) checks, by running it on the CPU, that the file's function computes
``x * cos + rotate_half(x) * sin`` for q and k (others, e.g. GPT-OSS's half-width form, are refused
with a ValueError before anything changes), as are configurations whose attention rotates otherwise
(``rope_interleave``, a partial rotary factor), (2) points that module-level name at a dispatcher,
and (3) wraps each attention module whose forward calls it, so the dispatcher uses
``triton_kernels.rope.rope`` only while an opted-in module runs. Every other caller gets v5's function
unchanged; an opted-in call the kernel cannot take (other arguments, dtypes, layouts, no Triton
device) runs v5's function too, with a warning once per reason. Parameters and checkpoints are
untouched.
"""
from __future__ import annotations

import logging
import sys
import threading
import types

import torch

log = logging.getLogger(__name__)
_state = threading.local()  # depth: how many opted-in attention forwards are running in this thread
_warned: set = set()  # fallback reasons already logged


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D], cos/sin [B, S, D] -> x * cos + rotate_half(x) * sin, in PyTorch."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def computes_rotate_half_rope(apply_fn) -> bool:
    """Whether ``apply_fn(q, k, cos, sin)`` is the rotate_half rotary embedding (float32, CPU probe)."""
    generator = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        q, k = (torch.randn(2, h, 5, 8, generator=generator) for h in (4, 2))
        cos, sin = (torch.randn(2, 5, 8, generator=generator) for _ in range(2))
        try:
            got_q, got_k = apply_fn(q, k, cos, sin)
        except Exception:  # noqa: BLE001 - another signature or shape convention: not this formula
            return False
    return (torch.allclose(got_q, rope_reference(q, cos, sin), rtol=1e-6, atol=1e-6)
            and torch.allclose(got_k, rope_reference(k, cos, sin), rtol=1e-6, atol=1e-6))


def why_not_fusable(q, k, cos, sin, args=(), kwargs=None) -> str | None:
    """None if the kernel takes this call, else why not (in the user's terms)."""
    from triton_kernels._common import runs_on
    from triton_kernels.rope import check_rope_args

    kwargs = kwargs or {}
    if args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1:
        return "apply_rotary_pos_emb was called with other arguments than (q, k, cos, sin)"
    if not runs_on(q.device):
        return f"Triton cannot run on {q.device} here"
    try:
        check_rope_args(q, cos, sin)
        check_rope_args(k, cos, sin)
    except ValueError as e:
        return str(e)
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin require gradients"
    return None


def _dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if getattr(_state, "depth", 0):
            reason = why_not_fusable(q, k, cos, sin, args, kwargs)
            if reason is None:
                from triton_kernels.rope import rope

                return rope(q, cos, sin), rope(k, cos, sin)
            if reason not in _warned:
                _warned.add(reason)
                log.warning("fused_rope: v5's rotary embedding runs instead of the kernel: %s", reason)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._moe_lab_original = original
    return apply_rotary_pos_emb


def _opted_in_forward(self, *args, **kwargs):
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        return self._moe_lab_rope_plain_forward(*args, **kwargs)
    finally:
        _state.depth -= 1


def _forward_calls(cls, name: str) -> bool:
    """Whether ``cls.forward``'s own code names the global ``name``. v5 wraps forwards in decorators
    (``deprecate_kwarg``; from 5.2x the hub-kernels ``use_kernelized_func``, which also turns
    ``apply_rotary_pos_emb`` into a module-level ``nn.Module``); ``functools.wraps`` leaves the
    chain in ``__wrapped__``, so every layer of it is read."""
    fn = cls.forward
    for _ in range(16):  # a decorator chain, never a cycle in practice
        if name in getattr(getattr(fn, "__code__", None), "co_names", ()):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def enable_fused_rope(model) -> int:
    """Route the rotary embedding of every attention module of ``model`` through the Triton kernel;
    returns how many modules. ValueError (nothing changed) if a module's file rotates differently."""
    config = model.config.get_text_config()
    if getattr(config, "rope_interleave", False):
        raise ValueError(f"fused_rope: {config.model_type} rotates interleaved pairs (config.rope_interleave=True); "
                         "the kernel fuses the rotate-half form; leave fused_rope off")
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    partial = getattr(config, "partial_rotary_factor", None) or rope_parameters.get("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) < 1.0:
        raise ValueError(f"fused_rope: {config.model_type} rotates part of each head (partial_rotary_factor="
                         f"{partial}); the kernel rotates whole heads; leave fused_rope off")
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention")
               and hasattr(sys.modules[type(m).__module__], "apply_rotary_pos_emb")
               and _forward_calls(type(m), "apply_rotary_pos_emb")]
    if not modules:
        raise ValueError(f"fused_rope: no attention module of {type(model).__name__} calls apply_rotary_pos_emb")
    files = {sys.modules[type(m).__module__] for m in modules}
    for file in files:  # check everything before changing anything
        fn = file.apply_rotary_pos_emb
        if not computes_rotate_half_rope(getattr(fn, "_moe_lab_original", fn)):
            raise ValueError(f"fused_rope: {file.__name__}.apply_rotary_pos_emb is not x * cos + rotate_half(x) * sin "
                             "over [batch, heads, seq, head_dim]; leave fused_rope off for this model")
    for file in files:
        if not hasattr(file.apply_rotary_pos_emb, "_moe_lab_original"):
            file.apply_rotary_pos_emb = _dispatcher(file.apply_rotary_pos_emb)
    for module in modules:
        if not hasattr(module, "_moe_lab_rope_plain_forward"):
            module._moe_lab_rope_plain_forward = module.forward
            module.forward = types.MethodType(_opted_in_forward, module)
    return len(modules)
