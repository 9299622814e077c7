"""Rotary position embedding (the ``rotate_half`` form) as one Triton kernel each way.

x [B, H, S, D] (any strides, D contiguous), cos/sin [B or 1, S, D] broadcast over heads:

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

v5 computes this with about ten elementwise kernels per tensor (products, a negation, a
concatenation, a sum) and as many in backward. Here each row of D values is read and written once.
The kernel rounds where v5 rounds: each product to x's dtype, then the sum, to nearest-even as
PyTorch does (for bf16 on the bits, see ``_rnd``), and is compiled without multiply-add contraction,
so forward and backward equal v5's bit for bit for normal numbers (bf16 checked under the
interpreter and, before the bit rounding, found one ulp off on the H200; fp16/fp32 not GPU-checked).
Backward, by autograd's rules applied to v5's expression (dout = g):

    dx1 = round(g1 * c1) + round(g2 * s2),   dx2 = round(g2 * c2) - round(g1 * s1)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2

MAX_HEAD_DIM = 1024


@triton.jit
def _rnd(v, dtype: tl.constexpr):
    """Round a float32 value to ``dtype`` and back (a product or sum as PyTorch stores it). For bf16
    the rounding (to nearest, ties to even) is done on the bits: with a cast there and back 24% of
    outputs were one ulp off v5 on the H200 (the cast folded away or a multiply-add contracted, not
    determined), and the interpreter's casts truncate. NaN stays NaN."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    elif dtype == tl.float32:
        return v
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, R, H, S,
                 sxb, sxh, sxs, sob, soh, sos, scb, scs,
                 BACKWARD: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r = (b * H + h) * S + s of x; each program BLOCK_R rows of HALF-wide halves."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < HALF)[None, :]
    b = rows // (H * S)
    h = (rows // S) % H
    s = rows % S
    x_row = b * sxb + h * sxh + s * sxs
    o_row = b * sob + h * soh + s * sos
    c_row = b * scb + s * scs
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_row[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_row[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # x is the output gradient g
        y1 = _rnd(x1 * c1, dtype) + _rnd(x2 * s2, dtype)
        y2 = _rnd(x2 * c2, dtype) - _rnd(x1 * s1, dtype)
    else:
        y1 = _rnd(x1 * c1, dtype) - _rnd(x2 * s1, dtype)
        y2 = _rnd(x2 * c2, dtype) + _rnd(x1 * s2, dtype)
    # rounded first, so the store's cast is exact (the interpreter's casts truncate)
    tl.store(out_ptr + o_row[:, None] + cols[None, :], _rnd(y1, dtype).to(dtype), mask=mask)
    tl.store(out_ptr + o_row[:, None] + HALF + cols[None, :], _rnd(y2, dtype).to(dtype), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    B, H, S, D = x.shape
    out = torch.empty_like(x)
    half = D // 2
    block_d = next_pow2(half)
    block_r = max(1, 2048 // block_d)
    rows = B * H * S
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(triton.cdiv(rows, block_r),)](
        x, cos, sin, out, rows, H, S, *x.stride()[:3], *out.stride()[:3], cos_b, cos.stride(1),
        BACKWARD=backward, HALF=half, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        enable_fp_fusion=False)  # PyTorch rounds each product before the sum: no FMA
    return out


def check_rope_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """ValueError unless x [B, H, S, D] (D even, contiguous) and cos/sin [B or 1, S, D] of x's dtype
    and device, with equal strides and D contiguous."""
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-1] > MAX_HEAD_DIM or x.stride(-1) != 1:
        raise ValueError(f"rope: x must be [batch, heads, seq, head_dim] with an even, contiguous head_dim <= "
                         f"{MAX_HEAD_DIM}; got shape {tuple(x.shape)}, strides {x.stride()}")
    B, _, S, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[1:] != (S, D) or t.shape[0] not in (1, B) or t.stride(-1) != 1:
            raise ValueError(f"rope: {name} must be [batch or 1, {S}, {D}] with a contiguous last dim; "
                             f"got shape {tuple(t.shape)}, strides {t.stride()}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"rope: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if cos.stride() != sin.stride():
        raise ValueError(f"rope: cos and sin strides differ ({cos.stride()} vs {sin.stride()})")


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return _launch(grad, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D], cos/sin [B or 1, S, D] (no gradient) -> x * cos + rotate_half(x) * sin, x's strides."""
    check_rope_args(x, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos/sin must not require gradients (the kernel returns none for them)")
    return _Rope.apply(x, cos, sin)
