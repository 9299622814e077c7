"""Optimizers for training steps where the optimizer is a large share of the time or memory.

`TritonAdamW`: AdamW (PyTorch's formula and defaults) whose step is one elementwise Triton kernel per
parameter (`triton_kernels.adamw`): every element read and written once, float32 arithmetic. A
DTensor parameter (an FSDP2 shard) is updated through its local shard (the update is elementwise),
with moments that are DTensors of its placements, as torch's AdamW keeps them (so the two
optimizers' state dicts load into each other); moe_lab's expert shards are plain tensors.

`OptimizerInBackward`: the optimizer step inside backward: each parameter is updated as soon as its gradient is complete,
and the gradient is freed at once.

A training step then never holds every gradient at the same time (at Qwen3-30B-A3B geometry with 8
layers that is 10.4 GiB of bf16 gradients); that lowers the peak only where the peak falls inside
backward. What it gives up: gradient clipping by global norm and gradient accumulation over
micro-batches. Across processes, a gradient must be reduced before its update
(`hook_after_reduction`): FSDP2 runs a shard's hook after its reduce-scatter, and moe_lab's
expert-parallel models (``ep_size``, with or without ``fsdp=True``, under DDP too) run the update after
their own reduction; a plain parameter in any other job of several processes (DDP alone) is refused
at the first backward. Each parameter gets its own optimizer instance (`optimizer_class(**kwargs)`,
torch's AdamW by default).

    opt = OptimizerInBackward(model.parameters(), lr=1e-4)
    loss.backward()      # parameters are updated here
    opt.step(); opt.zero_grad()   # ordinary training loops run unchanged

With ``side_stream=True`` the updates run on a second CUDA stream beside backward: ``step()`` (and
``zero_grad()``, ``state``, ``remove()``) make the training stream wait for them, so read parameters or
optimizer state only after one of those (an evaluation or checkpoint between ``backward()`` and
``step()`` would race with the updates).

`TritonAdamWInBackward`: `TritonAdamW` stepped the same way, inside backward, but as one
`torch.optim.Optimizer` with parameter groups (weight decay / no weight decay) whose hyperparameters
each update reads when it runs: an LR scheduler and the Trainer drive it unchanged
(`moe_lab.training.fastest` plugs it into a `transformers.Trainer`).
"""
from __future__ import annotations

from typing import Iterable

import torch


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _elementwise_placements(p) -> bool:
    """An elementwise update of a DTensor is that of its local shards where no placement is Partial
    (Shard: each rank owns its slice; Replicate: each rank runs the same update on the same values)."""
    from torch.distributed.tensor import Replicate, Shard

    return all(isinstance(pl, (Shard, Replicate)) for pl in p.placements)


def _local_shards(p: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors one parameter's update reads and writes, as the kernel takes them: plain tensors
    as they are; for a DTensor parameter (an FSDP2 shard), its local shard and those of its gradient
    and moments, which must be DTensors of the same mesh and placements (the update is elementwise,
    so running it on every rank's local shard updates the whole parameter)."""
    if not _is_dtensor(p):
        for name, t in zip(("gradient", "exp_avg", "exp_avg_sq"), others):
            if _is_dtensor(t):
                raise ValueError(f"TritonAdamW: a plain parameter of shape {tuple(p.shape)} has a DTensor {name}")
        return (p, *others)
    local = [p.to_local()]
    for name, t in zip(("gradient", "exp_avg", "exp_avg_sq"), others):
        if not _is_dtensor(t) or t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
            got = f"placements {tuple(t.placements)}" if _is_dtensor(t) else "a plain tensor"
            raise ValueError(f"TritonAdamW: the {name} of a DTensor parameter (placements {tuple(p.placements)}) "
                             f"has {got}; it must be sharded as the parameter is")
        local.append(t.to_local())
    return tuple(local)


def _reducer_of(param: torch.Tensor):
    """The expert-parallel `GradientReducer` that reduces ``param``'s gradient, if any."""
    ref = getattr(param, "_moe_lab_grad_reducer", None)
    reducer = ref() if ref is not None else None
    return reducer if reducer is not None and reducer._owns(param) else None


def _reduced_by_nobody(param: torch.Tensor, update):
    """A post-accumulate-grad hook for a parameter whose gradient is final when autograd has
    accumulated it: one process, or an FSDP2 shard (FSDP2 runs these hooks after its reduce-scatter).
    Refuses, at the first backward, a plain tensor in a job of several processes: something (DDP)
    would reduce its gradient after this hook, and the update would use this rank's alone."""

    def hook(p):
        if not _is_dtensor(p):
            if _reducer_of(p) is not None:
                raise RuntimeError("the optimizer in backward was built before this model became expert-parallel; "
                                   "build it after from_pretrained(..., ep_size=...) / apply_expert_parallel")
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError(
                    f"the optimizer in backward: a plain (not DTensor) parameter of shape {tuple(p.shape)} in a job "
                    f"of {dist.get_world_size()} processes; its gradient is reduced across them (DDP) only after "
                    "this hook, so the update would use this rank's gradient alone. It runs in one process, on "
                    "FSDP2's sharded parameters, and on moe_lab's expert-parallel models (ep_size)")
        update(p)

    return hook


def hook_after_reduction(param: torch.Tensor, update) -> list:
    """Arrange ``update(param)`` inside every backward once ``param``'s gradient is final, reduced across
    processes where it is: after FSDP2's reduce-scatter for its shards (their post-accumulate hooks),
    after moe_lab's expert-parallel reduction (or the DDP around that model) for the parameters it
    reduces; at accumulation in one process. Returns the handles to remove."""
    reducer = _reducer_of(param)
    if reducer is None:
        return [param.register_post_accumulate_grad_hook(_reduced_by_nobody(param, update))]
    # the accumulation only makes sure the reduction runs in this backward; the update follows it
    return [param.register_post_accumulate_grad_hook(lambda p: reducer.ensure_reduction()),
            reducer.register_update(param, update)]


class TritonAdamW(torch.optim.Optimizer):
    """AdamW with the update of PyTorch's (decoupled weight decay, bias-corrected moments, moments
    stored in the parameter's dtype, arithmetic in float32 as its fused path does), stepped by a
    Triton kernel per parameter. CUDA tensors (or CPU ones under Triton's interpreter); dense,
    contiguous parameters and gradients; no amsgrad, maximize or capturable."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"TritonAdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TritonAdamW: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        from triton_kernels._common import runs_on

        for p in (p for g in self.param_groups for p in g["params"]):
            if _is_dtensor(p) and not _elementwise_placements(p):
                raise ValueError(f"TritonAdamW: a DTensor parameter with placements {p.placements}: the update runs "
                                 "on each rank's local shard, which needs Shard or Replicate placements (not Partial)")
            if not runs_on(p.device):
                raise ValueError(f"TritonAdamW: parameters on {p.device}; its kernel runs on CUDA "
                                 "(or on the CPU under Triton's interpreter, TRITON_INTERPRET=1)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    @torch.no_grad()
    def _update(self, p: torch.Tensor, group: dict) -> None:
        """One parameter's update from its gradient, with its group's hyperparameters as they are now."""
        from triton_kernels.adamw import adamw_step_

        if p.grad.is_sparse or not p.is_floating_point():
            raise ValueError("TritonAdamW: dense floating-point parameters and gradients only")
        state = self.state[p]
        if not state:
            state["step"] = 0
            # a DTensor parameter's moments are DTensors of its placements (as torch's AdamW keeps them)
            fmt = {} if _is_dtensor(p) else {"memory_format": torch.contiguous_format}
            state["exp_avg"] = torch.zeros_like(p, **fmt)
            state["exp_avg_sq"] = torch.zeros_like(p, **fmt)
        state["step"] = int(state["step"]) + 1  # a state loaded from torch's AdamW holds a tensor
        beta1, beta2 = group["betas"]
        param, grad, exp_avg, exp_avg_sq = _local_shards(p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        adamw_step_(param, grad, exp_avg, exp_avg_sq, step=state["step"], lr=float(group["lr"]),
                    beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


class TritonAdamWInBackward(TritonAdamW):
    """`TritonAdamW` stepped inside backward: each parameter is updated as soon as its gradient is
    complete (`register_post_accumulate_grad_hook`), and its gradient is freed at once.

    Unlike `OptimizerInBackward` (one optimizer per parameter), this is one `torch.optim.Optimizer`
    with the caller's parameter groups, state and `state_dict` of `TritonAdamW`: an LR scheduler,
    accelerate and the Trainer drive it as any optimizer. Each update reads its group's
    hyperparameters when its gradient arrives, from ``self.param_groups`` as it is then (a
    scheduler's lr for this step; `load_state_dict` replaces the group dicts, so hooks hold group
    indices, not dicts). `step()` updates nothing: with ``side_stream=True`` (CUDA parameters) it
    makes the current stream wait for the updates queued beside backward, as do `zero_grad()`,
    `state_dict()`, `load_state_dict()` and `remove()`; read parameters or state only after one of
    them. The training loop must not clip or accumulate gradients; across processes the updates
    follow the reductions where moe_lab can see them (see `OptimizerInBackward`)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, side_stream: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.side_stream = side_stream
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._group_index: dict[torch.Tensor, int] = {}
        self._handles = []
        for group in self.param_groups:  # every check first: a failure leaves no hook behind
            self._check_group(group)
        for index, group in enumerate(self.param_groups):
            self._hook_group(index, group)
        if not self._group_index:
            raise ValueError("TritonAdamWInBackward: no parameter requires a gradient")

    def _check_group(self, group: dict) -> None:
        if self.side_stream:
            for p in group["params"]:
                if p.device.type != "cuda":
                    raise ValueError("TritonAdamWInBackward(side_stream=True) needs CUDA parameters, "
                                     f"got one on {p.device}")

    def _hook_group(self, index: int, group: dict) -> None:
        for p in group["params"]:
            if p.requires_grad:
                self._group_index[p] = index
                self._handles.extend(hook_after_reduction(p, self._step_in_backward))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if "_handles" in self.__dict__:  # a group added after construction is checked and hooked too
            group = self.param_groups[-1]
            try:
                self._check_group(group)
            except ValueError:
                self.param_groups.pop()
                raise
            self._hook_group(len(self.param_groups) - 1, group)

    def _step_in_backward(self, param: torch.Tensor) -> None:
        group = self.param_groups[self._group_index[param]]
        if not self.side_stream:
            self._update(param, group)
        else:
            stream = self._streams.get(param.device)
            if stream is None:
                stream = self._streams[param.device] = torch.cuda.Stream(param.device)
            stream.wait_stream(torch.cuda.current_stream(param.device))  # the gradient is complete
            with torch.cuda.stream(stream):
                self._update(param, group)
            param.grad.record_stream(stream)  # its memory is reused only after the update has read it
        param.grad = None

    def wait(self) -> None:
        """Make each device's current stream wait for the updates queued on the side stream."""
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def step(self, closure=None):
        """Every parameter was updated during backward (``closure``'s, when given); wait for those updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.wait()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.wait()
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        self.wait()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.wait()
        super().load_state_dict(state_dict)

    def remove(self) -> None:
        """Detach the hooks (the parameters go back to ordinary gradients, which `step()` then ignores)."""
        self.wait()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class OptimizerInBackward:
    """Per-parameter optimizers stepped from `register_post_accumulate_grad_hook`.

    ``side_stream=True`` (CUDA only): each parameter's step is queued on a second CUDA stream once its
    gradient is ready, so the memory-bound optimizer runs beside the rest of backward instead of
    after it. ``step()`` then makes the current stream wait for those updates; call it before the
    next forward (the training loop's usual ``optimizer.step()`` does).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer_class=torch.optim.AdamW, *,
                 side_stream: bool = False, **kwargs):
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._handles = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.side_stream = side_stream
        for param in params:  # every check and every optimizer first: a failure leaves no hook behind
            if not param.requires_grad or param in self.optimizers:
                continue
            if side_stream and param.device.type != "cuda":
                raise ValueError(f"OptimizerInBackward(side_stream=True) needs CUDA parameters, got one on {param.device}")
            self.optimizers[param] = optimizer_class([param], **kwargs)
        if not self.optimizers:
            raise ValueError("OptimizerInBackward: no parameter requires a gradient")
        for param in self.optimizers:
            self._handles.extend(hook_after_reduction(param, self._step_one))

    def _step_one(self, param: torch.nn.Parameter) -> None:
        optimizer = self.optimizers[param]
        if not self.side_stream:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        stream = self._streams.get(param.device)
        if stream is None:
            stream = self._streams[param.device] = torch.cuda.Stream(param.device)
        stream.wait_stream(torch.cuda.current_stream(param.device))  # the gradient is complete
        with torch.cuda.stream(stream):
            optimizer.step()
        param.grad.record_stream(stream)  # its memory is reused only after the update has read it
        optimizer.zero_grad(set_to_none=True)

    def wait(self) -> None:
        """Make each device's current stream wait for the updates queued on the side stream."""
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def step(self) -> None:
        """Every parameter was updated during backward; with a side stream, wait for those updates."""
        self.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients were freed during backward; with a side stream, wait for the updates."""
        self.wait()

    @property
    def state(self) -> dict:
        """Every parameter's optimizer state, as `torch.optim.Optimizer.state` maps it (after the updates)."""
        self.wait()
        return {p: opt.state[p] for p, opt in self.optimizers.items() if p in opt.state}

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def remove(self) -> None:
        """Detach the hooks (the parameters go back to ordinary gradients)."""
        self.wait()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
