"""Grouped GEMM with a per-expert low-rank (LoRA) update added in the epilogue, with autograd.

Shapes: ``x [S, K]`` routed rows sorted by expert, ``w [E, K, N]`` the frozen base weights (any
strides, e.g. a transpose view of an HF ``[E, N, K]`` tensor), ``a [E, K, R]`` and ``b [E, R, N]``
the low-rank factors, ``scale`` a float, ``offsets [E]`` int32 cumulative END offsets. Per expert e::

    y[rows of e] = x[rows of e] @ w[e] (+ bias[e]) + scale * (x[rows of e] @ a[e]) @ b[e]

The per-expert delta ``a[e] @ b[e]`` ([K, N], the size of the base weight) is never formed:

- ``u = x @ a[e]`` ([S, R], small) is one grouped GEMM (``grouped_gemm``'s kernel);
- ``_lora_epilogue_kernel`` computes the base tile ``x @ w[e]`` and, before storing it, adds
  ``scale * u[rows] @ b[e][:, cols]`` (a K = R product per output tile): the [S, N] output is
  written once.

Backward (``dy [S, N]``)::

    v  = dy @ b[e]^T                    [S, R]   (grouped GEMM)
    dx = dy @ w[e]^T + scale * v @ a[e]^T        (the epilogue kernel again, on transpose views)
    da[e] = scale * x_e^T @ v_e         [E, K, R] (ragged-K grouped GEMM)
    db[e] = scale * u_e^T @ dy_e        [E, R, N]
    dw[e] = x_e^T @ dy_e                only when ``w`` requires a gradient (a frozen base gets none)

Saved for backward: x, u and the factors (w and offsets are inputs). With a ``prologue`` (a
differentiable function making x from a smaller or cheaper input z, e.g. a row gather [T, K] ->
[S, K] or the expert MLP's activation [S, 2K] -> [S, K]), z is saved instead of x, and backward
recomputes x = prologue(z) and differentiates through it: the same values as applying the prologue
outside, without keeping x.

Accumulation is fp32, outputs in the input dtype. Reference: ``lora_grouped_mm_reference``.
Nothing here imports ``moe_lab``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ._common import bucket, check_offsets, next_pow2
from .grouped_gemm import (
    _configs, _gemm_flags, grouped_mm_forward, grouped_mm_weight_grad, program_tile, tile_matmul, tile_rows_cols,
)

_INTERPRET = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)


def _epilogue_configs():
    return _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 64, 4, 4),
    ], _INTERPRET)


@triton.autotune(configs=_epilogue_configs(), key=["N", "K", "R", "S_BUCKET"])
@triton.jit
def _lora_epilogue_kernel(
    x_ptr, w_ptr, u_ptr, l_ptr, y_ptr, bias_ptr, offsets_ptr,
    N, K, R, E, S_BUCKET, scale,
    stride_xs, stride_xk,
    stride_we, stride_wk, stride_wn,
    stride_us, stride_ur,
    stride_le, stride_lr, stride_ln,
    stride_ys, stride_yn,
    stride_be, stride_bn,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = x @ w[e] (+ bias[e]) + scale * u @ l[e] on this program's tile of expert e's rows."""
    expert, row0, row_end, n0, valid = program_tile(offsets_ptr, N, E, BLOCK_M, BLOCK_N, BLOCK_E)
    if not valid:
        return
    rows, rmask, cols, cmask = tile_rows_cols(row0, row_end, n0, N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xs + ks[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tile_matmul(x_ptrs, w_ptrs, BLOCK_K * stride_xk, BLOCK_K * stride_wk, rmask, cmask, K,
                      IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    # epilogue: the low-rank update of these rows and columns (K = R)
    rs = tl.arange(0, BLOCK_R)
    u_ptrs = u_ptr + rows[:, None] * stride_us + rs[None, :] * stride_ur
    l_ptrs = l_ptr + expert * stride_le + rs[:, None] * stride_lr + cols[None, :] * stride_ln
    update = tile_matmul(u_ptrs, l_ptrs, BLOCK_R * stride_ur, BLOCK_R * stride_lr, rmask, cmask, R,
                         IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_R)
    acc += update * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=cmask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ys + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _block_r(r: int) -> int:
    """The rank tile: tl.dot wants at least 16; ranks above 64 loop over 64-wide slices."""
    return min(max(16, next_pow2(r)), 64)


def lora_epilogue_forward(
    x: torch.Tensor, w: torch.Tensor, u: torch.Tensor, l: torch.Tensor, scale: float, offsets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y[rows of e] = x @ w[e] (+ bias[e]) + scale * u @ l[e]`` without autograd.

    x [S, K], w [E, K, N], u [S, R], l [E, R, N] (any strides), offsets int32 [E] (offsets[-1] == S),
    bias [E, N] or None -> y [S, N] in x.dtype. Rows past offsets[-1] are left unwritten.
    """
    S, K = x.shape
    E, K2, N = w.shape
    R = u.shape[1]
    if K2 != K or tuple(l.shape) != (E, R, N) or u.shape[0] != S:
        raise ValueError(f"lora_epilogue: x {tuple(x.shape)}, w {tuple(w.shape)}, u {tuple(u.shape)}, "
                         f"l {tuple(l.shape)}: want x [S, K], w [E, K, N], u [S, R], l [E, R, N]")
    if not (w.dtype == u.dtype == l.dtype == x.dtype):
        raise TypeError(f"lora_epilogue: x {x.dtype}, w {w.dtype}, u {u.dtype}, l {l.dtype}: one dtype")
    check_offsets(offsets, E, x.device)
    y = torch.empty((S, N), dtype=x.dtype, device=x.device)
    if S == 0 or N == 0:
        return y
    if R == 0:  # no update: the base product alone
        return grouped_mm_forward(x, w, offsets, bias, out=y)
    if K == 0:  # no base product: the update alone
        y.copy_(grouped_mm_forward(u, l, offsets) * scale)
        return y if bias is None else y.add_(_bias_rows(bias, offsets, S))
    ieee, upcast = _gemm_flags(x.dtype)
    b = bias if bias is not None else x  # dummy pointer when HAS_BIAS is False
    sb = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    grid = lambda meta: ((triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_epilogue_kernel[grid](
        x, w, u, l, y, b, offsets,
        N, K, R, E, bucket(S), float(scale),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        u.stride(0), u.stride(1),
        l.stride(0), l.stride(1), l.stride(2),
        y.stride(0), y.stride(1),
        sb[0], sb[1],
        HAS_BIAS=bias is not None, IEEE=ieee, UPCAST=upcast, BLOCK_E=next_pow2(E), BLOCK_R=_block_r(R),
    )
    return y


def _bias_rows(bias: torch.Tensor, offsets: torch.Tensor, S: int) -> torch.Tensor:
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    return bias.repeat_interleave(counts, 0, output_size=S)


def _rows_per_expert_sum(dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[E, N] float32 sums of dy's rows per expert (a bias gradient when the weight needs none)."""
    E = offsets.shape[0]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=dy.device), counts, output_size=dy.shape[0])
    return torch.zeros(E, dy.shape[1], dtype=torch.float32, device=dy.device).index_add_(0, expert_of_row, dy.float())


class GroupedLoRALinear(torch.autograd.Function):
    """Autograd of ``grouped_lora_linear``: see the module docstring for the backward's GEMMs."""

    @staticmethod
    def forward(ctx, z, w, offsets, a, b, scale, bias, prologue):
        x = z if prologue is None else prologue(z)  # [S, K]; grad mode is off here: nothing of it kept
        u = grouped_mm_forward(x, a, offsets)  # [S, R]
        ctx.save_for_backward(z, w, offsets, a, b, u)
        ctx.scale, ctx.has_bias, ctx.prologue = float(scale), bias is not None, prologue
        return lora_epilogue_forward(x, w, u, b, scale, offsets, bias)

    @staticmethod
    def backward(ctx, dy):
        z, w, offsets, a, b, u = ctx.saved_tensors
        scale, prologue = ctx.scale, ctx.prologue
        dy = dy.contiguous()
        need_z, need_w, _, need_a, need_b, _, need_bias, _ = ctx.needs_input_grad
        if prologue is None:
            x = z
        else:  # recompute x [S, K] from z, with its graph when z needs a gradient
            z = z.detach().requires_grad_(need_z)
            with torch.enable_grad():
                x = prologue(z)
        dx = dw = da = db = dbias = None
        v = grouped_mm_forward(dy, b.transpose(1, 2), offsets) if (need_z or need_a) else None  # [S, R]
        if need_z:
            dx = lora_epilogue_forward(dy, w.transpose(1, 2), v, a.transpose(1, 2), scale, offsets)
        if need_a:
            da = grouped_mm_weight_grad(x.detach(), v, offsets, a)[0].mul_(scale)
        if need_b:
            db = grouped_mm_weight_grad(u, dy, offsets, b)[0].mul_(scale)
        if need_w:
            dw, dbias = grouped_mm_weight_grad(x.detach(), dy, offsets, w, with_bias=ctx.has_bias and need_bias)
        if ctx.has_bias and need_bias and dbias is None:
            dbias = _rows_per_expert_sum(dy, offsets)
        if dbias is not None:
            dbias = dbias.to(dy.dtype)
        if prologue is not None and need_z:
            (dx,) = torch.autograd.grad(x, z, dx)
        return dx, dw, None, da, db, None, dbias, None


def grouped_lora_linear(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
    bias: Optional[torch.Tensor] = None, prologue: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Differentiable ``x @ w[e] (+ bias[e]) + scale * (x @ a[e]) @ b[e]`` over expert-sorted rows.

    Args:
        x: [S, K] rows sorted by expert; w: [E, K, N] (any strides); a: [E, K, R]; b: [E, R, N];
        scale: the LoRA scaling (alpha / r); offsets: int32 [E] cumulative end offsets
        (``offsets[-1] == S``); bias: optional [E, N].
        prologue: optional differentiable function; the rows are then ``prologue(x)`` ([S, K]), x
            itself any shape it takes. x is kept for backward in place of the rows, which backward
            recomputes (see the module docstring).
    Returns:
        [S, N] in the rows' dtype (fp32 accumulation); gradients for x, a, b, and w / bias only
        where they require one.
    """
    return GroupedLoRALinear.apply(x, w, offsets, a, b, scale, bias, prologue)


def lora_grouped_mm_reference(x, w, offsets, a, b, scale, bias=None) -> torch.Tensor:
    """The same function, one expert at a time in PyTorch (fp32 products): the definition of right."""
    out = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        xe = x[start:end].float()
        ye = xe @ w[e].float() + scale * (xe @ a[e].float()) @ b[e].float()
        if bias is not None:
            ye = ye + bias[e].float()
        out[start:end] = ye.to(x.dtype)
        start = end
    return out
