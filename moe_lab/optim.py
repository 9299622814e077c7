"""The optimizer step inside backward: each parameter is updated as soon as its gradient is complete,
and the gradient is freed at once.

A training step then never holds every gradient at the same time (at Qwen3-30B-A3B geometry with 8
layers that is 10.4 GiB of bf16 gradients), and the optimizer's passes over the parameters overlap
the rest of backward. What it gives up: gradient clipping by global norm, gradient accumulation over
micro-batches, and gradient reduction across ranks before the step (so one process only). Each
parameter gets its own optimizer instance (fused AdamW by default on CUDA).

    opt = OptimizerInBackward(model.parameters(), lr=1e-4)
    loss.backward()      # parameters are updated here
    opt.step(); opt.zero_grad()   # no-ops, so ordinary training loops run unchanged
"""
from __future__ import annotations

from typing import Iterable

import torch


class OptimizerInBackward:
    """Per-parameter optimizers stepped from `register_post_accumulate_grad_hook`."""

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer_class=torch.optim.AdamW, **kwargs):
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._handles = []
        for param in params:
            if not param.requires_grad or param in self.optimizers:
                continue
            self.optimizers[param] = optimizer_class([param], **kwargs)
            self._handles.append(param.register_post_accumulate_grad_hook(self._step_one))
        if not self.optimizers:
            raise ValueError("OptimizerInBackward: no parameter requires a gradient")

    def _step_one(self, param: torch.nn.Parameter) -> None:
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Nothing to do: every parameter was updated during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: gradients were freed during backward."""

    @property
    def state(self) -> dict:
        """Every parameter's optimizer state, as `torch.optim.Optimizer.state` maps it."""
        return {p: opt.state[p] for p, opt in self.optimizers.items() if p in opt.state}

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def remove(self) -> None:
        """Detach the hooks (the parameters go back to ordinary gradients)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
