"""RMSNorm forward and backward as one Triton kernel each (rows of x [N, H], weight [H]).

v5's RMSNorm runs about eight elementwise kernels per call with float32 copies of x; here each row is
read once and written once in forward, and read twice (x, dy) and written once in backward. Two
formulas, as the families write them (n = x * rsqrt(mean(x^2) + eps), computed in float32):

* ``weight_last=False`` (Llama style: Qwen3-MoE, Mixtral, DeepSeek-V3, ...): y = w * n.to(x.dtype)
* ``weight_last=True`` (GPT-OSS): y = (w * n).to(x.dtype), the product in float32.

Backward returns dx in x's dtype and dw summed over rows in float32 (per-program partial sums, then
one reduction), cast to w's dtype. dx is evaluated in the order autograd evaluates v5's expression, so
NaN and inf (from inputs, or from an intermediate that overflows) land where v5's do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2

MAX_HIDDEN = 16384
MAX_BWD_PROGRAMS = 1024  # backward programs (their float32 dw partials [P, H] are summed at the end)


def _blocks(hidden: int) -> tuple[int, int]:
    """(BLOCK_R rows, BLOCK_H columns) of one program: about 4096 elements."""
    block_h = next_pow2(hidden)
    return max(1, 4096 // block_h), block_h


def _warps(block_h: int) -> int:
    return 4 if block_h <= 2048 else 8 if block_h <= 4096 else 16


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, H, eps, stride_x, stride_y,
                        WEIGHT_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask, cmask = rows < N, cols < H
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / H + eps)
    n = x * rstd[:, None]
    if WEIGHT_LAST:
        y = w[None, :] * n
    else:
        y = w[None, :] * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, N, H, stride_dy, stride_x, stride_dx,
                        WEIGHT_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program p takes row blocks p, p + P, p + 2P, ... and writes its float32 partial dw [H] to row p."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_R), tl.num_programs(0)):
        rows = (block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # row indices < N fit int32
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        n = x * rstd[:, None]
        if WEIGHT_LAST:
            dn = dy * w[None, :]
            dw += tl.sum(dy * n, 0)
        else:  # y = w * n.to(dtype): the product (and so dn) rounds to the input dtype
            dn = (dy * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += tl.sum(dy * n.to(x_ptr.dtype.element_ty).to(tl.float32), 0)
        # autograd's order on v5's expression (n = x * r, r = rsqrt(mean(x^2) + eps)): the path
        # through r is (-0.5 * sum(dn * x)) * r^3 / H * 2x, so that an overflow lands where v5's does
        # (x = 1e30 with dn = 1e10: sum(dn * x) = inf, times r^3 = 0 is NaN there too)
        c = (-0.5 * tl.sum(dn * x, 1)) * (rstd * rstd * rstd) / H
        dx = dn * rstd[:, None] + c[:, None] * (2.0 * x)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid.to(tl.int64) * H + cols, dw, mask=cmask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, weight_last):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n, h = x2.shape
        block_r, block_h = _blocks(h)
        y = torch.empty_like(x2)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        if n:
            _rmsnorm_fwd_kernel[(triton.cdiv(n, block_r),)](x2, weight, y, rstd, n, h, eps, x2.stride(0), y.stride(0),
                                                             WEIGHT_LAST=weight_last, BLOCK_R=block_r, BLOCK_H=block_h,
                                                             num_warps=_warps(block_h))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.weight_last, ctx.shape = weight_last, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n, h = x2.shape
        block_r, block_h = _blocks(h)
        dy2 = dy.reshape(-1, h).contiguous()
        dx = torch.empty_like(x2)
        programs = min(triton.cdiv(n, block_r), MAX_BWD_PROGRAMS)  # each loops over row blocks
        dw_part = torch.empty(max(programs, 1), h, dtype=torch.float32, device=x2.device)
        if n:
            _rmsnorm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_part, n, h, dy2.stride(0), x2.stride(0),
                                             dx.stride(0), WEIGHT_LAST=ctx.weight_last, BLOCK_R=block_r,
                                             BLOCK_H=block_h, num_warps=_warps(block_h))
        else:
            dw_part.zero_()
        return dx.reshape(ctx.shape), dw_part.sum(0).to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_last: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., H] with weight [H] (same dtype as x); see the module
    docstring for the two formulas. Differentiable in x and weight."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight must be [H={x.shape[-1]}], got {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"rms_norm: x is {x.dtype} and weight {weight.dtype}; the fused kernel wants one dtype")
    if weight.shape[0] > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {weight.shape[0]} > {MAX_HIDDEN} (one row per block)")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps), bool(weight_last))
