"""Grouped (per-expert) GEMM over rows sorted by expert, with autograd.

Shapes: ``x [S, K]`` routed rows sorted by expert, ``w [E, K, N]`` (any strides, e.g. the
transpose view ``down_proj.transpose(1, 2)`` of an HF ``[E, N, K]`` tensor), ``offsets [E]`` int32
cumulative END offsets (rows ``offsets[e-1]:offsets[e]`` belong to expert ``e``), out ``[S, N]``.

Kernels
- ``_grouped_mm_kernel``: ``y[rows of e] = x[rows of e] @ w[e] (+ bias[e])``. The grid enumerates
  (M-tile, N-tile) pairs with an upper bound of ``cdiv(S, BLOCK_M) + E`` M-tiles; each program
  finds its expert by a prefix sum over the per-expert tile counts (no host sync), and programs
  past the last tile exit at once. Empty experts own no tiles.
- ``_grouped_mm_dw_kernel``: ragged-K GEMM ``dw[e] = x[rows of e]^T @ dy[rows of e]`` (zero for
  empty experts), optionally also ``dbias[e] = sum(dy[rows of e])``. One program per
  (expert, K-tile, N-tile) loops over that expert's rows; no atomics, deterministic.

Accumulation is fp32; outputs are in the input dtype. fp32 inputs use exact ("ieee") products
unless ``settings.configure(tf32=True)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import allow_tf32, bucket, check_offsets, interpreting, mma, next_pow2

# ----------------------------------------------------------------------------------------------
# Autotune configurations. Chosen for an H200 (sm_90, 228 KiB shared memory per SM, bf16): large
# tiles for the big balanced case (S=32768 rows over 128 experts -> ~256 rows per expert), smaller
# M tiles for skinny experts. Configs that do not fit (e.g. fp32 inputs with 128x256 tiles) are
# skipped by the autotuner. Under the interpreter a single config is used.
# ----------------------------------------------------------------------------------------------
_INTERPRET_FWD = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)
_INTERPRET_DW = triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_S": 64}, num_warps=4)


def _configs(names: tuple, rows: list, interpreted: triton.Config) -> list:
    """``triton.Config``s of tile sizes ``names`` from rows ``(*sizes, num_warps, num_stages)``; the
    interpreter gets ``interpreted`` alone. ``settings.configure(autotune=False)`` later keeps the
    first row alone."""
    if interpreting():
        return [interpreted]
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_KNS = ("BLOCK_K", "BLOCK_N", "BLOCK_S")


def _fwd_configs():
    return _configs(_MNK, [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 256, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        # larger tiles, for the largest row counts per expert
        (128, 256, 64, 8, 4),
        (256, 128, 64, 8, 3),
    ], _INTERPRET_FWD)


def _dw_configs():
    return _configs(_KNS, [
        (128, 128, 32, 4, 4),  # the usual choice at Qwen3-30B-A3B geometry on the H200
        (128, 128, 32, 4, 5),
        (128, 128, 32, 4, 6),
        (128, 128, 32, 8, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 64, 4, 4),  # small row counts
    ], _INTERPRET_DW)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def expert_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map the global M-tile index ``pid_m`` to (expert, first row, end row, valid).

    Expert e owns ``cdiv(count_e, BLOCK_M)`` consecutive M-tiles; tiles beyond the total are
    invalid (their programs exit).
    """
    e_idx = tl.arange(0, BLOCK_E)
    in_range = e_idx < E
    ends = tl.load(offsets_ptr + e_idx, mask=in_range, other=0)
    starts = tl.load(offsets_ptr + e_idx - 1, mask=in_range & (e_idx > 0), other=0)
    tiles = tl.where(in_range, tl.cdiv(ends - starts, BLOCK_M), 0)
    cum = tl.cumsum(tiles, 0)  # inclusive
    total = tl.sum(tiles, 0)
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
    is_e = e_idx == expert
    tiles_before = tl.sum(tl.where(e_idx < expert, tiles, 0), 0)
    row0 = tl.sum(tl.where(is_e, starts, 0), 0) + (pid_m - tiles_before) * BLOCK_M
    row_end = tl.sum(tl.where(is_e, ends, 0), 0)
    return expert, row0, row_end, pid_m < total


@triton.jit
def program_tile(offsets_ptr, N, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's output tile of a grouped GEMM over expert-sorted rows: (expert int64, first row,
    end row of the expert, first column, valid). Programs are laid out M-tile major."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    expert, row0, row_end, valid = expert_tile(pid // num_n, offsets_ptr, E, BLOCK_M, BLOCK_E)
    return expert.to(tl.int64), row0, row_end, (pid % num_n) * BLOCK_N, valid


@triton.jit
def tile_rows_cols(row0, row_end, n0, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows [BLOCK_M] int64, row mask, cols [BLOCK_N], col mask) of the tile at (row0, n0)."""
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    return rows, rows < row_end, cols, cols < N


@triton.jit
def tile_matmul(a_ptrs, b_ptrs, step_a, step_b, rmask, cmask, K,
                IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = sum over K of a [BLOCK_M, BLOCK_K] tiles @ b [BLOCK_K, BLOCK_N]
    tiles; the pointers advance by step_a / step_b per K block; masked loads read zeros."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = mma(a, b, acc, IEEE, UPCAST)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@triton.jit
def expert_rows(offsets_ptr, e):
    """(start, end) rows of expert ``e`` from cumulative end offsets."""
    end = tl.load(offsets_ptr + e)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    return start, end


@triton.jit
def dw_program_tile(offsets_ptr, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's weight-gradient tile: (expert, K-tile index, first K row, first N column, the
    expert's first and end rows). Programs are laid out expert-major, then K-tile, then N-tile."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    e = pid // (num_k * num_n)
    rest = pid % (num_k * num_n)
    pid_k = rest // num_n
    start, end = expert_rows(offsets_ptr, e)
    return e, pid_k, pid_k * BLOCK_K, (rest % num_n) * BLOCK_N, start, end


@triton.jit
def store_dw_tile(dw_ptr, db_ptr, e, pid_k, k0, n0, K, N, acc, dbias,
                  stride_we, stride_wk, stride_wn, stride_be, stride_bn,
                  HAS_DBIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the fp32 tile ``acc`` [BLOCK_K, BLOCK_N] of dw[e] at (k0, n0) and, from the first K-tile,
    dbias[e] [BLOCK_N], in their tensors' dtype."""
    kk = k0 + tl.arange(0, BLOCK_K)
    nn = n0 + tl.arange(0, BLOCK_N)
    e64 = e.to(tl.int64)
    dw_ptrs = dw_ptr + e64 * stride_we + kk[:, None] * stride_wk + nn[None, :] * stride_wn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(kk < K)[:, None] & (nn < N)[None, :])
    if HAS_DBIAS:
        if pid_k == 0:
            tl.store(db_ptr + e64 * stride_be + nn * stride_bn, dbias.to(db_ptr.dtype.element_ty), mask=nn < N)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_fwd_configs(), key=["N", "K", "S_BUCKET"])
@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, y_ptr, b_ptr, offsets_ptr,
    N, K, E, S_BUCKET,
    stride_xs, stride_xk,
    stride_we, stride_wk, stride_wn,
    stride_ys, stride_yn,
    stride_be, stride_bn,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert, row0, row_end, n0, valid = program_tile(offsets_ptr, N, E, BLOCK_M, BLOCK_N, BLOCK_E)
    if not valid:
        return
    rows, rmask, cols, cmask = tile_rows_cols(row0, row_end, n0, N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xs + ks[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tile_matmul(x_ptrs, w_ptrs, BLOCK_K * stride_xk, BLOCK_K * stride_wk, rmask, cmask, K,
                      IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert * stride_be + cols * stride_bn, mask=cmask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ys + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.autotune(configs=_dw_configs(), key=["K", "N", "S_BUCKET"])
@triton.jit
def _grouped_mm_dw_kernel(
    x_ptr, dy_ptr, dw_ptr, db_ptr, offsets_ptr, src_ptr,
    K, N, S_BUCKET,
    stride_xs, stride_xk,
    stride_ds, stride_dn,
    stride_we, stride_wk, stride_wn,
    stride_be, stride_bn,
    HAS_DBIAS: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dw[e] = x[rows of e]^T @ dy[rows of e]; with GATHER, row r reads x[src[r]]."""
    e, pid_k, k0, n0, start, end = dw_program_tile(offsets_ptr, K, N, BLOCK_K, BLOCK_N)
    kk = k0 + tl.arange(0, BLOCK_K)
    nn = n0 + tl.arange(0, BLOCK_N)
    kmask = kk < K
    nmask = nn < N
    ss = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        rows = (s0 + ss).to(tl.int64)
        smask = rows < end
        if GATHER:
            src = tl.load(src_ptr + rows, mask=smask, other=0).to(tl.int64)
        else:
            src = rows
        xt = tl.load(x_ptr + src[None, :] * stride_xs + kk[:, None] * stride_xk,
                     mask=kmask[:, None] & smask[None, :], other=0.0)
        g = tl.load(dy_ptr + rows[:, None] * stride_ds + nn[None, :] * stride_dn,
                    mask=smask[:, None] & nmask[None, :], other=0.0)
        acc = mma(xt, g, acc, IEEE, UPCAST)
        if HAS_DBIAS:
            dbias += tl.sum(g.to(tl.float32), axis=0)
    store_dw_tile(dw_ptr, db_ptr, e, pid_k, k0, n0, K, N, acc, dbias, stride_we, stride_wk, stride_wn,
                  stride_be, stride_bn, HAS_DBIAS, BLOCK_K, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _gemm_flags(dtype: torch.dtype):
    ieee = dtype == torch.float32 and not allow_tf32()
    upcast = interpreting() and dtype != torch.float32
    return ieee, upcast


def empty_like_layout(ref: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Uninitialised tensor with ``ref``'s shape and (when dense) its strides, so that a weight
    gradient lands in the parameter's own memory layout (e.g. a transpose view's base)."""
    # preserve_format keeps the strides of a non-overlapping, dense tensor; else contiguous.
    return torch.empty_like(ref, dtype=dtype or ref.dtype, memory_format=torch.preserve_format)


def grouped_mm_forward(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e] (+ bias[e])`` without autograd.

    x [S, K], w [E, K, N] (any strides), offsets int32 [E] (cumulative ends, offsets[-1] == S),
    bias [E, N] or None -> y [S, N] in x.dtype. Rows past offsets[-1] are left unwritten.
    """
    S, K = x.shape
    E, K2, N = w.shape
    if K2 != K:
        raise ValueError(f"grouped_mm: x has K={K} but w is {tuple(w.shape)} ([E, K, N])")
    if w.dtype != x.dtype:
        raise TypeError(f"grouped_mm: x is {x.dtype} but w is {w.dtype}")
    check_offsets(offsets, E, x.device)
    y = out if out is not None else torch.empty((S, N), dtype=x.dtype, device=x.device)
    if S == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias.repeat_interleave(torch.diff(offsets, prepend=offsets.new_zeros(1)).long(), 0,
                                        output_size=S).to(y.dtype)
        return y
    ieee, upcast = _gemm_flags(x.dtype)
    b = bias if bias is not None else x  # dummy pointer when HAS_BIAS is False
    sb = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    grid = lambda meta: ((triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)
    if tma_enabled() and tma_eligible(x, w, y):
        launch_tma_forward(_tma._grouped_mm_tma_kernel, grid, x, w, y, b, offsets, sb, bias is not None, upcast)
        return y
    _grouped_mm_kernel[grid](
        x, w, y, b, offsets,
        N, K, E, bucket(S),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        y.stride(0), y.stride(1),
        sb[0], sb[1],
        HAS_BIAS=bias is not None, IEEE=ieee, UPCAST=upcast, BLOCK_E=next_pow2(E),
    )
    return y




DW_IMPLS = ("pointer", "tma", "torch")


def default_dw_impl(x: torch.Tensor, dy: torch.Tensor, src_rows: Optional[torch.Tensor]) -> str:
    """``settings.weight_grad``'s choice for these rows: torch's ragged-K ``grouped_mm`` for bf16 rows
    without a gather, else the pointer kernel."""
    from .settings import current

    torch_ok = current().weight_grad == "torch" and src_rows is None and torch_weight_grad_fits(x, dy)
    return "torch" if torch_ok else "pointer"


def torch_weight_grad_fits(x: torch.Tensor, dy: torch.Tensor) -> bool:
    """Whether torch's grouped_mm takes these rows for the weight gradient: bf16, and K and N whole
    multiples of 16 bytes (its operands' strides must be)."""
    return (x.dtype == dy.dtype == torch.bfloat16 and hasattr(torch.nn.functional, "grouped_mm")
            and x.shape[1] % 8 == 0 and dy.shape[1] % 8 == 0)


def _weight_grad_torch(x, dy, offsets, like, with_bias):
    """(dw [E, K, N], db [E, N] or None) by torch's ragged-K grouped_mm, the product computed in the
    orientation whose output is already in ``like``'s memory order (no copy of the gradient)."""
    F = torch.nn.functional
    if like.stride(1) == 1:  # a transpose view ([E, N, K] in memory), as the experts' v5 weights give
        dw = F.grouped_mm(dy.t(), x, offs=offsets).transpose(1, 2)
    else:
        dw = F.grouped_mm(x.t(), dy, offs=offsets)
    if dw.stride() != like.stride():  # another layout (not dense, or a permutation of a 4-D view)
        dw = empty_like_layout(like).copy_(dw)
    db = None
    if with_bias:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
        expert_of_row = torch.repeat_interleave(torch.arange(like.shape[0], device=dy.device), counts,
                                                output_size=dy.shape[0])
        db = torch.zeros((like.shape[0], like.shape[2]), dtype=torch.float32, device=dy.device)
        db = db.index_add_(0, expert_of_row, dy.float()).to(like.dtype)
    return dw, db


def grouped_mm_weight_grad(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, like: torch.Tensor,
    with_bias: bool = False, src_rows: Optional[torch.Tensor] = None, impl: Optional[str] = None,
):
    """Ragged-K grouped GEMM: ``dw[e] = x[rows of e]^T @ dy[rows of e]`` (zero for empty experts).

    x [S, K] (or, with src_rows [S] int64, x [T, K] read as x[src_rows]), dy [S, N], offsets int32
    [E], like: the weight [E, K, N] whose layout dw copies. ``impl`` picks the kernel (``DW_IMPLS``):
    ``pointer``, ``tma`` (rows without a gather), or ``torch`` (``torch.nn.functional.grouped_mm``:
    bf16 rows without a gather); by default ``default_dw_impl`` (``settings.weight_grad``).
    Returns dw [E, K, N] (and dbias [E, N] = per-expert row sums of dy when with_bias).
    """
    impl = impl or default_dw_impl(x, dy, src_rows)
    if impl not in DW_IMPLS:
        raise ValueError(f"grouped_mm_weight_grad: impl must be one of {DW_IMPLS}, got {impl!r}")
    if impl == "torch" and not (src_rows is None and torch_weight_grad_fits(x, dy)):
        raise ValueError("grouped_mm_weight_grad: impl='torch' needs bf16 rows without a gather (src_rows=None), "
                         "K and N multiples of 8")
    if impl == "tma" and not (src_rows is None and x.dtype == dy.dtype and rows_tma_eligible(x, dy)):
        raise ValueError("grouped_mm_weight_grad: impl='tma' needs rows without a gather (src_rows=None), "
                         "one dtype and unit column strides")
    S, K = dy.shape[0], x.shape[1]
    E, _, N = like.shape
    if impl == "torch" and E and K and N:
        return _weight_grad_torch(x, dy, offsets, like, with_bias)
    dw = empty_like_layout(like)
    db = torch.empty((E, N), dtype=like.dtype, device=like.device) if with_bias else None
    if E == 0:
        return dw, db
    if K == 0 or N == 0:
        dw.zero_()
        if db is not None:
            db.zero_()
        return dw, db
    ieee, upcast = _gemm_flags(x.dtype)
    dbp = db if db is not None else dw
    sb = (db.stride(0), db.stride(1)) if db is not None else (0, 0)
    grid = lambda meta: (E * triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    if impl == "tma":
        launch_dw_tma(grid, x, dy, dw, dbp, offsets, sb, with_bias, upcast)
        return dw, db
    _grouped_mm_dw_kernel[grid](
        x, dy, dw, dbp, offsets, src_rows if src_rows is not None else offsets,
        K, N, bucket(S),
        x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        sb[0], sb[1],
        HAS_DBIAS=with_bias, GATHER=src_rows is not None, IEEE=ieee, UPCAST=upcast,
    )
    return dw, db


class GroupedMM(torch.autograd.Function):
    """Autograd wrapper: forward ``grouped_mm_forward``; backward dx = dy @ w[e]^T (the same
    kernel on the transpose view of w), dw by the ragged-K kernel, dbias as per-expert row sums."""

    @staticmethod
    def forward(ctx, x, w, offsets, bias):
        ctx.save_for_backward(x, w, offsets)
        ctx.has_bias = bias is not None
        return grouped_mm_forward(x, w, offsets, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm_forward(dy, w.transpose(1, 2), offsets)
        need_db = ctx.has_bias and ctx.needs_input_grad[3]
        if ctx.needs_input_grad[1] or need_db:
            dw, db = grouped_mm_weight_grad(x, dy, offsets, w, with_bias=need_db)
            if not ctx.needs_input_grad[1]:
                dw = None
        return dx, dw, None, db


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable grouped GEMM over expert-sorted rows.

    Args:
        x: [S, K] rows sorted by expert (fp32 / bf16 / fp16).
        w: [E, K, N] per-expert weights, any strides (pass ``W.transpose(1, 2)`` for an
            ``[E, N, K]`` parameter; its gradient comes back in the parameter's layout).
        offsets: int32 [E] cumulative end offsets; ``offsets[-1]`` should equal S (rows past it
            are neither read nor written: their outputs and input-gradients are undefined).
        bias: optional [E, N] per-expert bias.
    Returns:
        [S, N] in x.dtype, fp32 accumulation. Gradients for x, w and bias.
    """
    return GroupedMM.apply(x, w, offsets, bias)


# The experimental tensor-descriptor (TMA) kernels, used only with ``settings.configure(tma=True)``
# or ``impl="tma"``; imported last because they are built from this module's device helpers.
from . import grouped_gemm_tma as _tma  # noqa: E402
from .grouped_gemm_tma import launch_dw_tma, launch_tma_forward, rows_tma_eligible, tma_eligible, tma_enabled  # noqa: E402
