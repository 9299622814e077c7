"""The router stage: router logits -> scores -> top-k expert ids and their weights.

One `RoutingSpec` names the semantics of a model family exactly as Transformers v5 defines them;
`select_experts` (logits -> weights, ids) is the one readable definition of routing, ties
included (see its docstring). `route_reference` (logits, then `select_experts`) is the reference
router every faster router is held to, and the tests of the Triton router kernel
(`triton_kernels.route`) hold it to `select_experts`. Below them: the Triton router (one kernel for
scores, top-k and weights) and TransformerEngine's fused top-k.

Every router: (hidden [T, H], weight [E, H], bias [E] | None, correction_bias [E] | None, spec)
-> RouterOutput(logits [T, E], weights [T, k], ids [T, k]).
Shapes: T tokens, H hidden size, E experts, k experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..registry import register_stage
from ._requires import TE, TRITON, kernels, why_te_unavailable, why_triton_unavailable


@dataclass(frozen=True)
class RoutingSpec:
    """How a family turns router logits into (weights, ids).

    score: "softmax" (Qwen3-MoE, Mixtral, GPT-OSS) or "sigmoid" (DeepSeek-V3).
    topk_before_softmax: GPT-OSS picks the top-k logits, then softmaxes over those k only.
    renormalize: divide the k selected weights by their sum (v5's `norm_topk_prob`).
    n_group / topk_group: DeepSeek-V3 group-limited choice (E/n_group experts per group; a group is
        scored by the sum of its two best biased scores; only the best topk_group groups compete).
    has_correction_bias: DeepSeek-V3 adds `e_score_correction_bias` to the scores for selection only.
    scaling: DeepSeek-V3's `routed_scaling_factor`, applied to the final weights.
    logits_fp32: compute the logits in float32 (DeepSeek-V3 upcasts hidden and weight).
    weights_in_logits_dtype: cast the final weights to the logits' dtype (Qwen3-MoE, GPT-OSS) or
        keep them float32 (Mixtral, DeepSeek-V3).
    renormalize_eps: added to the renormalisation denominator (DeepSeek-V3 uses 1e-20).
    """

    num_experts: int
    top_k: int
    score: str = "softmax"
    topk_before_softmax: bool = False
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    has_correction_bias: bool = False
    scaling: float = 1.0
    logits_fp32: bool = False
    weights_in_logits_dtype: bool = True
    renormalize_eps: float = 0.0

    def __post_init__(self):
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"RoutingSpec.score must be 'softmax' or 'sigmoid', got {self.score!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")

    def features(self) -> frozenset:
        """The routing features this spec uses, as routers declare them in their capabilities:
        the score ("softmax" | "sigmoid"), "topk_before_softmax", "renormalize", "group_limited",
        "correction_bias", "scaling", "logits_fp32"."""
        used = {self.score}
        for name, on in (("topk_before_softmax", self.topk_before_softmax), ("renormalize", self.renormalize),
                         ("group_limited", self.n_group > 1), ("correction_bias", self.has_correction_bias),
                         ("scaling", self.scaling != 1.0), ("logits_fp32", self.logits_fp32)):
            if on:
                used.add(name)
        return frozenset(used)


class RouterOutput(NamedTuple):
    """logits [T, E] (as v5 returns them), weights [T, k], ids [T, k] int64."""

    logits: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: RoutingSpec) -> torch.Tensor:
    """hidden [T, H], weight [E, H], bias [E] or None -> logits [T, E]."""
    if spec.logits_fp32:
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(hidden, weight, bias)


def _topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [T, n] -> int64 [T, k]: the indices of each row's k largest scores, largest first.
    A stable descending sort: among equal scores the lower index comes first. NaN ranks above
    +inf and all NaNs are equal; -0.0 equals 0.0 (torch.sort's order)."""
    return torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :k]


def _group_limited_mask(choice: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """choice [T, E] biased scores -> bool mask [T, E] of experts in the kept groups."""
    tokens = choice.shape[0]
    per_group = spec.num_experts // spec.n_group
    grouped = choice.view(tokens, spec.n_group, per_group)
    group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, n_group]
    kept_groups = _topk_ids(group_scores, spec.topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    return group_mask.unsqueeze(-1).expand(tokens, spec.n_group, per_group).reshape(tokens, spec.num_experts)


def select_experts(logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None):
    """logits [T, E] -> (weights [T, k], ids [T, k] int64) with the family's v5 semantics.

    The one definition of routing: the reference routers run it and the Triton router's tests hold
    the kernel to it.

    Order: the ids of a row come largest score first. Among equal scores the LOWER expert index
    wins (likewise for DeepSeek-V3's groups). v5 selects with `torch.topk`, which promises nothing
    about which of equal scores it returns, nor (with `sorted=False`) their order, so every result
    here is one v5 could also return: the tie rule only makes the choice deterministic.

    Softmax families select on the logits: softmax is monotonic, so the logits rank the experts as
    the probabilities do, and where distinct logits round to equal probabilities (underflow to 0)
    the larger logit is one of v5's equal choices.

    Non-finite values: NaN ranks above +inf (as in `torch.topk`), so a NaN score is chosen and its
    weight is NaN. Where a softmax row's probabilities are all NaN (a NaN or +inf logit, or only
    -inf ones) every score ties and the row takes experts 0..k-1, weights NaN.
    """
    k = spec.top_k
    if spec.topk_before_softmax:  # GPT-OSS
        ids = _topk_ids(logits, k)
        top_values = logits.gather(1, ids)
        weights = torch.softmax(top_values, dim=-1, dtype=top_values.dtype)
    elif spec.score == "softmax":  # Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE ...
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        all_nan = probs.isnan().any(dim=-1, keepdim=True)  # one NaN probability makes the whole row NaN
        ids = _topk_ids(logits.masked_fill(all_nan, 0.0), k)
        weights = probs.gather(1, ids)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renormalize_eps)
    else:  # sigmoid: DeepSeek-V3
        scores = logits.float().sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if spec.n_group > 1:
            choice = choice.masked_fill(~_group_limited_mask(choice, spec), float("-inf"))
        ids = _topk_ids(choice, k)
        weights = scores.gather(1, ids)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renormalize_eps)
    return finish_weights(weights, spec, logits.dtype), ids


def finish_weights(weights: torch.Tensor, spec: RoutingSpec, logits_dtype: torch.dtype) -> torch.Tensor:
    """The routing weights [T, k] after selection: the family's scaling, then its output dtype."""
    if spec.scaling != 1.0:
        weights = weights * spec.scaling
    if spec.weights_in_logits_dtype:
        weights = weights.to(logits_dtype)
    return weights


def route_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    correction_bias: torch.Tensor | None,
    spec: RoutingSpec,
) -> RouterOutput:
    """The reference router: hidden [T, H] -> RouterOutput(logits [T, E], weights [T, k], ids [T, k])."""
    logits = router_logits(hidden, weight, bias, spec)
    weights, ids = select_experts(logits, spec, correction_bias)
    return RouterOutput(logits, weights, ids)


# ---- Triton: scores, top-k and weights in one kernel -----------------------------------------
def route_triton(hidden, weight, bias, correction_bias, spec: RoutingSpec) -> RouterOutput:
    """hidden [T, H] -> RouterOutput(logits [T, E], weights [T, k], ids [T, k]); v5's semantics."""
    logits = router_logits(hidden, weight, bias, spec)
    if spec.topk_before_softmax:
        mode = "topk_softmax"
    else:
        mode = spec.score
    weights, ids = kernels().route(
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


# ---- TransformerEngine: fused top-k with score function (softmax families) -------------------
def route_te(hidden, weight, bias, correction_bias, spec: RoutingSpec) -> RouterOutput:
    """hidden [T, H] -> RouterOutput(logits [T, E], weights [T, k], ids [T, k]) through TE's fused
    top-k. softmax -> top-k -> renormalise equals top-k on logits -> softmax over the k, which is
    TE's `use_pre_softmax=False`; without renormalisation TE softmaxes first (`use_pre_softmax=True`).
    What it computes is declared once, in its registration's `routing` features (softmax families)."""
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


# ---- registrations ---------------------------------------------------------------------------
register_stage("router", "eager", route_reference, description="reference router (v5 semantics)")
register_stage("router", "torch", route_reference, description="same as eager: the router is already vectorised")
register_stage("router", "triton", route_triton, why_triton_unavailable, description="fused scores + top-k + weights kernel",
               caps=TRITON)
register_stage("router", "te", route_te, why_te_unavailable,
               description="TransformerEngine fused top-k with score function (softmax families)",
               caps=replace(TE, routing=frozenset({"softmax", "topk_before_softmax", "renormalize", "scaling",
                                                   "logits_fp32"})))
