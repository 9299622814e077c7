"""Token permutation: group the T*k (token, slot) pairs by expert, and the weighted combine back.

A routed row is one (token, slot) pair; the flat slot index of token t's j-th choice is t*k + j.
Rows are ordered by expert, ties by flat slot index (a stable sort): every backend produces this
same order, so their outputs agree row for row.

Shapes: T tokens, H hidden, E experts, k experts per token, S = T*k routed rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import require_all


@dataclass
class Permutation:
    """The expert-sorted order of the routed rows.

    slot_of_row: [S] int64, flat slot (t*k + j) of each expert-sorted row.
    counts: [E] int64, rows per expert.
    offsets: [E] int32, cumulative end offsets (offsets[e] = rows of experts 0..e), as grouped GEMMs take them.
    num_tokens, top_k: T and k.
    inverse: [S] int64 or None, the sorted row of each flat slot (when the permutation stage made it).
    """

    slot_of_row: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int
    top_k: int
    inverse: torch.Tensor | None = None

    @property
    def token_of_row(self) -> torch.Tensor:
        """[S] int64: the token each sorted row came from."""
        return self.slot_of_row // self.top_k

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    def expert_of_row(self) -> torch.Tensor:
        """[S] int64: the expert each sorted row goes to."""
        experts = torch.arange(self.num_experts, device=self.counts.device)
        return torch.repeat_interleave(experts, self.counts, output_size=self.slot_of_row.numel())


def _finish(slot_of_row: torch.Tensor, counts: torch.Tensor, ids: torch.Tensor) -> Permutation:
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)
    return Permutation(slot_of_row, counts, offsets, ids.shape[0], ids.shape[1])


def _check_ids(ids: torch.Tensor, num_experts: int) -> None:
    """Shape and range of expert ids: a ValueError on the CPU (or with MOE_LAB_HOST_CHECKS=1), a
    device-side assertion on a GPU (see ``moe_lab._checks``)."""
    if ids.dim() != 2:
        raise ValueError(f"expert ids must be [tokens, top_k], got shape {tuple(ids.shape)}")
    if ids.numel():
        require_all((ids >= 0) & (ids < num_experts), f"expert ids must lie in [0, {num_experts})",
                    lambda: f"got [{int(ids.min())}, {int(ids.max())}]")


def plan_eager(ids: torch.Tensor, num_experts: int) -> Permutation:
    """Reference: ids [T, k] -> Permutation, one expert at a time (readable, slow)."""
    _check_ids(ids, num_experts)
    flat = ids.reshape(-1)
    rows = [torch.nonzero(flat == expert).flatten() for expert in range(num_experts)]
    counts = torch.tensor([r.numel() for r in rows], dtype=torch.int64, device=ids.device)
    slot_of_row = torch.cat(rows) if rows else flat.new_zeros(0)
    return _finish(slot_of_row, counts, ids)


def plan_sorted(ids: torch.Tensor, num_experts: int) -> Permutation:
    """ids [T, k] -> Permutation with one stable sort and one bincount."""
    _check_ids(ids, num_experts)
    flat = ids.reshape(-1)
    slot_of_row = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return _finish(slot_of_row, counts, ids)


def gather_rows(hidden: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """hidden [T, H] -> x [S, H] in expert order (a copy of each token per chosen expert)."""
    return hidden[perm.token_of_row]


def combine_eager(rows: torch.Tensor, perm: Permutation, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Reference combine: rows [S, H] (expert order), weights [T, k] -> out [T, H].

    out[t] = sum_j weights[t, j] * rows[row of slot t*k+j], accumulated in float32 by index_add_.
    """
    row_weights = weights.reshape(-1)[perm.slot_of_row].float()
    out = rows.new_zeros(perm.num_tokens, rows.shape[-1], dtype=torch.float32)
    out = out.index_add(0, perm.token_of_row, rows.float() * row_weights[:, None])
    return out.to(out_dtype)


def combine_sorted(rows: torch.Tensor, perm: Permutation, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """rows [S, H] (expert order), weights [T, k] -> out [T, H].

    Un-permutes with the inverse order, then sums over k in a fixed order (deterministic), in float32.
    """
    hidden = rows.shape[-1]
    inverse = perm.inverse
    if inverse is None:
        inverse = torch.empty_like(perm.slot_of_row)
        inverse[perm.slot_of_row] = torch.arange(perm.slot_of_row.numel(), device=rows.device)
    by_slot = rows[inverse].view(perm.num_tokens, perm.top_k, hidden)
    # The product keeps the promoted dtype of rows and weights (as v5 does); the sum over k runs in
    # float32. Autograd keeps only `by_slot` (rows' dtype) and the weights, no float32 copy of the rows.
    out = torch.sum(by_slot * weights.unsqueeze(-1), dim=1, dtype=torch.float32)
    return out.to(out_dtype)
