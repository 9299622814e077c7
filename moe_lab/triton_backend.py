"""The `triton` backend: moe_lab's stages on the kernels of `triton_kernels/`.

router: torch computes the logits [T, E] (a GEMM); one Triton kernel does scores, top-k and weights.
permutation: a counting sort by expert (stable: ties by flat slot) and a row gather.
experts: the fused expert MLP (grouped GEMM with the activation in its epilogue, ragged-K weight grads).
combine: the weighted un-permute with a fixed summation order (no float atomics).

Triton runs on CUDA GPUs, or on the CPU under its interpreter (`TRITON_INTERPRET=1`, slow, for tests).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from .experts import ExpertsSpec, first_bias, first_weight
from .permutation import Permutation, _check_ids
from .routing import RouterOutput, RoutingSpec, router_logits

logger = logging.getLogger(__name__)


def why_triton_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed: pip install 'moe_lab[triton]' (triton>=3.6)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need a CUDA GPU; on the CPU set TRITON_INTERPRET=1 before importing (slow: for tests)"
    return None


@functools.cache
def _kernels():
    import triton_kernels

    return triton_kernels


def route_triton(hidden, weight, bias, correction_bias, spec: RoutingSpec) -> RouterOutput:
    """hidden [T, H] -> RouterOutput(logits [T, E], weights [T, k], ids [T, k]); v5's semantics."""
    logits = router_logits(hidden, weight, bias, spec)
    if spec.topk_before_softmax:
        mode = "topk_softmax"
    else:
        mode = spec.score
    weights, ids = _kernels().route(
        logits,
        spec.top_k,
        mode=mode,
        renormalize=spec.renormalize,
        correction_bias=correction_bias if spec.has_correction_bias else None,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        routed_scaling_factor=spec.scaling,
    )
    if spec.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return RouterOutput(logits, weights, ids)


def plan_triton(ids, num_experts) -> Permutation:
    """ids [T, k] -> Permutation (counting sort by expert, stable; with its inverse)."""
    _check_ids(ids, num_experts)
    slots, counts, offsets, inverse = _kernels().sort_by_expert(ids, num_experts, return_inverse=True)
    return Permutation(slots, counts, offsets, ids.shape[0], ids.shape[1], inverse=inverse)


def permute_triton(hidden, ids, num_experts):
    """hidden [T, H], ids [T, k] -> (x [S, H] in expert order, Permutation with its inverse)."""
    perm = plan_triton(ids, num_experts)
    return _kernels().permute(hidden, perm.slot_of_row, perm.top_k, perm.inverse), perm


def combine_triton(rows, perm: Permutation, weights, out_dtype):
    """rows [S, H] in expert order, weights [T, k] -> out [T, H] (fp32 accumulation, j ascending)."""
    return _kernels().combine(rows, weights, perm.slot_of_row, perm.inverse).to(out_dtype)


# ExpertsSpec.activation_key -> the fused kernels' activation; the registry declares these keys
_KERNEL_ACTIVATION = {"glu:silu": "swiglu", "glu:swish": "swiglu", "gpt_oss": "gpt_oss"}
TRITON_ACTIVATIONS = tuple(_KERNEL_ACTIVATION)


def _fused_activation(spec: ExpertsSpec) -> str:
    """The kernels' activation for this layer; the registry's plan never sends another one here."""
    try:
        return _KERNEL_ACTIVATION[spec.activation_key]
    except KeyError:
        raise ValueError(f"triton experts: no fused kernel for activation {spec.activation_key!r}; "
                         f"they compute {', '.join(TRITON_ACTIVATIONS)}") from None


def _mlp_weights(module, spec: ExpertsSpec, activation: str) -> dict:
    """The keyword arguments of triton_kernels' expert MLPs for a v5 experts module."""
    return dict(
        activation=activation,
        gate_up_bias=first_bias(module, spec),
        down_bias=module.down_proj_bias if spec.has_bias else None,
        transposed=spec.transposed,
        concatenated=not spec.interleaved,
        alpha=spec.alpha,
        limit=spec.limit,
    )


def experts_triton(x, counts, offsets, module, spec: ExpertsSpec):
    """x [S, H] rows in expert order -> y [S, H] through the fused Triton expert MLP."""
    activation = _fused_activation(spec)
    w1 = first_weight(module, spec)
    return _kernels().expert_mlp(x.to(w1.dtype), w1, module.down_proj, offsets, **_mlp_weights(module, spec, activation))


def gathered_experts_triton(hidden, ids, weights, module, spec: ExpertsSpec, choice):
    """Permutation, experts and combine with the gather in the gate_up GEMM's prologue: the permuted
    copy of the rows [S, H] is neither written nor kept for backward. hidden [T, H] -> out [T, H]."""
    activation = _fused_activation(spec)
    perm = plan_triton(ids, spec.num_experts)
    w1 = first_weight(module, spec)
    out_rows = _kernels().expert_mlp_gathered(
        hidden.to(w1.dtype), perm.slot_of_row, perm.inverse, perm.top_k, w1, module.down_proj, perm.offsets,
        **_mlp_weights(module, spec, activation))
    return choice.combine(out_rows, perm, weights, hidden.dtype)
