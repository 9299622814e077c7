"""Triton kernels for the hot path of one MoE layer, each with a launcher, an autograd wrapper and
a plain-PyTorch reference (``triton_kernels.reference``; the router's is moe_lab's
``moe_lab.stages.router.select_experts``, which its tests use). Importable on their own: nothing
here imports ``moe_lab``.

Shapes: T tokens, H hidden, E experts, k top-k, S = T*k routed rows, I expert width; ``offsets``
are int32 cumulative END offsets per expert ``[E]`` over rows sorted by expert.

- ``route(logits [T, E], top_k, mode=...) -> (weights fp32 [T, k], ids int64 [T, k])``
- ``sort_by_expert(ids [T, k], E) -> (sorted_slots int64 [S], counts int64 [E], offsets int32 [E])``
- ``permute(x [T, H], sorted_slots, top_k) -> [S, H]``
- ``grouped_mm(x [S, K], w [E, K, N], offsets, bias=None) -> [S, N]``
- ``expert_mlp(x [S, H], gate_up, down, offsets, activation=..., ...) -> [S, H]``
- ``expert_mlp_gathered(x [T, H], sorted_slots, inv_slots, k, gate_up, down, offsets, ...) -> [S, H]``:
  the same MLP gathering token rows in the GEMM prologue (no permuted copy)
- ``combine(y [S, H], weights [T, k], sorted_slots) -> [T, H]``

``triton_kernels.settings`` holds the process-wide switches (TF32, TMA, autotuning);
``triton_kernels.autotune_choices.pin_autotune_choices(path)`` re-uses the tiles a recorded run's
autotuner chose.
"""
from .expert_mlp import expert_mlp, expert_mlp_gathered
from .grouped_gemm import grouped_mm
from .permute import combine, expert_counts, inverse_permutation, permute, sort_by_expert
from .router import route
from . import settings

__all__ = [
    "route",
    "sort_by_expert",
    "expert_counts",
    "inverse_permutation",
    "permute",
    "grouped_mm",
    "expert_mlp",
    "expert_mlp_gathered",
    "combine",
]
