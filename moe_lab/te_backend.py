"""The `te` backend: NVIDIA TransformerEngine's kernels for the router, the permutation, the experts
and the combine. TE is optional (extra `te`); only this module imports it, and only when a stage
runs or checks it can run.

router: `transformer_engine.pytorch.router.fused_topk_with_score_function` where its semantics
    equal the family's (softmax families: GPT-OSS's top-k-then-softmax; Qwen3-MoE/Mixtral's
    softmax-top-k-renormalise, which is the same function; softmax-top-k without renormalising).
    Other routings (DeepSeek-V3's group-limited sigmoid) are outside its declared capabilities: the
    registry refuses them, or substitutes the reference router where the user allowed it.
permutation / combine: TE's `moe_permute` / `moe_unpermute` with the index routing map.
experts: two `transformer_engine.pytorch.GroupedLinear` (gate_up, down) whose per-expert weights
    are, at each call, views of v5's 3D parameters (`unbind(0)`): the model keeps v5's names and
    layouts, and no second copy of the weights is kept. GPT-OSS stores its weights [E, in, out];
    GroupedLinear needs [out, in], so those experts make a transposed copy for the step.
    `te_cutlass` is the same with TE's CUTLASS grouped GEMM: TE reads NVTE_USE_CUTLASS_GROUPED_GEMM
    from the environment at each grouped GEMM, so each experts call sets it ("1" or "0"). The
    backward GEMMs run under whatever the last forward set (the same unless `te` and `te_cutlass`
    layers are mixed in one model).

Shapes: T tokens, H hidden, E experts (local ones under expert parallelism), k top-k, S = T*k rows.
"""
from __future__ import annotations

import functools
import logging
import os
import weakref

import torch

from .experts import ExpertsSpec, activation_fn, experts_grouped_mm, first_bias, first_weight
from .permutation import Permutation, _check_ids
from .routing import RouterOutput, RoutingSpec, router_logits

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'moe_lab[te]' (transformer-engine[pytorch]>=2.8) on a machine with a CUDA GPU"


def why_te_unavailable() -> str | None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or TE's own error when its CUDA libraries are missing
        return f"TransformerEngine cannot be imported ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "TransformerEngine kernels need a CUDA GPU and none is visible"
    return None


@functools.cache
def _te():
    import transformer_engine.pytorch as te

    return te


# ---- router --------------------------------------------------------------------------------------
def te_router_unsupported(spec: RoutingSpec) -> str | None:
    """None if TE's fused router computes this family's routing; else why not."""
    if spec.score != "softmax":
        return (f"score {spec.score!r} with group-limited choice and correction bias is not held to TE's "
                "fused router")
    return None


def route_te(hidden, weight, bias, correction_bias, spec: RoutingSpec) -> RouterOutput:
    """hidden [T, H] -> RouterOutput(logits [T, E], weights [T, k], ids [T, k]) through TE's fused
    top-k. softmax -> top-k -> renormalise equals top-k on logits -> softmax over the k, which is
    TE's `use_pre_softmax=False`; without renormalisation TE softmaxes first (`use_pre_softmax=True`)."""
    reason = te_router_unsupported(spec)
    if reason:  # the registry's plan never sends such a layer here
        raise ValueError(f"te router: {reason}")
    from transformer_engine.pytorch.router import fused_topk_with_score_function

    logits = router_logits(hidden, weight, bias, spec)
    pre_softmax = not (spec.topk_before_softmax or spec.renormalize)
    ids = torch.empty(logits.shape[0], spec.top_k, dtype=torch.int64, device=logits.device)
    probs, ids = fused_topk_with_score_function(
        logits.float(), spec.top_k, pre_softmax, None, None,
        spec.scaling if spec.scaling != 1.0 else None, "softmax", None, topk_indices=ids)
    weights = probs.gather(1, ids)
    weights = weights.to(logits.dtype) if spec.weights_in_logits_dtype else weights
    return RouterOutput(logits, weights, ids)



# ---- permutation and combine ---------------------------------------------------------------------
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


# ---- experts -------------------------------------------------------------------------------------
class GroupedProjection:
    """A TE GroupedLinear (built on the meta device, so it owns no weights) that computes
    y_e = x_e @ W_e^T (+ b_e) with W_e the views of one [E, out, in] tensor given at each call."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype):
        te = _te()
        self.num_experts = num_experts
        self.has_bias = has_bias
        self.linear = te.GroupedLinear(num_experts, in_features, out_features, bias=has_bias,
                                       params_dtype=dtype, device="meta")
        for i in range(num_experts):
            self.linear._parameters.pop(f"weight{i}", None)
            self.linear._parameters.pop(f"bias{i}", None)
        self._no_bias = {}

    def __call__(self, x: torch.Tensor, m_splits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """x [S, in] in expert order, m_splits [E] int64 (CPU), weight [E, out, in], bias [E, out] -> [S, out]."""
        weights = weight.unbind(0)  # views; autograd stacks their grads into weight.grad once
        if bias is not None:
            biases = bias.unbind(0)
        else:
            key = (x.device, weight.dtype)
            if key not in self._no_bias:
                self._no_bias[key] = torch.empty(0, device=x.device, dtype=weight.dtype)
            biases = [self._no_bias[key]] * self.num_experts
        for i in range(self.num_experts):
            self.linear.__dict__[f"weight{i}"] = weights[i]
            self.linear.__dict__[f"bias{i}"] = biases[i]
        try:
            return self.linear(x, m_splits)
        finally:
            for i in range(self.num_experts):  # keep no reference to this step's graph
                self.linear.__dict__[f"weight{i}"] = None
                self.linear.__dict__[f"bias{i}"] = None


_PROJECTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _projections(module, spec: ExpertsSpec, w1: torch.Tensor, w2: torch.Tensor):
    """(gate_up, down) GroupedProjections for a v5 experts module, built once (not submodules, so
    the module's state_dict is v5's)."""
    cached = _PROJECTIONS.get(module)
    E = w1.shape[0]
    if cached is None or cached[0].num_experts != E:
        if spec.transposed:  # [E, in, out]
            (_, in1, out1), (_, in2, out2) = w1.shape, w2.shape
        else:  # [E, out, in]
            (_, out1, in1), (_, out2, in2) = w1.shape, w2.shape
        cached = (GroupedProjection(E, in1, out1, spec.has_bias, w1.dtype),
                  GroupedProjection(E, in2, out2, spec.has_bias, w2.dtype))
        _PROJECTIONS[module] = cached
    return cached


def _out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, out, in] for GroupedLinear; v5's transposed layout [E, in, out] is copied (see module doc)."""
    return weight.transpose(1, 2).contiguous() if transposed else weight


def _select_grouped_gemm(cutlass: bool) -> None:
    """TE picks its grouped GEMM from NVTE_USE_CUTLASS_GROUPED_GEMM at each call: set it for this call."""
    os.environ["NVTE_USE_CUTLASS_GROUPED_GEMM"] = "1" if cutlass else "0"


def experts_te(x, counts, offsets, module, spec: ExpertsSpec, cutlass: bool = False):
    """x [S, H] rows in expert order, counts [E] -> y [S, H]: TE GroupedLinear, activation, GroupedLinear."""
    _select_grouped_gemm(cutlass)
    w1, b1 = first_weight(module, spec), first_bias(module, spec)
    w2, b2 = module.down_proj, (module.down_proj_bias if spec.has_bias else None)
    x = x.to(w1.dtype)
    if x.shape[0] == 0:
        return experts_grouped_mm(x, counts, offsets, module, spec)
    gate_up, down = _projections(module, spec, w1, w2)
    m_splits = counts.to("cpu", torch.int64)
    hidden = gate_up(x.contiguous(), m_splits, _out_in(w1, spec.transposed), b1)
    hidden = activation_fn(module, spec)(hidden)
    return down(hidden.contiguous(), m_splits, _out_in(w2, spec.transposed), b2)


def experts_te_cutlass(x, counts, offsets, module, spec: ExpertsSpec):
    """`experts_te` with TE's CUTLASS grouped GEMM."""
    return experts_te(x, counts, offsets, module, spec, cutlass=True)
