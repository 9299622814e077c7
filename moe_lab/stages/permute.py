"""The permutation stage: group the T*k (token, slot) pairs by expert.

A routed row is one (token, slot) pair; the flat slot index of token t's j-th choice is t*k + j.
Rows are ordered by expert, ties by flat slot index (a stable sort): every implementation produces
this same order, so their outputs agree row for row. `plan_eager` (one `nonzero` per expert) is the
reference; then the sorted plan (argsort + bincount), the Triton counting sort, TE's `moe_permute`.

Every permutation: (hidden [T, H], ids [T, k], num_experts) -> (x [S, H] in expert order, Permutation).
Shapes: T tokens, H hidden, E experts, k experts per token, S = T*k routed rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import require_all
from ..registry import register_stage
from ._requires import TE, TRITON, kernels, why_te_unavailable, why_triton_unavailable


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
    """Shape and range of expert ids: a ValueError on the CPU (or with Options(host_checks=True)), a
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
    """ids [T, k] -> Permutation with one stable sort and one histogram."""
    _check_ids(ids, num_experts)
    flat = ids.reshape(-1)
    slot_of_row = torch.argsort(flat, stable=True)
    # a histogram of static size [E] (bincount's size depends on the data: no torch.compile graph)
    counts = flat.new_zeros(num_experts).index_add_(0, flat, torch.ones_like(flat))
    return _finish(slot_of_row, counts, ids)


def gather_rows(hidden: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """hidden [T, H] -> x [S, H] in expert order (a copy of each token per chosen expert)."""
    return hidden[perm.token_of_row]


def permute_eager(hidden, ids, num_experts):
    perm = plan_eager(ids, num_experts)
    return gather_rows(hidden, perm), perm


def permute_sorted(hidden, ids, num_experts):
    perm = plan_sorted(ids, num_experts)
    return gather_rows(hidden, perm), perm


# ---- Triton: counting sort by expert and a row gather ----------------------------------------
def plan_triton(ids, num_experts) -> Permutation:
    """ids [T, k] -> Permutation (counting sort by expert, stable; with its inverse)."""
    _check_ids(ids, num_experts)
    slots, counts, offsets, inverse = kernels().sort_by_expert(ids, num_experts, return_inverse=True)
    return Permutation(slots, counts, offsets, ids.shape[0], ids.shape[1], inverse=inverse)


def permute_triton(hidden, ids, num_experts):
    """hidden [T, H], ids [T, k] -> (x [S, H] in expert order, Permutation with its inverse)."""
    perm = plan_triton(ids, num_experts)
    return kernels().permute(hidden, perm.slot_of_row, perm.top_k, perm.inverse), perm


# ---- TransformerEngine: moe_permute with the index map ---------------------------------------
def te_row_map_to_inverse(row_id_map: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """TE's index-map row_id_map [k*T] (entry j*T + t = sorted row of token t's j-th expert) ->
    our inverse [T*k] (entry t*k + j = the same row), int64."""
    return row_id_map.view(top_k, num_tokens).t().reshape(-1).long()


def inverse_to_te_row_map(inverse: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """The other way: inverse [T*k] -> TE's row_id_map [k*T] int32."""
    return inverse.view(num_tokens, top_k).t().reshape(-1).int()


def slot_of_row_from_inverse(inverse: torch.Tensor) -> torch.Tensor:
    """inverse [S] (slot -> row) -> slot_of_row [S] (row -> slot)."""
    slots = torch.arange(inverse.numel(), device=inverse.device)
    return torch.empty_like(inverse).scatter_(0, inverse, slots)


def permute_te(hidden, ids, num_experts):
    """hidden [T, H], ids [T, k] -> (x [S, H] in expert order, Permutation with its inverse)."""
    _check_ids(ids, num_experts)
    T, k = ids.shape
    from transformer_engine.pytorch import moe_permute

    rows, row_id_map = moe_permute(hidden.contiguous(), ids.int(), T * k, max_token_num=T, map_type="index")
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    inverse = te_row_map_to_inverse(row_id_map, T, k)
    return rows, Permutation(slot_of_row_from_inverse(inverse), counts, offsets, T, k, inverse=inverse)


# ---- registrations ---------------------------------------------------------------------------
register_stage("permutation", "eager", permute_eager, description="one nonzero() per expert")
register_stage("permutation", "torch", permute_sorted, description="stable argsort + bincount")
register_stage("permutation", "triton", permute_triton, why_triton_unavailable, description="counting sort + row gather kernels",
               caps=TRITON)
register_stage("permutation", "te", permute_te, why_te_unavailable, description="TransformerEngine moe_permute (index map)",
               caps=TE)
