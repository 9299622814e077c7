"""Row kernels of the chunked linear + cross-entropy loss (``moe_lab.training.fused_ce``): they read the
LM head's logits once, in their own dtype (bf16), instead of through several float32 copies.

* ``logsumexp_and_target(logits, labels)``: per row of logits [N, V], the float32 log-sum-exp and the
  label's logit (0 where the label is outside [0, V)); online max/sum over V in blocks. The
  log-sum-exp is ``max + log(sum(exp(x - max)))`` without torch.logsumexp's special case for an
  infinite max, as v5's loss (``log_softmax``) computes it: NaN for a row with a NaN or a +inf
  logit, or with only -inf logits (where torch.logsumexp gives +inf / -inf).
* ``softmax_grad_(logits, lse, labels, row_scale, vocab_start)``: in place over a vocabulary slice
  [N, v] of the logits: (softmax - one_hot(label)) * row_scale, in the logits' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting


@triton.jit
def _lse_target_kernel(x_ptr, labels_ptr, lse_ptr, target_ptr, V, stride_x, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_V,), tl.float32)
    target = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        x = tl.load(x_ptr + row * stride_x + c, mask=c < V, other=float("-inf")).to(tl.float32)
        # NaN propagates into the lane's max (the default maximum drops it: a NaN logit first in its
        # lane would vanish), and from there into its sum
        new_max = tl.maximum(run_max, x, propagate_nan=tl.PropagateNan.ALL)
        # a lane whose running max is still -inf (padding, or -inf logits so far) adds nothing: this
        # avoids exp(-inf - -inf) = NaN in both terms
        empty = new_max == float("-inf")
        scale = tl.where(empty, 0.0, tl.exp(run_max - new_max))
        run_sum = run_sum * scale + tl.where(empty, 0.0, tl.exp(x - new_max))
        run_max = new_max
        target += tl.where((c == label) & (c < V), x, 0.0)
    row_max = tl.max(run_max, 0)
    total = tl.sum(run_sum * tl.exp(run_max - row_max), 0)
    tl.store(lse_ptr + row, row_max + tl.log(total))
    tl.store(target_ptr + row, tl.sum(target, 0))


@triton.jit
def _softmax_grad_kernel(x_ptr, lse_ptr, labels_ptr, scale_ptr, v, vocab_start, stride_x, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = c < v
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)
    scale = tl.load(scale_ptr + row)
    # x <= lse exactly, but the logits here come from another GEMM than the ones lse was taken
    # over: rounding could put x above lse, and for huge logits (1e30) exp would overflow. NaN stays.
    p = tl.exp(tl.minimum(x - lse, 0.0, propagate_nan=tl.PropagateNan.ALL))
    grad = p - tl.where(c + vocab_start == label, 1.0, 0.0)
    tl.store(x_ptr + row * stride_x + c, (grad * scale).to(x_ptr.dtype.element_ty), mask=mask)


def _check_rows(logits: torch.Tensor, labels: torch.Tensor, name: str, **per_row: torch.Tensor) -> None:
    """logits [N, V] with contiguous rows; labels [N] integer; each per-row tensor [N] float32;
    all contiguous and on the logits' device."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"{name}: logits must be [N, V] with contiguous rows, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    n = logits.shape[0]
    if labels.shape != (n,) or labels.dtype not in (torch.int32, torch.int64) or (n and labels.stride(0) != 1):
        raise ValueError(f"{name}: labels must be a contiguous integer [N={n}], got {labels.dtype} "
                         f"{tuple(labels.shape)} strides {labels.stride()}")
    for arg, t in per_row.items():
        if t.shape != (n,) or t.dtype != torch.float32 or (n and t.stride(0) != 1):
            raise ValueError(f"{name}: {arg} must be a contiguous float32 [N={n}], got {t.dtype} {tuple(t.shape)}")
    for arg, t in (("labels", labels), *per_row.items()):
        if t.device != logits.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, the logits on {logits.device}")


def logsumexp_and_target(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V], labels [N] int -> (lse [N] float32, logits[i, labels[i]] [N] float32)."""
    _check_rows(logits, labels, "logsumexp_and_target")
    n, vocab = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    target = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block = 128 if interpreting() else 4096
        _lse_target_kernel[(n,)](logits, labels, lse, target, vocab, logits.stride(0), BLOCK_V=block,
                                 num_warps=8)
    return lse, target


def softmax_grad_(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
                  vocab_start: int) -> torch.Tensor:
    """In place: logits [N, v] (columns vocab_start ... vocab_start + v - 1 of the vocabulary) become
    (exp(logits - lse) - [label == column]) * row_scale; returns them."""
    _check_rows(logits, labels, "softmax_grad_", lse=lse, row_scale=row_scale)
    n, v = logits.shape
    if n and v:
        block = 128 if interpreting() else 2048
        _softmax_grad_kernel[(n, triton.cdiv(v, block))](logits, lse, labels, row_scale, v, vocab_start,
                                                         logits.stride(0), BLOCK_V=block, num_warps=8)
    return logits
