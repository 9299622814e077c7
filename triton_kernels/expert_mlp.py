"""Fused expert MLP: grouped gate_up GEMM with the activation in its epilogue, then grouped down GEMM.

Shapes: ``x [S, H]`` routed rows sorted by expert, ``offsets [E]`` int32 cumulative end offsets.
Weight layouts (Hugging Face Transformers v5):
- standard (``transposed=False``): ``gate_up [E, 2I, H]`` (rows ``:I`` gate, ``I:`` up:
  "concatenated"), ``down [E, H, I]``;
- GPT-OSS (``transposed=True``): ``gate_up [E, H, 2I]`` with interleaved columns (gate ``::2``,
  up ``1::2``), ``gate_up_bias [E, 2I]``, ``down [E, I, H]``, ``down_bias [E, H]``.
Internally both become GEMM views ``w_gu [E, H, 2I]`` and ``w_down [E, I, H]``, and the gate/up
columns are two strided views of ``w_gu`` (``[..., :I]``/``[..., I:]`` or ``[..., ::2]``/``[..., 1::2]``).
Non-gated experts (v5 ``has_gate=False``, e.g. Nemotron-H) pass their ``up_proj`` as ``gate_up``:
``[E, I, H]`` (standard) or ``[E, H, I]`` (``transposed``), bias ``[E, I]``; ``w_gu`` is then
``[E, H, I]``, all of it the up projection (``concatenated`` does not apply).

Activations (``activation=``):
- ``"swiglu"`` (gated): ``act = silu(gate) * up``;
- ``"gpt_oss"`` (gated): ``g = min(gate, limit); u = clamp(up, -limit, limit);
  act = (u + 1) * g * sigmoid(alpha * g)`` (alpha=1.702, limit=7.0); biases are added first;
- ``"relu2"`` (non-gated): ``act = relu(up)^2`` (v5's ``ACT2FN["relu2"]``), bias added first.

Memory/recompute choice: the forward keeps only the pre-activation ``h = x @ w_gu (+ b)``
(``[S, 2I]``, non-gated ``[S, I]``; in the input dtype, in the weights' column order) besides its
inputs; the activation ``act [S, I]`` that feeds the down GEMM is not saved. The backward's first
kernel computes ``d_act = dy @ w_down[e]^T`` and, in its epilogue, recomputes ``act`` from ``h``
and turns ``d_act`` into ``dh`` (same shape as ``h``; relu2: ``dh = 2 * relu(h) * d_act``) — so
no GEMM is recomputed, only element-wise work. Then ``dW_down = act^T dy``, ``dx = dh @ w_gu^T``,
``dW_gu = x^T dh`` (+ bias grads as row sums).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import bucket, check_offsets, next_pow2
from .grouped_gemm import (
    _configs, _gemm_flags, grouped_mm_forward, grouped_mm_weight_grad, mma, program_tile, tile_matmul, tile_rows_cols,
)
from .grouped_gemm_tma import (  # the kernels' experimental USE_TMA path
    rows_tma_eligible, tma_enabled, tma_expert_span, tma_load_weight, tma_rows_desc, tma_tile_matmul, tma_weight_args,
    tma_weight_desc, weight_tma_eligible,
)
from .permute import _check_slots, _reduce

ACTIVATIONS = {"swiglu": 0, "gpt_oss": 1, "relu2": 2}
FIRST_PLAIN = tl.constexpr(2)  # activation ids from here on are non-gated: act(h) of one up projection
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


@triton.jit
def _clamp_nan(x, lo, hi):
    """``torch.clamp(x, lo, hi)``: NaN stays NaN (Triton's default minimum / maximum return the
    other operand for NaN). Pass ``lo = -inf`` for no lower bound."""
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _act_fwd(g, u, ACT: tl.constexpr, alpha, limit):
    """Activation on fp32 tiles of gate ``g`` and up ``u``, in v5's order of operations (so that
    inf, NaN and overflow land where v5's do)."""
    if ACT == 0:
        a = g * tl.sigmoid(g) * u
    else:
        gc = _clamp_nan(g, float("-inf"), limit)
        uc = _clamp_nan(u, -limit, limit)
        a = (uc + 1.0) * (gc * tl.sigmoid(gc * alpha))
    return a


@triton.jit
def _act_bwd(g, u, da, ACT: tl.constexpr, alpha, limit):
    """(act, d_gate, d_up) from fp32 tiles of gate, up and d_act, in the order autograd evaluates
    v5's expression. Clamp gradients follow ``torch.clamp``: they pass where the input lies inside
    the closed interval (not for NaN)."""
    if ACT == 0:
        sg = tl.sigmoid(g)
        silu = g * sg
        a = silu * u
        du = da * silu
        dg = da * u * sg * (1.0 + g * (1.0 - sg))
    else:
        gc = _clamp_nan(g, float("-inf"), limit)
        uc = _clamp_nan(u, -limit, limit)
        sg = tl.sigmoid(gc * alpha)
        glu = gc * sg
        a = (uc + 1.0) * glu
        du = tl.where((u >= -limit) & (u <= limit), da * glu, 0.0)
        dglu = da * (uc + 1.0)
        # glu = gc * sigmoid(gc * alpha): the product's two terms, sigmoid's backward grad * (1 - y) * y
        dgc = dglu * sg + dglu * gc * (1.0 - sg) * sg * alpha
        dg = tl.where(g <= limit, dgc, 0.0)
    return a, dg, du


@triton.jit
def _plain_act_fwd(h, ACT: tl.constexpr):
    """Non-gated activation (``ACT >= FIRST_PLAIN``) of an fp32 tile of the up projection ``h``, in
    v5's order of operations. relu2: ``square(relu(h))``; relu keeps NaN, as torch's does."""
    tl.static_assert(ACT == 2, "the only non-gated activation is relu2 (ACT == 2)")
    r = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return r * r


@triton.jit
def _plain_act_bwd(h, da, ACT: tl.constexpr):
    """(act, dh) from fp32 tiles of the up projection and d_act, as autograd evaluates v5's
    ``square(relu(h))``: square's backward ``da * (2 * r)``, then relu's mask (``r <= 0`` gets 0,
    also where that product is NaN from an infinite ``da``; a NaN ``h`` passes NaN)."""
    tl.static_assert(ACT == 2, "the only non-gated activation is relu2 (ACT == 2)")
    r = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
    dh = tl.where(h <= 0.0, 0.0, da * (2.0 * r))
    return r * r, dh


def _gate_up_configs():
    """Tiles of the fused gate_up kernel (two accumulators, gate and up, per tile). Without the
    candidates that spill or exceed shared memory on sm_90 (``compile_check``: 128x256, 256x128,
    128x128 with 4 warps)."""
    return _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
        (128, 128, 64, 8, 3),  # the usual choice at Qwen3-30B-A3B geometry on the H200
        (128, 128, 64, 8, 4),
        (128, 128, 32, 8, 5),
        (64, 128, 64, 4, 4),
        (64, 256, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ], _INTERPRET_GATE_UP)


_INTERPRET_GATE_UP = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)


@triton.autotune(configs=_gate_up_configs(), key=["N", "K", "S_BUCKET", "USE_TMA", "PAIRS"])
@triton.jit
def _gate_up_act_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, a_ptr, hg_ptr, hu_ptr, offsets_ptr, src_ptr,
    N, K, E, S_BUCKET, alpha, limit,
    stride_xs, stride_xk,
    stride_we, stride_wk, stride_wn, stride_w_outer,
    stride_be, stride_bn,
    stride_as, stride_an,
    stride_hs, stride_hn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, GATHER: tl.constexpr,
    USE_TMA: tl.constexpr, W_KMAJOR: tl.constexpr, PAIRS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act[rows, n] = ACT(x @ wg[e] + bg[e], x @ wu[e] + bu[e]) for one (M, N) tile; N = I.
    Optionally stores the pre-activations (gate into hg, up into hu). With GATHER, row r of the
    GEMM reads x[src[r]] (the token of a routed row): the permuted copy is never written. With
    USE_TMA (not with GATHER) the GEMM tiles move by tensor descriptors (``tma_tile_matmul``'s
    conventions for ``W_KMAJOR`` and ``stride_w_outer``); the epilogue is the same.
    A non-gated ACT (``>= FIRST_PLAIN``) has no gate: one GEMM x @ wu[e] (+ bu[e]) and act = ACT(up);
    wg, bg and hg are then never read or written (the launcher passes the up views for them).
    With PAIRS (interleaved gate/up columns, GPT-OSS), wg, bg and hg are the whole tensors
    ([E, H, 2I], [E, 2I], [S, 2I]; wu, bu, hu unused): one contiguous [BLOCK_K, 2 * BLOCK_N] weight
    tile per step feeds one accumulator, split into gate (even) and up (odd) columns afterwards, so
    the loads stay vectorised instead of reading two stride-2 views."""
    GATED: tl.constexpr = ACT < FIRST_PLAIN
    tl.static_assert(not PAIRS or (GATED and not USE_TMA), "PAIRS: gated activations, pointer loads only")
    expert, row0, row_end, n0, valid = program_tile(offsets_ptr, N, E, BLOCK_M, BLOCK_N, BLOCK_E)
    if not valid:
        return
    rows, rmask, cols, cmask = tile_rows_cols(row0, row_end, n0, N, BLOCK_M, BLOCK_N)
    if GATED:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        start, count, m0 = tma_expert_span(offsets_ptr, expert, row0, row_end)
        x_desc = tma_rows_desc(x_ptr, start, count, stride_xs, K, BLOCK_M, BLOCK_K)
        if GATED:
            wg_desc = tma_weight_desc(wg_ptr, expert, stride_we, stride_w_outer, N, K, W_KMAJOR, BLOCK_N, BLOCK_K)
        wu_desc = tma_weight_desc(wu_ptr, expert, stride_we, stride_w_outer, N, K, W_KMAJOR, BLOCK_N, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([m0, k0])
            if GATED:
                acc_g = mma(a, tma_load_weight(wg_desc, k0, n0, W_KMAJOR), acc_g, False, UPCAST)
            acc_u = mma(a, tma_load_weight(wu_desc, k0, n0, W_KMAJOR), acc_u, False, UPCAST)
    elif PAIRS:
        ks = tl.arange(0, BLOCK_K)
        if GATHER:
            src = tl.load(src_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            src = rows
        cols2 = 2 * n0 + tl.arange(0, 2 * BLOCK_N)  # gate and up columns of this tile, alternating
        cmask2 = cols2 < 2 * N
        x_ptrs = x_ptr + src[:, None] * stride_xs + ks[None, :] * stride_xk
        w_ptrs = wg_ptr + expert * stride_we + ks[:, None] * stride_wk + cols2[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[:, None] & cmask2[None, :], other=0.0)
            acc = mma(a, b, acc, IEEE, UPCAST)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(bg_ptr + expert * stride_be + cols2 * stride_bn, mask=cmask2, other=0.0).to(tl.float32)[None, :]
        if STORE_H:
            tl.store(hg_ptr + rows[:, None] * stride_hs + cols2[None, :] * stride_hn, acc.to(hg_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask2[None, :])
        acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        ks = tl.arange(0, BLOCK_K)
        if GATHER:
            src = tl.load(src_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            src = rows
        x_ptrs = x_ptr + src[:, None] * stride_xs + ks[None, :] * stride_xk
        w_off = expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        if GATED:
            wg_ptrs = wg_ptr + w_off
        wu_ptrs = wu_ptr + w_off
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & cmask[None, :]
            if GATED:
                bg = tl.load(wg_ptrs, mask=wmask, other=0.0)
            bu = tl.load(wu_ptrs, mask=wmask, other=0.0)
            if GATED:
                acc_g = mma(a, bg, acc_g, IEEE, UPCAST)
            acc_u = mma(a, bu, acc_u, IEEE, UPCAST)
            x_ptrs += BLOCK_K * stride_xk
            if GATED:
                wg_ptrs += BLOCK_K * stride_wk
            wu_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS and not PAIRS:
        b_off = expert * stride_be + cols * stride_bn
        if GATED:
            acc_g += tl.load(bg_ptr + b_off, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bu_ptr + b_off, mask=cmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if STORE_H and not PAIRS:
        h_off = rows[:, None] * stride_hs + cols[None, :] * stride_hn
        if GATED:
            tl.store(hg_ptr + h_off, acc_g.to(hg_ptr.dtype.element_ty), mask=omask)
        tl.store(hu_ptr + h_off, acc_u.to(hu_ptr.dtype.element_ty), mask=omask)
    # The activation sees h rounded to the input dtype, as an unfused GEMM -> activation would,
    # and as the backward (which recomputes act from the stored h) does.
    if GATED:
        acc_g = acc_g.to(a_ptr.dtype.element_ty).to(tl.float32)
    acc_u = acc_u.to(a_ptr.dtype.element_ty).to(tl.float32)
    if GATED:
        act = _act_fwd(acc_g, acc_u, ACT, alpha, limit)
    else:
        act = _plain_act_fwd(acc_u, ACT)
    tl.store(a_ptr + rows[:, None] * stride_as + cols[None, :] * stride_an,
             act.to(a_ptr.dtype.element_ty), mask=omask)


def _down_bwd_configs():
    """Tiles of the down-backward kernel, with ``EPI_SPLIT``: how many column slices its epilogue
    works through one after another (fewer live registers, so larger GEMM tiles fit: without a
    split, 128x128 tiles spill registers; ``python -m triton_kernels.compile_check`` shows it)."""
    return _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "EPI_SPLIT"), [
        (128, 128, 64, 4, 8, 3),  # the usual choice at Qwen3-30B-A3B geometry on the H200
        (128, 128, 64, 4, 8, 4),
        (128, 128, 32, 4, 8, 5),
        (128, 256, 64, 4, 8, 3),
        (64, 128, 64, 2, 4, 4),
        (128, 128, 64, 2, 8, 3),
        (64, 64, 64, 1, 4, 4),  # small row counts
    ], _INTERPRET_DOWN_BWD)


_INTERPRET_DOWN_BWD = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "EPI_SPLIT": 2}, num_warps=4)


@triton.jit
def _down_bwd_epilogue(acc, rows, rmask, c0, N, hg_ptr, hu_ptr, dhg_ptr, dhu_ptr, a_ptr,
                       stride_hs, stride_hn, stride_as, stride_an, alpha, limit, ACT: tl.constexpr,
                       PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, W: tl.constexpr):
    """For the [rows, c0 : c0 + W] slice of d_act (fp32 ``acc`` [BLOCK_M, W]): recompute act from h,
    store act and dh (non-gated ACT: h and dh are the up parts alone; hg and dhg are not touched).
    With PAIRS, hg and dhg are the whole interleaved ``h`` / ``dh`` [S, 2I]: their 2W columns are
    read and written as one contiguous tile."""
    cols = c0 + tl.arange(0, W)
    omask = rmask[:, None] & (cols < N)[None, :]
    if PAIRS:
        cols2 = 2 * c0 + tl.arange(0, 2 * W)
        h_off2 = rows[:, None] * stride_hs + cols2[None, :] * stride_hn
        mask2 = rmask[:, None] & (cols2 < 2 * N)[None, :]
        h2 = tl.load(hg_ptr + h_off2, mask=mask2, other=0.0).to(tl.float32)
        g, u = tl.split(tl.reshape(h2, (BLOCK_M, W, 2)))
        act, dg, du = _act_bwd(g, u, acc, ACT, alpha, limit)
        dh2 = tl.reshape(tl.join(dg, du), (BLOCK_M, 2 * W))
        tl.store(dhg_ptr + h_off2, dh2.to(dhg_ptr.dtype.element_ty), mask=mask2)
    elif ACT < FIRST_PLAIN:
        h_off = rows[:, None] * stride_hs + cols[None, :] * stride_hn
        g = tl.load(hg_ptr + h_off, mask=omask, other=0.0).to(tl.float32)
        u = tl.load(hu_ptr + h_off, mask=omask, other=0.0).to(tl.float32)
        act, dg, du = _act_bwd(g, u, acc, ACT, alpha, limit)
        tl.store(dhg_ptr + h_off, dg.to(dhg_ptr.dtype.element_ty), mask=omask)
        tl.store(dhu_ptr + h_off, du.to(dhu_ptr.dtype.element_ty), mask=omask)
    else:
        h_off = rows[:, None] * stride_hs + cols[None, :] * stride_hn
        u = tl.load(hu_ptr + h_off, mask=omask, other=0.0).to(tl.float32)
        act, du = _plain_act_bwd(u, acc, ACT)
        tl.store(dhu_ptr + h_off, du.to(dhu_ptr.dtype.element_ty), mask=omask)
    tl.store(a_ptr + rows[:, None] * stride_as + cols[None, :] * stride_an,
             act.to(a_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns [0, BLOCK_N/2) and [BLOCK_N/2, BLOCK_N) of a [BLOCK_M, BLOCK_N] tile."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.autotune(configs=_down_bwd_configs(), key=["N", "K", "S_BUCKET", "USE_TMA", "PAIRS"])
@triton.jit
def _down_bwd_act_kernel(
    dy_ptr, w_ptr, hg_ptr, hu_ptr, dhg_ptr, dhu_ptr, a_ptr, offsets_ptr,
    N, K, E, S_BUCKET, alpha, limit,
    stride_ds, stride_dk,
    stride_we, stride_wk, stride_wn, stride_w_outer,
    stride_hs, stride_hn,
    stride_as, stride_an,
    ACT: tl.constexpr, USE_TMA: tl.constexpr, W_KMAJOR: tl.constexpr, PAIRS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI_SPLIT: tl.constexpr,
):
    """d_act = dy @ w[e] (w = w_down^T view [E, H, I]; K = H, N = I), then in the epilogue:
    recompute act from h and store act [S, I] and dh (gate part to dhg, up part to dhu; a
    non-gated ACT has only the up part), in ``EPI_SPLIT`` (1, 2 or 4) column slices. With USE_TMA the GEMM tiles move by tensor descriptors
    (``tma_tile_matmul``)."""
    expert, row0, row_end, n0, valid = program_tile(offsets_ptr, N, E, BLOCK_M, BLOCK_N, BLOCK_E)
    if not valid:
        return
    rows, rmask, cols, cmask = tile_rows_cols(row0, row_end, n0, N, BLOCK_M, BLOCK_N)
    if USE_TMA:
        start, count, m0 = tma_expert_span(offsets_ptr, expert, row0, row_end)
        acc = tma_tile_matmul(dy_ptr, w_ptr, start, count, expert, m0, n0, N, K, stride_ds,
                              stride_we, stride_w_outer, W_KMAJOR, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        ks = tl.arange(0, BLOCK_K)
        d_ptrs = dy_ptr + rows[:, None] * stride_ds + ks[None, :] * stride_dk
        w_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tile_matmul(d_ptrs, w_ptrs, BLOCK_K * stride_dk, BLOCK_K * stride_wk, rmask, cmask, K,
                          IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    # ACT goes to the epilogue outside this tuple: packed into it, it would arrive as a runtime scalar
    out = (hg_ptr, hu_ptr, dhg_ptr, dhu_ptr, a_ptr, stride_hs, stride_hn, stride_as, stride_an, alpha, limit)
    if EPI_SPLIT == 1:
        _down_bwd_epilogue(acc, rows, rmask, n0, N, *out, ACT, PAIRS, BLOCK_M, BLOCK_N)
    elif EPI_SPLIT == 2:
        HALF: tl.constexpr = BLOCK_N // 2
        a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
        _down_bwd_epilogue(a0, rows, rmask, n0, N, *out, ACT, PAIRS, BLOCK_M, HALF)
        _down_bwd_epilogue(a1, rows, rmask, n0 + HALF, N, *out, ACT, PAIRS, BLOCK_M, HALF)
    else:
        tl.static_assert(EPI_SPLIT == 4, "EPI_SPLIT must be 1, 2 or 4")
        QUARTER: tl.constexpr = BLOCK_N // 4
        a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
        a00, a01 = _halves(a0, BLOCK_M, BLOCK_N // 2)
        a10, a11 = _halves(a1, BLOCK_M, BLOCK_N // 2)
        _down_bwd_epilogue(a00, rows, rmask, n0, N, *out, ACT, PAIRS, BLOCK_M, QUARTER)
        _down_bwd_epilogue(a01, rows, rmask, n0 + QUARTER, N, *out, ACT, PAIRS, BLOCK_M, QUARTER)
        _down_bwd_epilogue(a10, rows, rmask, n0 + 2 * QUARTER, N, *out, ACT, PAIRS, BLOCK_M, QUARTER)
        _down_bwd_epilogue(a11, rows, rmask, n0 + 3 * QUARTER, N, *out, ACT, PAIRS, BLOCK_M, QUARTER)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _split_cols(t: torch.Tensor, concatenated: bool):
    """(gate, up) strided views of the last dim (2I) of ``t``."""
    i = t.shape[-1] // 2
    if concatenated:
        return t[..., :i], t[..., i:]
    return t[..., 0::2], t[..., 1::2]


def _gated(act_id: int) -> bool:
    return act_id < FIRST_PLAIN.value


def _pairs(act_id: int, concatenated: bool) -> bool:
    """Gate and up columns alternate (gated, interleaved): the kernels read them as one tile."""
    return _gated(act_id) and not concatenated


def _gate_up_views(t: torch.Tensor, act_id: int, concatenated: bool):
    """(gate, up) views of the last dim of ``t``: its two halves (2I columns, gated, concatenated),
    or ``t`` itself twice (non-gated: the kernels touch only the up view; interleaved: the kernels
    read both from the whole tensor, ``PAIRS``)."""
    if _gated(act_id) and concatenated:
        return _split_cols(t, concatenated)
    return t, t


def _gate_up_act(x, w_gu, b_gu, offsets, act_id, concatenated, alpha, limit, store_h, src_rows=None):
    """x [S, H] (or, with src_rows [S], x [T, H] gathered row by row in the prologue) -> act [S, I],
    h [S, 2I] (gated) or [S, I] (non-gated)."""
    H = x.shape[1]
    S = x.shape[0] if src_rows is None else src_rows.shape[0]
    E, _, width = w_gu.shape
    I = width // 2 if _gated(act_id) else width
    act = torch.empty((S, I), dtype=x.dtype, device=x.device)
    h = torch.empty((S, width), dtype=x.dtype, device=x.device) if store_h else None
    if S == 0 or I == 0:
        return act, h
    wg, wu = _gate_up_views(w_gu, act_id, concatenated)
    bg, bu = _gate_up_views(b_gu, act_id, concatenated) if b_gu is not None else (x, x)
    hg, hu = _gate_up_views(h, act_id, concatenated) if h is not None else (act, act)
    sb = (bg.stride(0), bg.stride(1)) if b_gu is not None else (0, 0)
    ieee, upcast = _gemm_flags(x.dtype)
    grid = lambda meta: ((triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(I, meta["BLOCK_N"]),)
    pairs = _pairs(act_id, concatenated)
    use_tma = (tma_enabled() and not pairs and src_rows is None and rows_tma_eligible(x)
               and weight_tma_eligible(wg) and weight_tma_eligible(wu))  # wg, wu: views of one tensor, the same strides
    kmajor, outer = tma_weight_args(use_tma, wg)
    _gate_up_act_kernel[grid](
        x, wg, wu, bg, bu, act, hg, hu, offsets, src_rows if src_rows is not None else offsets,
        I, H, E, bucket(S), float(alpha), float(limit),
        x.stride(0), x.stride(1),
        wg.stride(0), wg.stride(1), wg.stride(2), outer,
        sb[0], sb[1],
        act.stride(0), act.stride(1),
        hg.stride(0), hg.stride(1),
        ACT=act_id, HAS_BIAS=b_gu is not None, STORE_H=store_h, GATHER=src_rows is not None,
        USE_TMA=use_tma, W_KMAJOR=kmajor, PAIRS=pairs, IEEE=ieee, UPCAST=upcast, BLOCK_E=next_pow2(E),
    )
    return act, h


def _down_bwd_act(dy, w_down, h, offsets, act_id, concatenated, alpha, limit):
    S, H = dy.shape
    E, I, _ = w_down.shape
    dh = torch.empty_like(h)
    act = torch.empty((S, I), dtype=h.dtype, device=h.device)
    if S == 0 or I == 0:
        return dh, act
    w = w_down.transpose(1, 2)  # [E, H, I]
    hg, hu = _gate_up_views(h, act_id, concatenated)
    dhg, dhu = _gate_up_views(dh, act_id, concatenated)
    ieee, upcast = _gemm_flags(dy.dtype)
    grid = lambda meta: ((triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(I, meta["BLOCK_N"]),)
    pairs = _pairs(act_id, concatenated)
    use_tma = tma_enabled() and rows_tma_eligible(dy) and weight_tma_eligible(w)
    kmajor, outer = tma_weight_args(use_tma, w)
    _down_bwd_act_kernel[grid](
        dy, w, hg, hu, dhg, dhu, act, offsets,
        I, H, E, bucket(S), float(alpha), float(limit),
        dy.stride(0), dy.stride(1),
        w.stride(0), w.stride(1), w.stride(2), outer,
        hg.stride(0), hg.stride(1),
        act.stride(0), act.stride(1),
        ACT=act_id, USE_TMA=use_tma, W_KMAJOR=kmajor, PAIRS=pairs, IEEE=ieee, UPCAST=upcast, BLOCK_E=next_pow2(E),
    )
    return dh, act


class ExpertMLP(torch.autograd.Function):
    """Autograd for the fused expert MLP on GEMM views ``w_gu [E, H, 2I]`` (non-gated: the up
    projection ``[E, H, I]``), ``w_down [E, I, H]``."""

    @staticmethod
    def forward(ctx, x, w_gu, w_down, offsets, b_gu, b_down, act_id, concatenated, alpha, limit):
        act, h = _gate_up_act(x, w_gu, b_gu, offsets, act_id, concatenated, alpha, limit, store_h=True)
        y = grouped_mm_forward(act, w_down, offsets, b_down)
        del act  # not saved: recomputed from h in the backward
        ctx.save_for_backward(x, w_gu, w_down, offsets, h)
        ctx.cfg = (act_id, concatenated, alpha, limit, b_gu is not None, b_down is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gu, w_down, offsets, h = ctx.saved_tensors
        act_id, concatenated, alpha, limit, has_bgu, has_bdown = ctx.cfg
        dy = dy.contiguous()
        dh, act = _down_bwd_act(dy, w_down, h, offsets, act_id, concatenated, alpha, limit)
        need = ctx.needs_input_grad
        dx = dw_gu = dw_down = db_gu = db_down = None
        if need[2] or (has_bdown and need[5]):
            dw_down, db_down = grouped_mm_weight_grad(act, dy, offsets, w_down, with_bias=has_bdown and need[5])
            dw_down = dw_down if need[2] else None
        del act
        if need[0]:
            dx = grouped_mm_forward(dh, w_gu.transpose(1, 2), offsets)
        if need[1] or (has_bgu and need[4]):
            dw_gu, db_gu = grouped_mm_weight_grad(x, dh, offsets, w_gu, with_bias=has_bgu and need[4])
            dw_gu = dw_gu if need[1] else None
        return dx, dw_gu, dw_down, None, db_gu, db_down, None, None, None, None


class ExpertMLPGathered(torch.autograd.Function):
    """The fused expert MLP reading token rows through ``src_rows`` in its prologue.

    Saves the token activations ``x [T, H]`` (which the caller keeps alive anyway) instead of the
    permuted copy ``[S, H]``; dx is reduced over each token's k rows in a fixed order (no atomics)."""

    @staticmethod
    def forward(ctx, x, src_rows, inv_slots, top_k, w_gu, w_down, offsets, b_gu, b_down, act_id, concatenated,
                alpha, limit):
        act, h = _gate_up_act(x, w_gu, b_gu, offsets, act_id, concatenated, alpha, limit, store_h=True,
                              src_rows=src_rows)
        y = grouped_mm_forward(act, w_down, offsets, b_down)
        del act
        ctx.save_for_backward(x, src_rows, inv_slots, w_gu, w_down, offsets, h)
        ctx.cfg = (top_k, act_id, concatenated, alpha, limit, b_gu is not None, b_down is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, src_rows, inv_slots, w_gu, w_down, offsets, h = ctx.saved_tensors
        top_k, act_id, concatenated, alpha, limit, has_bgu, has_bdown = ctx.cfg
        dy = dy.contiguous()
        dh, act = _down_bwd_act(dy, w_down, h, offsets, act_id, concatenated, alpha, limit)
        need = ctx.needs_input_grad
        dx = dw_gu = dw_down = db_gu = db_down = None
        if need[5] or (has_bdown and need[8]):
            dw_down, db_down = grouped_mm_weight_grad(act, dy, offsets, w_down, with_bias=has_bdown and need[8])
            dw_down = dw_down if need[5] else None
        del act
        if need[0]:
            dx_rows = grouped_mm_forward(dh, w_gu.transpose(1, 2), offsets)  # [S, H], expert order
            dx = _reduce(dx_rows, inv_slots, x.shape[0], top_k)  # [T, H]: sum over each token's k rows
        if need[4] or (has_bgu and need[7]):
            dw_gu, db_gu = grouped_mm_weight_grad(x, dh, offsets, w_gu, with_bias=has_bgu and need[7], src_rows=src_rows)
            dw_gu = dw_gu if need[4] else None
        return dx, None, None, None, dw_gu, dw_down, None, db_gu, db_down, None, None, None, None


def _checked_weights(who, x, gate_up, down, offsets, activation, transposed, concatenated):
    """Validate the arguments shared by the MLP entry points; returns (w_gu [E, H, 2I] view (non-gated
    activation: [E, H, I]), w_down [E, I, H] view, concatenated with its default filled in)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{who}: unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    if concatenated is None:
        concatenated = not transposed
    w_gu = gate_up if transposed else gate_up.transpose(1, 2)  # [E, H, 2I] ([E, H, I] non-gated)
    w_down = down if transposed else down.transpose(1, 2)  # [E, I, H]
    H = x.shape[1]
    E, H2, width = w_gu.shape
    gated = _gated(ACTIVATIONS[activation])
    if H2 != H or (gated and width % 2) or w_down.shape != (E, width // 2 if gated else width, H):
        n = "2I" if gated else "I"
        raise ValueError(
            f"{who}: shapes do not match: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, "
            f"down {tuple(down.shape)}, activation={activation!r}, transposed={transposed} (expected gate_up "
            f"{f'[E, H, {n}]' if transposed else f'[E, {n}, H]'} and down "
            f"{'[E, I, H]' if transposed else '[E, H, I]'})")
    if not (x.dtype == gate_up.dtype == down.dtype):
        raise TypeError(f"{who}: dtypes differ: x {x.dtype}, gate_up {gate_up.dtype}, down {down.dtype}")
    check_offsets(offsets, E, x.device)
    return w_gu, w_down, concatenated


def expert_mlp_gathered(
    x: torch.Tensor,
    sorted_slots: torch.Tensor,
    inv_slots: torch.Tensor,
    top_k: int,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offsets: torch.Tensor,
    activation: str = "swiglu",
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    transposed: bool = False,
    concatenated: Optional[bool] = None,
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
) -> torch.Tensor:
    """``expert_mlp(permute(x, sorted_slots, top_k), ...)`` without the permuted copy: the gate_up
    GEMM gathers token rows in its prologue (and so does its weight gradient).

    x [T, H] token activations; sorted_slots [S] int64 (flat slot t*k+j of each expert-sorted row)
    and inv_slots [S] its inverse (``sort_by_expert(..., return_inverse=True)``); other arguments
    as ``expert_mlp`` (non-gated "relu2": ``gate_up`` is the up projection). Returns [S, H] in expert order; differentiable w.r.t. x, weights and biases.
    """
    _check_slots(sorted_slots, x.shape[0] * top_k, "expert_mlp_gathered")
    w_gu, w_down, concatenated = _checked_weights("expert_mlp_gathered", x, gate_up, down, offsets, activation,
                                                  transposed, concatenated)
    src_rows = sorted_slots // top_k  # [S] the token of each routed row
    return ExpertMLPGathered.apply(x, src_rows, inv_slots, top_k, w_gu, w_down, offsets, gate_up_bias, down_bias,
                                   ACTIVATIONS[activation], concatenated, alpha, limit)


def expert_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offsets: torch.Tensor,
    activation: str = "swiglu",
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    transposed: bool = False,
    concatenated: Optional[bool] = None,
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
) -> torch.Tensor:
    """Fused expert MLP over expert-sorted rows: ``down(act(x @ gate_up + b_gu)) + b_down``.

    Args:
        x: [S, H] rows sorted by expert.
        gate_up: [E, 2I, H] (standard) or [E, H, 2I] (``transposed=True``, GPT-OSS); for a
            non-gated activation ("relu2") the up projection [E, I, H] or [E, H, I] (``transposed``).
        down: [E, H, I] (standard) or [E, I, H] (``transposed=True``).
        offsets: int32 [E] cumulative end offsets, ``offsets[-1] == S``.
        activation: "swiglu", "gpt_oss" (uses ``alpha``, ``limit``) or "relu2" (non-gated).
        gate_up_bias: optional [E, 2I] in the same column order as gate_up's 2I dim ([E, I] non-gated).
        down_bias: optional [E, H].
        transposed: HF ``is_transposed`` (GPT-OSS layout).
        concatenated: gate/up halves ``[gate; up]`` (True) or interleaved (False); default
            ``not transposed`` (the HF models' conventions); ignored for a non-gated activation.
    Returns:
        [S, H] in x.dtype; differentiable w.r.t. x, gate_up, down and the biases.
    """
    w_gu, w_down, concatenated = _checked_weights("expert_mlp", x, gate_up, down, offsets, activation,
                                                  transposed, concatenated)
    act_id = ACTIVATIONS[activation]
    params = (x, gate_up, down, gate_up_bias, down_bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)):
        # Inference: no pre-activation is stored.
        act, _ = _gate_up_act(x, w_gu, gate_up_bias, offsets, act_id, concatenated, alpha, limit, store_h=False)
        return grouped_mm_forward(act, w_down, offsets, down_bias)
    return ExpertMLP.apply(x, w_gu, w_down, offsets, gate_up_bias, down_bias, act_id, concatenated, alpha, limit)
