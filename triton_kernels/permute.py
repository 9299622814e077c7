"""Routing permutation: sort routed slots by expert, gather token rows into that order, and
combine expert outputs back into tokens.

Shapes: ``ids [T, k]`` expert of each (token, choice), flat slot ``t*k + j``; S = T*k routed rows.
- ``sort_by_expert(ids, E)``: a counting sort in three kernels (per-chunk histograms; counts,
  offsets and each chunk's first row per expert, in one program; per-slot ranks); the order equals a STABLE sort of the flattened ids (ties by slot index ascending), so it
  is deterministic and matches ``torch.argsort(ids.flatten(), stable=True)``.
- ``permute(x, sorted_slots, k)``: ``x[sorted_slots // k]`` -> [S, H]; backward sums the k rows of
  each token in fixed order j = 0..k-1 through the inverse permutation (no float atomics).
- ``combine(y, weights, sorted_slots)``: ``out[t] = sum_j weights[t, j] * y[inv[t*k+j]]`` ->
  [T, H], fp32 accumulation, j ascending; backward gives ``dy`` rows (a weighted gather) and
  ``dweights[t, j] = <dout[t], y[inv[t*k+j]]>`` (fp32 dot products).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2


# ---------------------------------------------------------------------------------------------
# Counting sort
# ---------------------------------------------------------------------------------------------
@triton.jit
def _chunk_hist_kernel(ids_ptr, hist_ptr, S, E, CHUNK, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[c, e] = #slots of chunk c (slots c*CHUNK ... +CHUNK) routed to expert e, SUB slots at a time."""
    c = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s0 in range(0, CHUNK, SUB):
        slots = c.to(tl.int64) * CHUNK + s0 + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + slots, mask=slots < S, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + c * E + experts, counts, mask=experts < E)


@triton.jit
def _chunk_scatter_kernel(ids_ptr, base_ptr, sorted_ptr, inv_ptr, S, E, CHUNK,
                          SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """dest(slot) = base[c, e] + #earlier slots of chunk c with the same expert e;
    sorted[dest] = slot, inv[slot] = dest. base[c, e] = first sorted row for (chunk c, expert e).
    The chunk is walked SUB slots at a time, its bases advancing by each sub-block's counts."""
    c = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    base = tl.load(base_ptr + c * E + experts, mask=experts < E, other=0)
    for s0 in range(0, CHUNK, SUB):
        slots = c.to(tl.int64) * CHUNK + s0 + tl.arange(0, SUB)
        smask = slots < S
        ids = tl.load(ids_ptr + slots, mask=smask, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - 1  # rank within the sub-block, on the hot column
        dest = tl.sum(tl.where(onehot != 0, before + base[None, :], 0), axis=1).to(tl.int64)
        tl.store(sorted_ptr + dest, slots, mask=smask)
        tl.store(inv_ptr + slots, dest, mask=smask)
        base += tl.sum(onehot, axis=0)


@triton.jit
def _chunk_bases_kernel(hist_ptr, counts_ptr, offsets_ptr, base_ptr, n_chunks, E,
                        BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program, from hist [n_chunks, E]: counts[e] (int64), offsets[e] = cumulative end rows
    (int32) and base[c, e] = (rows of experts < e) + (rows of expert e in chunks < c) (int64)."""
    experts = tl.arange(0, BLOCK_E)
    emask = experts < E
    counts = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for c0 in range(0, n_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        mask = (chunks < n_chunks)[:, None] & emask[None, :]
        h = tl.load(hist_ptr + chunks[:, None] * E + experts[None, :], mask=mask, other=0).to(tl.int64)
        counts += tl.sum(h, axis=0)
    ends = tl.cumsum(counts, 0)
    tl.store(counts_ptr + experts, counts, mask=emask)
    tl.store(offsets_ptr + experts, ends.to(tl.int32), mask=emask)
    carry = ends - counts
    for c0 in range(0, n_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        mask = (chunks < n_chunks)[:, None] & emask[None, :]
        h = tl.load(hist_ptr + chunks[:, None] * E + experts[None, :], mask=mask, other=0).to(tl.int64)
        tl.store(base_ptr + chunks[:, None] * E + experts[None, :], carry[None, :] + tl.cumsum(h, 0) - h, mask=mask)
        carry += tl.sum(h, axis=0)


# At most this many chunks: the bases kernel scans the chunk histograms in one program, so their
# number bounds its serial work (at 65,536 tokens the whole sort took 0.73 ms over 4096 chunks of 128
# slots, 0.46 ms over 256 chunks of 2048: runs h200x1-triton-kernels-8 and -9 on the H200).
MAX_CHUNKS = 256


def _sort_block(num_experts: int) -> int:
    """Slots per sub-block: the one-hot tile [SUB, BLOCK_E] stays at 16K elements (64 KiB of
    registers over 256 threads)."""
    be = next_pow2(num_experts)
    if interpreting():
        return 1024  # few, large programs under the interpreter
    return max(16, min(1024, 16384 // be))


def _chunking(S: int, num_experts: int) -> tuple[int, int]:
    """(slots per chunk, sub-block): chunks are whole sub-blocks, at most MAX_CHUNKS of them."""
    sub = _sort_block(num_experts)
    per_chunk = triton.cdiv(triton.cdiv(max(S, 1), sub), MAX_CHUNKS)
    return per_chunk * sub, sub


def _chunk_histograms(ids_flat: torch.Tensor, num_experts: int):
    S = ids_flat.numel()
    chunk, sub = _chunking(S, num_experts)
    n_chunks = triton.cdiv(S, chunk)
    hist = torch.empty((n_chunks, num_experts), dtype=torch.int32, device=ids_flat.device)
    if n_chunks:
        _chunk_hist_kernel[(n_chunks,)](ids_flat, hist, S, num_experts, chunk, SUB=sub,
                                        BLOCK_E=next_pow2(num_experts), num_warps=8)
    return hist, chunk, sub


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [T, k] (values in [0, E)) -> counts int64 [E] (a deterministic histogram)."""
    hist, _, _ = _chunk_histograms(ids.reshape(-1).contiguous(), num_experts)
    return hist.sum(0, dtype=torch.int64)


def sort_by_expert(ids: torch.Tensor, num_experts: int, return_inverse: bool = False):
    """Expert-sorted order of the routed slots.

    Args:
        ids: [T, k] int32/int64 expert ids in [0, E) (out-of-range ids are not allowed).
        num_experts: E.
        return_inverse: also return ``inv_slots`` (the sorted row of each flat slot).
    Returns:
        sorted_slots int64 [S] (flat slot t*k+j of each sorted row; stable in the slot index),
        counts int64 [E], offsets int32 [E] (cumulative end offsets) [, inv_slots int64 [S]].
    """
    ids_flat = ids.reshape(-1).contiguous()
    S = ids_flat.numel()
    E = num_experts
    hist, chunk, sub = _chunk_histograms(ids_flat, E)
    # counts, offsets and base[c, e] = (rows of experts < e) + (rows of expert e in chunks < c) in
    # one launch (torch's cumsum over the chunks alone took 48 us a layer on the H200: profile of run
    # h200x1-breakdown-5, tensor_kernel_scan_outer_dim)
    counts = torch.empty(E, dtype=torch.int64, device=ids.device)
    offsets = torch.empty(E, dtype=torch.int32, device=ids.device)
    base = torch.empty(hist.shape, dtype=torch.int64, device=ids.device)
    if E:
        _chunk_bases_kernel[(1,)](hist, counts, offsets, base, hist.shape[0], E,
                                  BLOCK_C=max(1, 8192 // next_pow2(E)), BLOCK_E=next_pow2(E), num_warps=8)
    sorted_slots = torch.empty(S, dtype=torch.int64, device=ids.device)
    inv = torch.empty(S, dtype=torch.int64, device=ids.device)
    if S:
        _chunk_scatter_kernel[(hist.shape[0],)](ids_flat, base, sorted_slots, inv, S, E, chunk,
                                                SUB=sub, BLOCK_E=next_pow2(E), num_warps=8)
    if return_inverse:
        return sorted_slots, counts, offsets, inv
    return sorted_slots, counts, offsets


def inverse_permutation(sorted_slots: torch.Tensor) -> torch.Tensor:
    """inv_slots[sorted_slots[r]] = r (int64 [S]); a scatter of a permutation, deterministic."""
    inv = torch.empty_like(sorted_slots)
    inv.scatter_(0, sorted_slots, torch.arange(sorted_slots.numel(), device=sorted_slots.device))
    return inv


# ---------------------------------------------------------------------------------------------
# Row movement
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gather_kernel(src_ptr, slots_ptr, w_ptr, out_ptr, R, H, k,
                   stride_src, stride_out,
                   HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r] = src[slots[r] // k] (* w_flat[slots[r]]): permute, and combine's dy."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < R
    mask = rmask[:, None] & (cols < H)[None, :]
    slot = tl.load(slots_ptr + rows, mask=rmask, other=0)
    tok = slot // k
    val = tl.load(src_ptr + tok[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
        val = val.to(tl.float32) * w[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :],
             val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, T, H, k,
                   stride_y, stride_out,
                   HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_{j=0..k-1} (w[t, j] *) y[inv[t*k + j]], fp32, j ascending: combine, and
    permute's backward."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = toks < T
    mask = tmask[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in range(k):
        slot = toks.to(tl.int64) * k + j
        row = tl.load(inv_ptr + slot, mask=tmask, other=0)
        val = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + slot, mask=tmask, other=0.0).to(tl.float32)
            val = val * w[:, None]
        acc += val
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_dw_kernel(y_ptr, inv_ptr, dout_ptr, dw_ptr, T, H, k,
                       stride_y, stride_d,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """dw[t, j] = sum_h dout[t, h] * y[inv[t*k + j], h] (fp32, fixed order)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    hs = tl.arange(0, BLOCK_H)
    for j in range(k):
        slot = toks.to(tl.int64) * k + j
        row = tl.load(inv_ptr + slot, mask=tmask, other=0)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + hs
            mask = tmask[:, None] & (cols < H)[None, :]
            yv = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
            dv = tl.load(dout_ptr + toks.to(tl.int64)[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(yv.to(tl.float32) * dv.to(tl.float32), axis=1)
        tl.store(dw_ptr + slot, acc.to(dw_ptr.dtype.element_ty), mask=tmask)


def _row_blocks(H: int):
    """(BLOCK_R, BLOCK_H, num_warps) for the row-movement kernels."""
    if interpreting():
        return 64, next_pow2(min(max(H, 16), 1024)), 4
    bh = min(next_pow2(max(H, 16)), 1024)
    return max(1, 4096 // bh), bh, 4


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _gather(src, slots, k, w=None):
    R, H = slots.numel(), src.shape[1]
    dtype = src.dtype
    out = torch.empty((R, H), dtype=dtype, device=src.device)
    if R == 0 or H == 0:
        return out
    src = _rows_contig(src)
    br, bh, nw = _row_blocks(H)
    wp = w.reshape(-1).contiguous() if w is not None else src
    _gather_kernel[(triton.cdiv(R, br), triton.cdiv(H, bh))](
        src, slots, wp, out, R, H, k, src.stride(0), out.stride(0),
        HAS_W=w is not None, BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
    return out


def _reduce(y, inv, T, k, w=None):
    H = y.shape[1]
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    if k == 0:
        return out.zero_()
    y = _rows_contig(y)
    br, bh, nw = _row_blocks(H)
    wp = w.reshape(-1).contiguous() if w is not None else y
    _reduce_kernel[(triton.cdiv(T, br), triton.cdiv(H, bh))](
        y, inv, wp, out, T, H, k, y.stride(0), out.stride(0),
        HAS_W=w is not None, BLOCK_T=br, BLOCK_H=bh, num_warps=nw)
    return out


def _combine_dw(y, inv, dout, T, k, dtype):
    dw = torch.empty((T, k), dtype=dtype, device=y.device)
    if T == 0 or k == 0:
        return dw
    H = y.shape[1]
    if H == 0:
        return dw.zero_()
    y, dout = _rows_contig(y), _rows_contig(dout)
    # 4 tokens a program: at 4096 tokens that is 1024 programs. 32 gave 128 programs, one per SM with
    # 4 warps; on the H200 combine fwd+bwd at 4096 tokens then ran at 1.07 TB/s (0.41 ms, of which
    # forward 0.10; runs/h200x1-triton-kernels/run1-bench.log). Not yet re-measured.
    bt = 4
    bh = next_pow2(min(max(H, 16), 1024)) if interpreting() else min(next_pow2(max(H, 16)), 512)
    _combine_dw_kernel[(triton.cdiv(T, bt),)](
        y, inv, dout, dw, T, H, k, y.stride(0), dout.stride(0), BLOCK_T=bt, BLOCK_H=bh, num_warps=4)
    return dw


class Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sorted_slots, inv_slots, top_k):
        ctx.save_for_backward(inv_slots)
        ctx.T, ctx.k = x.shape[0], top_k
        return _gather(x, sorted_slots, top_k)

    @staticmethod
    def backward(ctx, dy):
        (inv,) = ctx.saved_tensors
        return _reduce(dy, inv, ctx.T, ctx.k), None, None, None


class Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, sorted_slots, inv_slots):
        ctx.save_for_backward(y, weights, sorted_slots, inv_slots)
        T, k = weights.shape
        return _reduce(y, inv_slots, T, k, weights)

    @staticmethod
    def backward(ctx, dout):
        y, weights, sorted_slots, inv = ctx.saved_tensors
        T, k = weights.shape
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy = _gather(dout, sorted_slots, k, weights).to(y.dtype)
        if ctx.needs_input_grad[1]:
            dw = _combine_dw(y, inv, dout, T, k, weights.dtype)
        return dy, dw, None, None


def _check_slots(sorted_slots, S, who):
    if sorted_slots.dtype != torch.int64 or sorted_slots.dim() != 1 or sorted_slots.numel() != S:
        raise ValueError(f"{who}: sorted_slots must be int64 [S={S}], got {sorted_slots.dtype} "
                         f"{tuple(sorted_slots.shape)}")


def permute(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int,
            inv_slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather token rows into expert order: x [T, H] -> [S, H], row r = x[sorted_slots[r] // k].

    sorted_slots: int64 [S = T*k] from sort_by_expert; inv_slots: its inverse (computed if None).
    Backward: dx[t] = sum_j dy[inv[t*k+j]] in fp32, j ascending (deterministic).
    """
    _check_slots(sorted_slots, x.shape[0] * top_k, "permute")
    if inv_slots is None:
        inv_slots = inverse_permutation(sorted_slots)
    return Permute.apply(x, sorted_slots, inv_slots, top_k)


def combine(y: torch.Tensor, weights: torch.Tensor, sorted_slots: torch.Tensor,
            inv_slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Un-permute and weight: y [S, H] (expert order), weights [T, k] -> out [T, H] in y.dtype,
    ``out[t] = sum_j weights[t, j] * y[inv[t*k+j]]`` with fp32 accumulation, j ascending.
    Differentiable w.r.t. y and weights (dweights in weights.dtype)."""
    T, k = weights.shape
    _check_slots(sorted_slots, T * k, "combine")
    if y.shape[0] != T * k:
        raise ValueError(f"combine: y has {y.shape[0]} rows, weights imply S = {T}*{k} = {T * k}")
    if inv_slots is None:
        inv_slots = inverse_permutation(sorted_slots)
    return Combine.apply(y, weights, sorted_slots, inv_slots)
