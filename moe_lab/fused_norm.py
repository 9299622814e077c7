"""Fused RMSNorm for the decoder: every RMSNorm module of a v5 model (input and post-attention norms,
Qwen3's per-head q/k norms, the final norm) runs `triton_kernels.rmsnorm.rms_norm` (one kernel
forward, one backward) instead of v5's chain of elementwise kernels with float32 copies.

The module keeps its parameters and names (checkpoints unchanged); calls the kernel cannot take
(x and weight of different dtypes, a device where Triton does not run) use v5's own forward.
"""
from __future__ import annotations

import types

import torch

# model_type -> whether the family applies the weight in float32 before the cast (GPT-OSS) or after
WEIGHT_LAST = {"gpt_oss": True, "qwen3_moe": False, "mixtral": False, "deepseek_v3": False, "qwen2_moe": False,
               "olmoe": False, "qwen3": False, "llama": False, "mistral": False}


def _triton_runs_on(device: torch.device) -> bool:
    from triton_kernels._common import interpreting

    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype or not _triton_runs_on(hidden_states.device):
        return self._moe_lab_plain_forward(hidden_states)
    from triton_kernels.rmsnorm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon, weight_last=self._moe_lab_weight_last)


def enable_fused_norm(model) -> int:
    """Switch every RMSNorm module of ``model`` to the fused kernel; returns how many."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in WEIGHT_LAST:
        raise ValueError(f"fused_norm: model type {model_type!r} is not one whose RMSNorm formula moe_lab knows; "
                         f"known: {', '.join(sorted(WEIGHT_LAST))}")
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        if not hasattr(module, "variance_epsilon") or getattr(module, "weight", None) is None:
            raise ValueError(f"fused_norm: {type(module).__name__} has no weight/variance_epsilon; not a v5 RMSNorm")
        if not hasattr(module, "_moe_lab_plain_forward"):
            module._moe_lab_plain_forward = module.forward
        module._moe_lab_weight_last = WEIGHT_LAST[model_type]
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    if count == 0:
        raise ValueError(f"fused_norm: no RMSNorm module found in {type(model).__name__}")
    return count
