"""A DLPack bridge between torch tensors and JAX arrays (zero-copy where the platform allows).

    from moe_lab.jax.dlpack import torch_to_jax, jax_to_torch
    a = torch_to_jax(torch_tensor)        # a JAX array on the matching device, sharing memory
    t = jax_to_torch(jax_array)           # a torch tensor sharing the JAX buffer

Aliasing caveats (read before writing to either side):
- Zero-copy means both objects view one buffer. JAX assumes its arrays never change: writing to the
  torch tensor afterwards (in place: `t.add_(1)`, an optimizer step, `copy_`) changes the JAX array
  too, silently, and jit-compiled functions that captured it may see either value. Treat a bridged
  buffer as read-only on both sides, or pass `copy=True`.
- JAX may delete a buffer it owns (donation through `jax.jit(..., donate_argnums=...)`,
  `array.delete()`); a torch tensor made from it then points at freed memory.
- Copies happen, silently, where zero-copy is impossible: non-compact strides (slices with steps,
  expanded/broadcast tensors) go through `.contiguous()`; JAX's CPU client copies buffers not aligned
  to its requirement (e.g. a slice starting at an odd element). `shares_memory(t, a)` tells which.
- Gradients do not cross the bridge: tensors that require grad are detached (torch refuses to export
  them otherwise). Differentiate on one side (see `moe_lab.jax.reference`).
- 64-bit types: with `jax_enable_x64` off (JAX's default), JAX would silently narrow int64/float64 to
  32 bits. `torch_to_jax` refuses instead (x64="error") unless x64 is on (`jax.config.update(
  "jax_enable_x64", True)` or `with jax.enable_x64(True):`), or converts explicitly with x64="narrow"
  (a copy; int64 values outside int32's range raise OverflowError).
- bfloat16, float16, bool and the integer types cross as they are (DLPack has codes for them).
- A CUDA tensor needs a JAX with a GPU backend on the same device; otherwise this raises (or pass
  `copy=True` to go through host memory). A JAX array spread over several devices cannot be exported.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_WIDE = {torch.int64: torch.int32, torch.float64: torch.float32, torch.complex128: torch.complex64, torch.uint64: torch.uint32}


def _jax():
    try:
        import jax
    except ImportError as exc:  # pragma: no cover - exercised where jax is absent
        raise ImportError("moe_lab.jax.dlpack needs JAX: pip install 'moe_lab[jax]' (or pip install jax)") from exc
    return jax


def x64_enabled() -> bool:
    """Whether JAX keeps 64-bit types (jax_enable_x64, globally or in a `jax.enable_x64` block)."""
    return bool(_jax().config.jax_enable_x64)


def torch_to_jax(tensor: torch.Tensor, *, x64: str = "error", copy: bool = False):
    """torch tensor [any shape] -> JAX array [same shape], sharing memory where possible.

    x64: "error" (int64/float64/complex128 need jax_enable_x64) or "narrow" (convert to 32 bits, a copy).
    copy: always copy (through host memory), so later writes to either side stay separate.
    """
    jax = _jax()
    t = tensor.detach()
    if t.dtype in _WIDE and not x64_enabled():
        if x64 == "narrow":
            narrow = _WIDE[t.dtype]
            if not t.dtype.is_floating_point and not t.dtype.is_complex and t.numel():
                info = torch.iinfo(narrow)
                lo, hi = int(t.min()), int(t.max())
                if lo < info.min or hi > info.max:
                    raise OverflowError(f"cannot narrow {t.dtype} values in [{lo}, {hi}] to {narrow}")
            t = t.to(narrow)
        elif x64 == "error":
            raise TypeError(
                f"a {t.dtype} tensor cannot cross to JAX unchanged: jax_enable_x64 is off, so JAX would silently "
                f"narrow it. Enable it (jax.config.update('jax_enable_x64', True) or `with jax.enable_x64(True):`), "
                f"or pass x64='narrow' to convert to {_WIDE[t.dtype]}"
            )
        else:
            raise ValueError(f"x64 must be 'error' or 'narrow', got {x64!r}")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if copy:
        import numpy as np

        if t.dtype == torch.bfloat16:
            return jax.numpy.asarray(t.cpu().view(torch.int16).numpy().copy()).view(jax.numpy.bfloat16)
        return jax.numpy.asarray(np.array(t.cpu().numpy(), copy=True))
    try:
        return jax.dlpack.from_dlpack(t)
    except Exception as exc:
        if "strid" not in str(exc).lower():
            raise RuntimeError(f"cannot hand a {t.dtype} tensor on {t.device} to JAX ({exc}); "
                               "for a CUDA tensor install a CUDA JAX, or pass copy=True") from exc
        log.debug("moe_lab.jax.dlpack: non-compact strides %s; copying to contiguous", tuple(t.stride()))
        return jax.dlpack.from_dlpack(t.contiguous())


def jax_to_torch(array, *, copy: bool = False) -> torch.Tensor:
    """JAX array [any shape] (on one device) -> torch tensor [same shape], sharing the buffer unless copy."""
    _jax()
    out = torch.from_dlpack(array)
    return out.clone() if copy else out


def shares_memory(tensor: torch.Tensor, array) -> bool:
    """Whether a torch tensor and a JAX array view the same buffer (True: the bridge did not copy)."""
    try:
        return tensor.data_ptr() == array.unsafe_buffer_pointer()
    except Exception:  # deleted or multi-device arrays
        return False
