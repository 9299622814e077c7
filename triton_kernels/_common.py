"""Small helpers shared by the kernels (no kernels here)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def switch_on(value: str | None, default: bool = False) -> bool:
    """How an on/off environment switch reads: unset -> ``default``, "" / "0" / "false" -> off,
    anything else -> on. ``switch_on(os.environ.get(name), default)``; recorded environments too."""
    return default if value is None else value.strip().lower() not in ("", "0", "false")


def env_switch(name: str, default: bool = False) -> bool:
    """The on/off environment switch ``name`` (see ``switch_on``)."""
    return switch_on(os.environ.get(name), default)


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_switch("TRITON_INTERPRET")


def runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``: CUDA, or the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def allow_tf32() -> bool:
    """Whether fp32 GEMM inputs may use TF32 tensor cores on the GPU.

    Off by default (exact "ieee" fp32 products); ``triton_kernels.settings.configure(tf32=True)``
    trades exactness for speed. bf16/fp16 inputs always use tensor cores with fp32 accumulation.
    """
    from .settings import current

    return current().tf32


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(int(n))


def bucket(n: int) -> int:
    """Power-of-two bucket used as an autotune key for the ragged row count S."""
    return next_pow2(max(int(n), 1))


def check_offsets(offsets: torch.Tensor, num_experts: int, device) -> None:
    if offsets.dtype != torch.int32:
        raise TypeError(f"offsets must be int32 cumulative end offsets, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] != num_experts:
        raise ValueError(f"offsets must have shape [E={num_experts}], got {tuple(offsets.shape)}")
    if offsets.device != torch.device(device) and offsets.device.type != torch.device(device).type:
        raise ValueError(f"offsets on {offsets.device}, data on {device}")


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b with fp32 accumulation.

    IEEE: inputs are fp32 and must not use TF32.  UPCAST: compute the product in fp32 (the
    interpreter's bf16 dot is wrong; on the GPU this is False and bf16 uses tensor cores).
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
