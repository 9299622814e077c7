"""Model families: which v5 blocks are sparse MoE blocks and the exact routing math of each.

A family names the v5 block class, where its router, shared experts and (NemotronH) latent
projections live, and builds the `RoutingSpec` that reproduces v5's router for that model type.
Model types not listed here go through the generic path (v5's own router, moe_lab's experts) when
their experts use v5's experts interface; anything else is refused with the missing piece named.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from transformers.activations import ACT2CLS
from transformers.integrations.moe import _default_apply_gate

from .stages.experts import ExpertsSpec
from .stages.router import RoutingSpec


class UnsupportedModelError(NotImplementedError):
    """moe_lab cannot reproduce this model's MoE math exactly, so it refuses to run it."""


@dataclass(frozen=True)
class Family:
    """model_type: v5's config.model_type. block_class: name of v5's sparse MoE block class.
    router_attr: the block's router child ("gate" or "router"). shared_attr: shared experts child or None.
    returns_router_scores: the block returns (hidden, router_scores) rather than hidden (GPT-OSS).
    jitter_attr: config field of Mixtral-style multiplicative router jitter in training, or None.
    latent_attrs: (into, out of) the children that project the routed experts' rows to a smaller
        width and back (NemotronH's fc1_latent_proj, fc2_latent_proj; `nn.Identity` where the config
        has no latent size): the router and the shared experts see the hidden states, the routed
        experts the projected rows. None: no such children.
    routing: config -> RoutingSpec."""

    model_type: str
    block_class: str
    router_attr: str
    routing: Callable[[object], RoutingSpec]
    shared_attr: str | None = None
    returns_router_scores: bool = False
    jitter_attr: str | None = None
    latent_attrs: tuple[str, str] | None = None


def _qwen3_moe(config) -> RoutingSpec:
    return RoutingSpec(config.num_experts, config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob))


def _mixtral(config) -> RoutingSpec:
    return RoutingSpec(config.num_local_experts, config.num_experts_per_tok, renormalize=True, weights_in_logits_dtype=False)


def _gpt_oss(config) -> RoutingSpec:
    return RoutingSpec(config.num_local_experts, config.num_experts_per_tok, topk_before_softmax=True)


def _deepseek_v3(config) -> RoutingSpec:
    """DeepseekV3TopkRouter: fp32 logits, sigmoid, `e_score_correction_bias` added for the choice
    only, group-limited choice (n_group / topk_group, a group scored by its two best biased scores),
    the unbiased scores of the chosen experts, renormalised by sum + 1e-20 with norm_topk_prob, times
    routed_scaling_factor; the weights reach the experts in float32."""
    return RoutingSpec(
        config.n_routed_experts,
        config.num_experts_per_tok,
        score="sigmoid",
        renormalize=bool(config.norm_topk_prob),
        renormalize_eps=1e-20,
        n_group=config.n_group,
        topk_group=config.topk_group,
        has_correction_bias=True,
        scaling=float(config.routed_scaling_factor),
        logits_fp32=True,
        weights_in_logits_dtype=False,
    )


def _nemotron_h(config) -> RoutingSpec:
    """NemotronHTopkRouter computes DeepSeek-V3's routing line for line (see `_deepseek_v3`), with its
    own config fields: n_routed_experts (alias num_local_experts), num_experts_per_tok, n_group,
    topk_group, norm_topk_prob, routed_scaling_factor (2.5 in Nemotron 3 Nano)."""
    return _deepseek_v3(config)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate", _qwen3_moe),
        Family("mixtral", "MixtralSparseMoeBlock", "gate", _mixtral, jitter_attr="router_jitter_noise"),
        Family("gpt_oss", "GptOssMLP", "router", _gpt_oss, returns_router_scores=True),
        Family("deepseek_v3", "DeepseekV3MoE", "gate", _deepseek_v3, shared_attr="shared_experts"),
        Family("nemotron_h", "NemotronHMoE", "gate", _nemotron_h, shared_attr="shared_experts",
               latent_attrs=("fc1_latent_proj", "fc2_latent_proj")),
    )
}


def experts_spec_of(module: nn.Module, model_type: str = "?") -> ExpertsSpec:
    """Read what a v5 experts module computes; refuse what moe_lab cannot reproduce exactly."""
    cls = type(module)
    where = f"model type {model_type!r}, experts class {cls.__name__}"
    if not hasattr(module, "down_proj") or getattr(module.down_proj, "dim", lambda: 0)() != 3:
        raise UnsupportedModelError(f"{where}: experts are not stored as v5's 3D tensors (down_proj [E, ...])")
    gated = getattr(module, "has_gate", hasattr(module, "gate_up_proj"))
    if (gated and not hasattr(module, "gate_up_proj")) or (not gated and not hasattr(module, "up_proj")):
        raise UnsupportedModelError(f"{where}: expected gate_up_proj (gated) or up_proj (not gated) weights")
    transposed = bool(getattr(module, "is_transposed", False))
    interleaved = not bool(getattr(module, "is_concatenated", True))
    has_bias = bool(getattr(module, "has_bias", False))
    custom_gate = getattr(cls, "_apply_gate", _default_apply_gate) is not _default_apply_gate
    act_name = activation_name(module)
    if custom_gate:
        if cls.__name__ == "GptOssExperts":
            activation = "gpt_oss"
        else:
            raise UnsupportedModelError(
                f"{where}: its experts define their own gating function (_apply_gate), which moe_lab has no "
                "implementation of; open an issue naming this model type"
            )
    else:
        if not hasattr(module, "act_fn"):
            raise UnsupportedModelError(f"{where}: experts have no act_fn")
        activation = "glu" if gated else "plain"
    return ExpertsSpec(
        num_experts=module.down_proj.shape[0],
        gated=gated,
        transposed=transposed,
        interleaved=interleaved,
        has_bias=has_bias,
        activation=activation,
        act_name=act_name,
        alpha=float(getattr(module, "alpha", 1.702)),
        limit=float(getattr(module, "limit", 7.0)),
    )


def activation_name(module: nn.Module) -> str:
    """The v5 activation name (a key of `transformers.activations.ACT2CLS`) of an experts module's
    `act_fn`, which fused kernels read as `ExpertsSpec.act_name`.

    Read from the act_fn's class, not only from a config field: NemotronH's experts keep no config
    and take `mlp_hidden_act` ("relu2"), not `hidden_act`. The config's `hidden_act` decides only
    between names of the same class (silu/swish are two classes; gelu/gelu_python one). An act_fn
    of no known class, or of a class several names share with no config naming one, gets its class
    name: a key no fused kernel declares, so only the stages that call act_fn itself take it."""
    act = getattr(module, "act_fn", None)
    named = getattr(getattr(module, "config", None), "hidden_act", None)
    if act is None:
        return str(named or "silu")
    names = [name for name, entry in ACT2CLS.items() if (entry[0] if isinstance(entry, tuple) else entry) is type(act)]
    if named in names:
        return str(named)
    if len(names) == 1:
        return names[0]
    return type(act).__name__


def is_v5_experts_module(module: nn.Module) -> bool:
    """True for modules decorated with v5's `use_experts_implementation` (they carry its flags)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "has_gate") and hasattr(module, "down_proj")
