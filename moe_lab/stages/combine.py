"""The combine stage: expert outputs back in token order, weighted by the routing weights, summed over k.

`combine_eager` (float32 `index_add_`) is the reference; then the fixed-order sum over the inverse
permutation, the Triton weighted un-permute kernel, TE's `moe_unpermute`.

Every combine: (rows [S, H] in expert order, perm: Permutation, weights [T, k], out_dtype) -> out [T, H].
"""
from __future__ import annotations

import torch

from ..registry import register_stage
from ._requires import TE, TRITON, kernels, why_te_unavailable, why_triton_unavailable
from .permute import Permutation, inverse_to_te_row_map, slot_of_row_from_inverse


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


# ---- Triton: weighted un-permute with a fixed summation order --------------------------------
def combine_triton(rows, perm: Permutation, weights, out_dtype):
    """rows [S, H] in expert order, weights [T, k] -> out [T, H] (fp32 accumulation, j ascending)."""
    return kernels().combine(rows, weights, perm.slot_of_row, perm.inverse).to(out_dtype)


# ---- TransformerEngine: moe_unpermute with merging probabilities -----------------------------
def combine_te(rows, perm: Permutation, weights, out_dtype):
    """rows [S, H] in expert order, weights [T, k] -> out [T, H]: TE's weighted unpermute
    (any permutation stage: TE's row map is rebuilt from the permutation's inverse)."""
    from transformer_engine.pytorch import moe_unpermute

    if rows.shape[0] == 0:
        return rows.new_zeros(perm.num_tokens, rows.shape[1], dtype=out_dtype)
    inverse = perm.inverse if perm.inverse is not None else slot_of_row_from_inverse(perm.slot_of_row)
    row_id_map = inverse_to_te_row_map(inverse, perm.num_tokens, perm.top_k)
    out = moe_unpermute(rows.contiguous(), row_id_map, merging_probs=weights.float(), map_type="index")
    return out.to(out_dtype)


# ---- registrations ---------------------------------------------------------------------------
register_stage("combine", "eager", combine_eager, description="index_add_ in float32")
register_stage("combine", "torch", combine_sorted, description="inverse permutation + fixed-order sum over k")
register_stage("combine", "triton", combine_triton, why_triton_unavailable, description="fixed-order weighted un-permute kernel",
               caps=TRITON)
register_stage("combine", "te", combine_te, why_te_unavailable, description="TransformerEngine moe_unpermute with merging probs",
               caps=TE)
