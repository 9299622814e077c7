"""PEFT's LoRA on a moe_lab layer's experts: find the wrappers, read their factors, run them through
moe_lab's LoRA experts (`moe_lab.lora.experts`).

`peft.get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]))` replaces a layer's `experts` module with PEFT's `lora.ParamWrapper`s,
one per targeted 3D parameter, nested (the outer one's `base_layer` is the next, the innermost
one's the v5 experts module). PEFT itself would run the experts with each weight replaced by
`W + scale * delta` (a parametrization that forms the merged [E, out, in] weight every forward);
moe_lab instead reads the adapter weights PEFT owns (as views: their gradients land on PEFT's
parameters) and adds the low-rank update over the expert-sorted rows.

PEFT's storage of one wrapper (E experts, rank r, the weight's in/out features):
`lora_A[name].weight` [r * E, in] (expert e's A in rows e*r:(e+1)*r) and `lora_B[name].weight`
[out, r * E] (expert e's B in the columns j*E + e). Active adapters are summed (concatenated along
the rank, each B scaled by its adapter's scaling); a disabled or merged wrapper adds nothing (the
merged delta is in the base weight), as in PEFT.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..stages.experts import ExpertsSpec
from .experts import ExpertsLoRA, LoRAFactors, first_weight_name


class UnsupportedAdapterError(ValueError):
    """A PEFT configuration on a moe_lab layer's experts that moe_lab's LoRA path cannot run."""


def _param_wrapper_class():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def unwrap_peft_experts(module: nn.Module, spec: ExpertsSpec, where: str = "experts"
                        ) -> tuple[nn.Module, ExpertsLoRA | None]:
    """(the v5 experts module under PEFT's wrappers, an `ExpertsLoRA` with the active adapters'
    factors, or None when nothing adds an update). A module PEFT did not wrap comes back as it is."""
    if not hasattr(module, "base_layer"):  # not wrapped: the path of every model without PEFT
        return module, None
    wrapper_class = _param_wrapper_class()
    wrappers = []
    while hasattr(module, "base_layer"):
        if not isinstance(module, wrapper_class):
            raise UnsupportedAdapterError(
                f"moe_lab: {where} is wrapped by PEFT's {type(module).__name__}; moe_lab runs LoRA on the experts' "
                "3D weights (LoraConfig(target_parameters=[...gate_up_proj, ...down_proj])) and no other adapter there")
        wrappers.append(module)
        module = module.base_layer
    targets = {first_weight_name(spec), "down_proj"}
    lora = {}
    for wrapper in wrappers:
        name = wrapper.parameter_name
        if name not in targets:
            raise UnsupportedAdapterError(
                f"moe_lab: PEFT targets {where}.{name}; moe_lab's LoRA experts adapt "
                f"{' and '.join(sorted(targets))} (drop {name!r} from target_parameters)")
        factors = _factors(wrapper, module, spec, where)
        if factors is not None:
            lora[name] = factors
    return module, (ExpertsLoRA(module, lora) if lora else None)


def _factors(wrapper, base: nn.Module, spec: ExpertsSpec, where: str) -> LoRAFactors | None:
    """The summed active adapters of one ParamWrapper, in GEMM orientation (None: nothing to add)."""
    if wrapper.disable_adapters:
        if wrapper.merged:  # what PEFT's forward does with adapters disabled: take the merged delta out
            wrapper.unmerge()
        return None
    if wrapper.merged:
        return None
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None
    name = wrapper.parameter_name
    weight = getattr(base, name)
    if weight.dim() != 3:
        raise UnsupportedAdapterError(f"moe_lab: {where}.{name} is {weight.dim()}-D; its LoRA path takes v5's 3D "
                                      "expert weights")
    E = weight.shape[0]
    in_features, out_features = (weight.shape[1], weight.shape[2]) if spec.transposed else (weight.shape[2], weight.shape[1])
    if getattr(wrapper, "num_experts", E) != E or bool(getattr(base, "is_transposed", False)) != spec.transposed:
        raise UnsupportedAdapterError(
            f"moe_lab: PEFT's adapter on {where}.{name} reads the weight as {wrapper.num_experts} experts "
            f"(is_transposed={getattr(base, 'is_transposed', False)}), moe_lab's layer as {E} experts "
            f"(transposed={spec.transposed}); the layouts disagree")
    a_parts, b_parts, scales = [], [], []
    for adapter in active:
        lora_a, lora_b = wrapper.lora_A[adapter], wrapper.lora_B[adapter]
        if getattr(lora_b, "bias", None) is not None:
            raise UnsupportedAdapterError(f"moe_lab: adapter {adapter!r} on {where}.{name} has a LoRA bias "
                                          "(lora_bias=True); the experts' LoRA path has none")
        if adapter in getattr(wrapper, "lora_variant", {}):
            raise UnsupportedAdapterError(f"moe_lab: adapter {adapter!r} on {where}.{name} is a LoRA variant "
                                          f"({type(wrapper.lora_variant[adapter]).__name__}); plain LoRA only")
        if not isinstance(wrapper.lora_dropout[adapter], nn.Identity):
            raise UnsupportedAdapterError(f"moe_lab: adapter {adapter!r} on {where}.{name} has LoRA dropout")
        r = wrapper.r[adapter]
        a_w, b_w = lora_a.weight, lora_b.weight  # [r*E, in], [out, r*E]
        if tuple(a_w.shape) != (r * E, in_features) or tuple(b_w.shape) != (out_features, r * E):
            raise UnsupportedAdapterError(
                f"moe_lab: adapter {adapter!r} on {where}.{name}: lora_A {tuple(a_w.shape)}, lora_B {tuple(b_w.shape)}, "
                f"want [{r}*{E}, {in_features}] and [{out_features}, {r}*{E}] for the weight {tuple(weight.shape)}")
        a_parts.append(a_w.view(E, r, in_features).transpose(1, 2))  # [E, in, r]
        b_parts.append(b_w.view(out_features, r, E).permute(2, 1, 0))  # [E, r, out]
        scales.append(float(wrapper.scaling[adapter]))
    if len(active) == 1:
        return LoRAFactors(a_parts[0], b_parts[0], scales[0])  # views of PEFT's parameters (cast contiguous where used)
    return LoRAFactors(torch.cat(a_parts, dim=2), torch.cat([b * s for b, s in zip(b_parts, scales)], dim=1), 1.0)
