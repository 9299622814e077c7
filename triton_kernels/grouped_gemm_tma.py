"""Experimental: the grouped GEMMs with tiles moved by tensor descriptors (Hopper's tensor-memory
accelerator, TMA) instead of pointer loads. Off by default (``triton_kernels.settings.configure(tma=True)``
turns them on where the tensors allow it: 16-bit, unit inner stride, 16-byte aligned rows); the
pointer kernels of ``grouped_gemm`` are the default because these were slower inside the MoE block
on the H200 (``results/NOTES.md``), though faster alone for some shapes.

- ``_grouped_mm_tma_kernel``: the forward / input-gradient grouped GEMM by descriptors.
- ``_grouped_mm_dw_tma_kernel``: the weight gradient by descriptors (``grouped_mm_weight_grad(impl="tma")``).
- device helpers (``tma_rows_desc``, ``tma_weight_desc``, ``tma_tile_matmul``, ...) that the fused
  expert-MLP kernels use under their ``USE_TMA`` switch.
Shapes and semantics are ``grouped_gemm``'s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouped_gemm import (
    _INTERPRET_DW, _INTERPRET_FWD, _KNS, _MNK, _configs, bucket, dw_program_tile, mma, next_pow2, program_tile,
    store_dw_tile,
)

_empty = torch.empty  # bound at import: the scratch is raw bytes, whatever a test does to torch.empty


def tma_enabled() -> bool:
    """``settings.configure(tma=True)``: the GEMM tiles move by tensor descriptors (Hopper's tensor-memory
    accelerator) where the tensors allow it: the plain grouped GEMM (``_grouped_mm_tma_kernel``) and
    the fused expert-MLP kernels (``expert_mlp``, without the gather). The weight gradient stays on
    the pointer kernel (its descriptor version, ``grouped_mm_weight_grad(impl="tma")``, is slower
    on the H200; ``results/NOTES.md``). Experimental, off by default."""
    from .settings import current

    return current().tma

def _tma_configs():
    return _configs(_MNK, [  # the pointer kernel's usual choices
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (64, 128, 64, 4, 4),
    ], _INTERPRET_FWD)

def _dw_tma_configs():
    return _configs(_KNS, [
        (128, 128, 32, 4, 4),  # the pointer kernel's usual choice
        (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 3),
        (64, 128, 64, 4, 4),
    ], _INTERPRET_DW)

@triton.jit
def tma_expert_span(offsets_ptr, expert, row0, row_end):
    """(first row int64, row count int32, this tile's first row within the expert int32)."""
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
    return start, (row_end - start).to(tl.int32), (row0 - start).to(tl.int32)

@triton.jit
def tma_rows_desc(x_ptr, start, count, stride_xs, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Descriptor of one expert's rows ``x[start:start + count, :K]`` (unit column stride): a load
    past the last row reads zeros, a store stops there."""
    return tl.make_tensor_descriptor(x_ptr + start * stride_xs, shape=[count, K], strides=[stride_xs, 1],
                                     block_shape=[BLOCK_M, BLOCK_K])

@triton.jit
def tma_weight_desc(w_ptr, expert, stride_we, stride_w_outer, N, K, W_KMAJOR: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Descriptor of one expert's weight ``[K, N]`` (unit N stride, ``stride_w_outer`` its K stride)
    or, with ``W_KMAJOR``, of the ``[N, K]`` matrix it is the transpose view of. (The two branches
    return descriptors of different block shapes: the compiler accepts that only as if / else.)"""
    if W_KMAJOR:
        desc = tl.make_tensor_descriptor(w_ptr + expert * stride_we, shape=[N, K], strides=[stride_w_outer, 1],
                                         block_shape=[BLOCK_N, BLOCK_K])
    else:
        desc = tl.make_tensor_descriptor(w_ptr + expert * stride_we, shape=[K, N], strides=[stride_w_outer, 1],
                                         block_shape=[BLOCK_K, BLOCK_N])
    return desc

@triton.jit
def tma_load_weight(w_desc, k0, n0, W_KMAJOR: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile at (k0, n0)."""
    if W_KMAJOR:
        tile = tl.trans(w_desc.load([n0, k0]))
    else:
        tile = w_desc.load([k0, n0])
    return tile

@triton.jit
def tma_tile_matmul(x_ptr, w_ptr, start, count, expert, m0, n0, N, K, stride_xs, stride_we, stride_w_outer,
                    W_KMAJOR: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = x[start + m0 + (0..BLOCK_M), :] @ w[expert][:, n0 + (0..BLOCK_N)] with
    both tiles moved by tensor descriptors (``tma_rows_desc``, ``tma_weight_desc``): rows past the
    expert's last one and columns past N read as zeros."""
    x_desc = tma_rows_desc(x_ptr, start, count, stride_xs, K, BLOCK_M, BLOCK_K)
    w_desc = tma_weight_desc(w_ptr, expert, stride_we, stride_w_outer, N, K, W_KMAJOR, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = mma(x_desc.load([m0, k0]), tma_load_weight(w_desc, k0, n0, W_KMAJOR), acc, False, UPCAST)
    return acc

@triton.autotune(configs=_tma_configs(), key=["N", "K", "S_BUCKET", "W_KMAJOR"])
@triton.jit
def _grouped_mm_tma_kernel(
    x_ptr, w_ptr, y_ptr, b_ptr, offsets_ptr,
    N, K, E, S_BUCKET,
    stride_xs, stride_we, stride_w_outer, stride_ys, stride_be, stride_bn,
    HAS_BIAS: tl.constexpr, W_KMAJOR: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``_grouped_mm_kernel`` with tiles moved by tensor descriptors (TMA on Hopper). Each program
    describes its expert's rows of x and y ([count, K], [count, N]) and its expert's weight, so
    loads past the expert's last row read zeros and the store stops there. x and y have unit column
    stride; w[e] is [K, N] with unit N stride (``W_KMAJOR`` False, ``stride_w_outer`` = its K stride)
    or the transpose view of an [N, K] matrix with unit K stride (True, ``stride_w_outer`` = N stride)."""
    expert, row0, row_end, n0, valid = program_tile(offsets_ptr, N, E, BLOCK_M, BLOCK_N, BLOCK_E)
    if not valid:
        return
    start, count, m0 = tma_expert_span(offsets_ptr, expert, row0, row_end)
    y_desc = tma_rows_desc(y_ptr, start, count, stride_ys, N, BLOCK_M, BLOCK_N)
    acc = tma_tile_matmul(x_ptr, w_ptr, start, count, expert, m0, n0, N, K, stride_xs, stride_we, stride_w_outer,
                          W_KMAJOR, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        cols = n0 + tl.arange(0, BLOCK_N)
        bias = tl.load(b_ptr + expert * stride_be + cols * stride_bn, mask=cols < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_desc.store([m0, n0], acc.to(y_ptr.dtype.element_ty))

@triton.autotune(configs=_dw_tma_configs(), key=["K", "N", "S_BUCKET"])
@triton.jit
def _grouped_mm_dw_tma_kernel(
    x_ptr, dy_ptr, dw_ptr, db_ptr, offsets_ptr,
    K, N, S_BUCKET,
    stride_xs, stride_ds,
    stride_we, stride_wk, stride_wn,
    stride_be, stride_bn,
    HAS_DBIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """``_grouped_mm_dw_kernel`` (without the gather) with row tiles moved by tensor descriptors:
    each program describes its expert's rows of x [count, K] and dy [count, N] (unit column
    strides), so the last row tile reads zeros past the expert's end instead of masking."""
    e, pid_k, k0, n0, start, end = dw_program_tile(offsets_ptr, K, N, BLOCK_K, BLOCK_N)
    count = end - start
    start64 = start.to(tl.int64)
    rows_desc = tl.maximum(count, 1)  # an empty expert's descriptor is never read
    x_desc = tma_rows_desc(x_ptr, start64, rows_desc, stride_xs, K, BLOCK_S, BLOCK_K)
    dy_desc = tma_rows_desc(dy_ptr, start64, rows_desc, stride_ds, N, BLOCK_S, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s0 in range(0, count, BLOCK_S):
        xt = tl.trans(x_desc.load([s0, k0]))
        g = dy_desc.load([s0, n0])
        acc = mma(xt, g, acc, False, UPCAST)
        if HAS_DBIAS:
            dbias += tl.sum(g.to(tl.float32), axis=0)
    store_dw_tile(dw_ptr, db_ptr, e, pid_k, k0, n0, K, N, acc, dbias, stride_we, stride_wk, stride_wn,
                  stride_be, stride_bn, HAS_DBIAS, BLOCK_K, BLOCK_N)

def _describable(t: torch.Tensor, outer_strides) -> bool:
    """A non-empty 16-bit float tensor whose base address and given strides are positive multiples of
    16 bytes (a broadcast, zero stride cannot be described)."""
    return (t.dtype in (torch.bfloat16, torch.float16) and t.numel() > 0 and t.data_ptr() % 16 == 0
            and all(st > 0 and (st * t.element_size()) % 16 == 0 for st in outer_strides))

def rows_tma_eligible(*row_tensors: torch.Tensor) -> bool:
    """Whether [rows, cols] tensors can be read by tensor descriptors: unit column stride, rows that
    do not overlap, 16-bit, 16-byte aligned rows."""
    return all(t.stride(1) == 1 and t.stride(0) >= t.shape[1] and _describable(t, (t.stride(0),))
               for t in row_tensors)

def weight_tma_eligible(w: torch.Tensor) -> bool:
    """Whether a weight view w [E, K, N] can be read by tensor descriptors: unit stride along N or K,
    its other strides 16-byte multiples."""
    if w.stride(2) != 1 and w.stride(1) != 1:
        return False
    return _describable(w, (w.stride(0), weight_descriptor_layout(w)[1]))

def tma_eligible(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``_grouped_mm_tma_kernel`` can take these tensors (rows_tma_eligible, weight_tma_eligible)."""
    return rows_tma_eligible(x, y) and weight_tma_eligible(w)

def _descriptor_scratch(size: int, alignment: int, stream):
    """Global memory where a kernel writes its tensor descriptors (Triton asks for it by size; the
    caching allocator's 512-byte alignment covers Triton's 128). On the current device, where
    Triton launches; the interpreter never asks."""
    return _empty(size, dtype=torch.int8, device="cuda")

def _ensure_descriptor_allocator() -> None:
    """Give Triton the scratch allocator device-side descriptors need, unless this thread already
    has one (the host program's or another library's is left in place)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton layout: set ours
        pass
    triton.set_allocator(_descriptor_scratch)

def weight_descriptor_layout(w: torch.Tensor) -> tuple[bool, int]:
    """(W_KMAJOR, stride_w_outer) of a weight view w [E, K, N] for ``tma_tile_matmul``: K-major when
    N is not the unit-stride dimension."""
    kmajor = w.stride(2) != 1
    return kmajor, (w.stride(2) if kmajor else w.stride(1))

def tma_weight_args(use_tma: bool, w: torch.Tensor) -> tuple[bool, int]:
    """(W_KMAJOR, stride_w_outer) for a kernel with a ``USE_TMA`` switch; readies Triton's descriptor
    scratch when it is on. Off, W_KMAJOR is False whatever the layout (one compiled variant)."""
    if not use_tma:
        return False, 0
    _ensure_descriptor_allocator()
    return weight_descriptor_layout(w)

def launch_tma_forward(kernel, grid, x, w, y, b, offsets, sb, has_bias: bool, upcast: bool, **meta) -> None:
    """Launch ``kernel`` (the autotuned TMA kernel, or its ``.fn`` with explicit ``meta`` in tests)."""
    kmajor, outer = tma_weight_args(True, w)
    E = w.shape[0]
    kernel[grid](
        x, w, y, b, offsets,
        w.shape[2], x.shape[1], E, bucket(x.shape[0]),
        x.stride(0), w.stride(0), outer, y.stride(0), sb[0], sb[1],
        HAS_BIAS=has_bias, W_KMAJOR=kmajor, UPCAST=upcast, BLOCK_E=next_pow2(E), **meta,
    )


def launch_dw_tma(grid, x, dy, dw, dbp, offsets, sb, with_bias: bool, upcast: bool) -> None:
    """``grouped_mm_weight_grad(impl="tma")``'s launch: dw [E, K, N] (and dbias) from rows x, dy."""
    _ensure_descriptor_allocator()
    _grouped_mm_dw_tma_kernel[grid](
        x, dy, dw, dbp, offsets,
        dw.shape[1], dw.shape[2], bucket(dy.shape[0]),
        x.stride(0), dy.stride(0),
        dw.stride(0), dw.stride(1), dw.stride(2),
        sb[0], sb[1],
        HAS_DBIAS=with_bias, UPCAST=upcast,
    )
