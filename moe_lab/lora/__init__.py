"""LoRA on the experts: PEFT's adapters on v5's fused 3D expert weights, trained through moe_lab's
grouped GEMMs.

    model = moe_lab.AutoModelForCausalLM.from_pretrained(...)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"],
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))

Each MoE layer finds PEFT's wrappers on its experts at every forward (`unwrap_peft_experts`) and
runs the LoRA counterpart of its planned experts stage (`lora_choice`): the base grouped GEMM plus
x @ A_e @ B_e over the same expert-sorted rows, never a per-expert delta weight. What runs is
recorded in `model.moe_lab_plan` under "lora". Adapters are PEFT's own parameters, so
`save_pretrained`, `PeftModel.from_pretrained` and `merge_and_unload` are PEFT's and interoperate
with vanilla v5 + PEFT.
"""
from __future__ import annotations

from .experts import (
    LORA_EXPERTS, ExpertsLoRA, LoRAFactors, lora_choice, lora_experts_grouped_mm, lora_experts_loop,
    lora_experts_triton,
)
from .peft_bridge import UnsupportedAdapterError, unwrap_peft_experts


def with_lora(experts, lora: ExpertsLoRA | None, choice, planner):
    """(the experts argument, the StageChoice) one forward of a layer runs: unchanged without LoRA,
    else the `ExpertsLoRA` view and the LoRA counterpart of `choice`; the planner's `lora` note
    (shown in `model.moe_lab_plan`) says which."""
    if lora is None:
        if getattr(planner, "lora", None) is not None:
            planner.lora = None
        return experts, choice
    from ..stages.experts import first_weight

    run_choice, note = lora_choice(choice, planner.spec, planner.substitute, planner.expert_parallel,
                                   first_weight(experts, planner.spec), planner.model_type)
    planner.lora = note
    return lora, run_choice


__all__ = ["ExpertsLoRA", "LoRAFactors", "LORA_EXPERTS", "UnsupportedAdapterError", "lora_choice",
           "lora_experts_grouped_mm", "lora_experts_loop", "lora_experts_triton", "note_peft_parametrized",
           "unwrap_peft_experts", "with_lora"]


PEFT_MERGED_NOTE = ("PEFT's own path: each targeted expert weight runs as W + scale * B @ A, formed every forward "
                    "(v5's generic experts under PEFT's parametrization; moe_lab's grouped LoRA path runs in the "
                    "MoE layers of the families it replaces: Qwen3-MoE, Mixtral, GPT-OSS, DeepSeek-V3, NemotronH)")


def note_peft_parametrized(experts, planner) -> None:
    """Record in the plan that PEFT's parametrization (not moe_lab's LoRA path) adapts these experts:
    a v5 experts module moe_lab computes through its generic path, wrapped by PEFT's ParamWrapper."""
    if getattr(experts, "parametrizations", None) is not None:
        planner.lora = PEFT_MERGED_NOTE
    elif getattr(planner, "lora", None) is not None:
        planner.lora = None
