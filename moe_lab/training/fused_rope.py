"""``fused_rope=True``: the rotary embedding of every attention layer as one Triton kernel each way.

v5's attention modules call a module-level function of their modeling file: ``apply_rotary_pos_emb(q,
k, cos, sin)``, and DeepSeek-V3's with ``config.rope_interleave`` (its default)
``apply_rotary_pos_emb_interleave(q, k, cos, sin)`` on the rotary part of its MLA heads
(``qk_rope_head_dim``). Enabling this option

1. finds the attention modules whose forward names one of these functions, and classifies each
   such function of their files by running it on the CPU against the kernel's forms
   (``triton_kernels.rope``): ``x * cos + rotate_half(x) * sin`` (Qwen3-MoE, Mixtral, DeepSeek-V3
   without interleave), GPT-OSS's halves rotated by half-width cos/sin, or DeepSeek-V3's interleaved
   pairs. A function matching none, a partial rotary factor, or ``rope_interleave`` without an
   interleaved function is refused with a ValueError before anything changes;
2. points each module-level name at a dispatcher for its form (the function's Python name is
   looked up when the forward runs, so the swap takes effect even where v5 wraps the function
   with ``use_kernel_forward_from_hub``; the original stays on ``dispatcher._moe_lab_original``,
   the form on ``dispatcher._moe_lab_form``); and
3. wraps each attention module whose forward calls one, so the dispatcher uses
   ``triton_kernels.rope.rope`` only while an opted-in module runs (the plain forward stays on
   ``module._moe_lab_rope_plain_forward``).

Every other caller gets v5's function unchanged; an opted-in call the kernel cannot take (other
arguments, dtypes, layouts, no Triton device) runs v5's function too, with a warning once per reason.
Parameters and checkpoints are untouched.
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

# the module-level rotary functions v5's attention forwards call -> the kernel forms each may compute,
# tried in this order
ROTARY_FUNCTIONS = {
    "apply_rotary_pos_emb": ("rotate_half", "half_width"),
    "apply_rotary_pos_emb_interleave": ("interleaved",),
}
# keyword arguments after (q, k, cos, sin) the kernel reproduces, at these values (some v5 versions'
# functions take an unused position_ids); v5's attention forwards pass none
KEYWORDS = {"position_ids": None, "unsqueeze_dim": 1}

FORM_WORDS = {"rotate_half": "x * cos + rotate_half(x) * sin",
              "half_width": "GPT-OSS's halves rotated by half-width cos/sin",
              "interleaved": "DeepSeek-V3's interleaved pairs rotated into halves"}


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, form: str = "rotate_half") -> torch.Tensor:
    """x [B, H, S, D], cos/sin [B, S, W] -> x rotated in ``form`` (see ``triton_kernels.rope``), in PyTorch."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    if form == "rotate_half":
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
    if form == "half_width":
        first, second = x[..., :half], x[..., half:]
    elif form == "interleaved":
        first, second = x[..., 0::2], x[..., 1::2]
        cos, sin = cos[..., :half], sin[..., :half]
    else:
        raise ValueError(f"rope_reference: unknown form {form!r}")
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def computes_rope(apply_fn, form: str = "rotate_half") -> bool:
    """Whether ``apply_fn(q, k, cos, sin)`` rotates q and k in the kernel's ``form`` (float32 CPU probe,
    head_dim 8). For ``"interleaved"`` cos/sin are probed with equal halves, as v5's rotary modules
    make them (``cat((freqs, freqs))``): v5 reads only the first half since 5.2x and read both halves
    of a de-interleaved copy before, which agree on such inputs; the kernel reads the first half."""
    from triton_kernels.rope import trig_width

    generator = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        q, k = (torch.randn(2, h, 5, 8, generator=generator) for h in (4, 2))
        cos, sin = (torch.randn(2, 5, trig_width(8, form), generator=generator) for _ in range(2))
        if form == "interleaved":
            cos, sin = (torch.cat((t[..., :4], t[..., :4]), dim=-1) for t in (cos, sin))
        try:
            got_q, got_k = apply_fn(q, k, cos, sin)
        except Exception:  # noqa: BLE001 - another signature or shape convention: not this formula
            return False
    if not (isinstance(got_q, torch.Tensor) and isinstance(got_k, torch.Tensor)) \
            or got_q.shape != q.shape or got_k.shape != k.shape:
        return False
    return (torch.allclose(got_q, rope_reference(q, cos, sin, form), rtol=1e-6, atol=1e-6)
            and torch.allclose(got_k, rope_reference(k, cos, sin, form), rtol=1e-6, atol=1e-6))


def computes_rotate_half_rope(apply_fn) -> bool:
    """Whether ``apply_fn(q, k, cos, sin)`` is the rotate_half rotary embedding (float32, CPU probe)."""
    return computes_rope(apply_fn, "rotate_half")


def rotary_form(apply_fn, name: str = "apply_rotary_pos_emb") -> str | None:
    """The kernel form the rotary function ``apply_fn`` (bound to the module-level ``name``) computes,
    or None if none of those ``name`` may have."""
    forms = ROTARY_FUNCTIONS[name]
    return next((form for form in forms if computes_rope(apply_fn, form)), None)


def _unsupported_arguments(args: tuple, kwargs: dict) -> bool:
    """Whether arguments after (q, k, cos, sin) were passed other than ``KEYWORDS`` at their values
    (positional ones are not read: their meaning differs between v5's functions)."""
    return bool(args) or any(key not in KEYWORDS or (value is not None if KEYWORDS[key] is None
                                                     else value != KEYWORDS[key])
                             for key, value in kwargs.items())


def why_not_fusable(q, k, cos, sin, args=(), kwargs=None, form: str = "rotate_half",
                    name: str = "apply_rotary_pos_emb") -> str | None:
    """None if the kernel takes this call of ``name`` (computing ``form``), else why not (in the user's terms)."""
    from triton_kernels._common import runs_on
    from triton_kernels.rope import check_rope_args

    if _unsupported_arguments(tuple(args), dict(kwargs or {})):
        return f"{name} was called with other arguments than (q, k, cos, sin)"
    if not runs_on(q.device):
        return f"Triton cannot run on {q.device} here"
    try:
        check_rope_args(q, cos, sin, form)
        check_rope_args(k, cos, sin, form)
    except ValueError as e:
        return str(e)
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin require gradients"
    return None


def _dispatcher(original, form: str, name: str):
    def dispatcher(q, k, cos, sin, *args, **kwargs):
        if getattr(_state, "depth", 0):
            reason = why_not_fusable(q, k, cos, sin, args, kwargs, form, name)
            if reason is None:
                from triton_kernels.rope import rope

                return rope(q, cos, sin, form), rope(k, cos, sin, form)
            if reason not in _warned:
                _warned.add(reason)
                log.warning("fused_rope: v5's rotary embedding runs instead of the kernel: %s", reason)
        return original(q, k, cos, sin, *args, **kwargs)

    dispatcher.__name__ = dispatcher.__qualname__ = name
    dispatcher._moe_lab_original = original
    dispatcher._moe_lab_form = form
    return dispatcher


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


def _rotary_calls(module) -> list[str]:
    """The rotary functions of ``ROTARY_FUNCTIONS`` that ``module``'s forward calls from its file."""
    file = sys.modules[type(module).__module__]
    return [name for name in ROTARY_FUNCTIONS if hasattr(file, name) and _forward_calls(type(module), name)]


def enable_fused_rope(model) -> int:
    """Route the rotary embedding of every attention module of ``model`` through the Triton kernel;
    returns how many modules. ValueError (nothing changed) if a module's file rotates otherwise."""
    config = model.config.get_text_config()
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    partial = getattr(config, "partial_rotary_factor", None) or rope_parameters.get("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) < 1.0:
        raise ValueError(f"fused_rope: {config.model_type} rotates part of each head (partial_rotary_factor="
                         f"{partial}); the kernel rotates whole heads; leave fused_rope off")
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and _rotary_calls(m)]
    if not modules:
        raise ValueError(f"fused_rope: no attention module of {type(model).__name__} calls "
                         f"{' or '.join(ROTARY_FUNCTIONS)}")
    functions = {(sys.modules[type(m).__module__], name) for m in modules for name in _rotary_calls(m)}
    if getattr(config, "rope_interleave", False) and not any(
            name == "apply_rotary_pos_emb_interleave" for _, name in functions):
        raise ValueError(f"fused_rope: {config.model_type} rotates interleaved pairs (config.rope_interleave=True) "
                         "but no attention module calls apply_rotary_pos_emb_interleave; leave fused_rope off")
    forms = {}
    for file, name in sorted(functions, key=lambda fn: (fn[0].__name__, fn[1])):  # check all before changing any
        fn = getattr(file, name)
        forms[file, name] = rotary_form(getattr(fn, "_moe_lab_original", fn), name)
        if forms[file, name] is None:
            expected = " or ".join(FORM_WORDS[form] for form in ROTARY_FUNCTIONS[name])
            raise ValueError(f"fused_rope: {file.__name__}.{name} is not {expected} over "
                             "[batch, heads, seq, head_dim]; leave fused_rope off for this model")
    for (file, name), form in forms.items():
        if not hasattr(getattr(file, name), "_moe_lab_original"):
            setattr(file, name, _dispatcher(getattr(file, name), form, name))
    for module in modules:
        if not hasattr(module, "_moe_lab_rope_plain_forward"):
            module._moe_lab_rope_plain_forward = module.forward
            module.forward = types.MethodType(_opted_in_forward, module)
    return len(modules)
