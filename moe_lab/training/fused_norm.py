"""Fused RMSNorm for the decoder: every RMSNorm module of a v5 model (input and post-attention norms,
Qwen3's per-head q/k norms, DeepSeek-V3's q/kv low-rank norms, the final norm) runs
`triton_kernels.rmsnorm.rms_norm` (one kernel forward, one backward) instead of v5's chain of
elementwise kernels with float32 copies.

Which of the two formulas a class computes (weight applied after the cast to the input dtype, as
Llama-style norms do, or before it, as GPT-OSS does) is not taken on trust from its name: each
RMSNorm class is probed once, in pure PyTorch on the CPU in bf16, where the two differ, and a class
matching neither (a Gemma-style 1 + weight, say) is refused.

The module keeps its parameters and names (checkpoints unchanged); calls the kernel cannot take
(x and weight of different dtypes, a device where Triton does not run) use v5's own forward, with
one warning per module.
"""
from __future__ import annotations

import logging
import types

import torch

from triton_kernels._common import runs_on
from triton_kernels.rmsnorm import MAX_HIDDEN

log = logging.getLogger(__name__)


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype or not runs_on(hidden_states.device):
        if not self._moe_lab_warned:
            self._moe_lab_warned = True
            log.warning("fused_norm: %s gets %s input on %s with a %s weight; v5's own forward runs there",
                        type(self).__name__, hidden_states.dtype, hidden_states.device, self.weight.dtype)
        return self._moe_lab_plain_forward(hidden_states)
    from triton_kernels.rmsnorm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon, weight_last=self._moe_lab_weight_last)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_last: bool) -> torch.Tensor:
    """The two formulas in PyTorch (n = x.float() * rsqrt(mean(x^2) + eps)): weight_last=False gives
    weight * n.to(x.dtype), weight_last=True gives (weight * n).to(x.dtype)."""
    n = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (weight * n).to(x.dtype) if weight_last else weight * n.to(x.dtype)


def formula_of(norm_class: type, eps: float = 1e-6) -> bool:
    """weight_last of an RMSNorm class, found by running a fresh bf16 instance on the CPU (hidden 64)
    against both formulas; ValueError if it computes neither. The probe runs on the CPU whatever
    default device the caller set (models are built under ``with torch.device("cuda")``)."""
    with torch.device("cpu"):
        return _probe_formula(norm_class, eps)


def _probe_formula(norm_class: type, eps: float) -> bool:
    hidden = 64
    try:
        probe = norm_class(hidden, eps=eps)
    except TypeError as e:
        raise ValueError(f"fused_norm: cannot build {norm_class.__name__}(hidden_size, eps=...) to check its "
                         f"formula: {e}") from e
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe = probe.to(torch.bfloat16)
        probe.weight.copy_(torch.randn(hidden, generator=generator) * 0.5 + 1)
        x = (torch.randn(16, hidden, generator=generator) * 3).to(torch.bfloat16)
        got = probe(x)
        for weight_last in (False, True):
            if torch.equal(got, reference_rms_norm(x, probe.weight, eps, weight_last)):
                return weight_last
    raise ValueError(f"fused_norm: {norm_class.__name__} computes neither RMSNorm formula moe_lab fuses "
                     "(weight * n.to(dtype) or (weight * n).to(dtype)); leave fused_norm off for this model")


def enable_fused_norm(model) -> int:
    """Switch every RMSNorm module of ``model`` to the fused kernel; returns how many."""
    formulas: dict[type, bool] = {}
    modules = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    if not modules:
        raise ValueError(f"fused_norm: no RMSNorm module found in {type(model).__name__}")
    for module in modules:  # check everything before changing anything
        if not hasattr(module, "variance_epsilon") or getattr(module, "weight", None) is None:
            raise ValueError(f"fused_norm: {type(module).__name__} has no weight/variance_epsilon; not a v5 RMSNorm")
        if module.weight.dim() != 1 or module.weight.shape[0] > MAX_HIDDEN:
            raise ValueError(f"fused_norm: {type(module).__name__} weight {tuple(module.weight.shape)}: the kernel "
                             f"takes one row of at most {MAX_HIDDEN} per block")
        if type(module) not in formulas:
            formulas[type(module)] = formula_of(type(module))
    for module in modules:
        if not hasattr(module, "_moe_lab_plain_forward"):
            module._moe_lab_plain_forward = module.forward
        module._moe_lab_weight_last = formulas[type(module)]
        module._moe_lab_warned = False
        module.forward = types.MethodType(_fused_forward, module)
    return len(modules)
