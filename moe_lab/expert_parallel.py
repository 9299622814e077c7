"""Expert parallelism on torch.distributed: experts sharded over ranks, rows sent to their owner.

A DeviceMesh of shape (dp_replicate, ep): each rank of an `ep` group holds E/ep consecutive experts
(rank r owns experts [r*E/ep, (r+1)*E/ep)); the `dp_replicate` dimension holds copies of the same
expert shard. Everything that is not an expert is replicated on every rank, and every rank feeds its
own batch (data parallel over all ranks).

The `all2all` dispatcher sends each expert-sorted row to the rank owning its expert with
`all_to_all_single` (uneven splits, autograd: the backward of a send is the reverse send), runs the
local experts, and sends the results back. Works on NCCL and on gloo.

Gradients: `reduce_gradients(model)` after backward makes every gradient the gradient of the mean
loss over all ranks: non-expert gradients are averaged over all ranks; an expert's gradient already
holds the contributions of every rank's tokens (they came through the all-to-all), so it is summed
over its replicas and divided by the world size.

With `fsdp=True` the non-expert parameters are sharded with FSDP2 (`fully_shard` per decoder layer
and at the root, over all ranks; the experts are its ignored parameters): FSDP2 then averages their
gradients itself (reduce-scatter), and `reduce_gradients` only handles the experts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .dispatch import Dispatched
from .permutation import Permutation

logger = logging.getLogger(__name__)

EXPERT_PARAM_NAMES = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


@dataclass
class ExpertParallelContext:
    """The mesh of an expert-parallel run. ep_group: ranks that share one layer's experts between them;
    replica_group: ranks holding the same expert shard (size dp_replicate)."""

    ep_size: int
    ep_rank: int
    world_size: int
    ep_group: object
    replica_group: object
    mesh: object = None
    fsdp_mesh: object = None  # set when the non-expert parameters are sharded with FSDP2

    @property
    def dp_replicate(self) -> int:
        return self.world_size // self.ep_size

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def init_distributed_if_needed() -> None:
    """Initialise the default process group from torchrun's environment if nobody did yet."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "ep_size needs torch.distributed: launch with torchrun (or call torch.distributed.init_process_group first)"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def check_divisible(num_experts: int, ep_size: int, model_type: str = "?") -> None:
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(
            f"model type {model_type!r} has {num_experts} experts per layer, not divisible by ep_size={ep_size}"
        )


def make_context(ep_size: int, num_experts: int, model_type: str = "?") -> ExpertParallelContext:
    """Build the (dp_replicate, ep) DeviceMesh over all ranks; refuse a mesh the model cannot use."""
    check_divisible(num_experts, ep_size, model_type)
    init_distributed_if_needed()
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world} (ranks in this job)")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp_replicate", "ep"))
    return ExpertParallelContext(
        ep_size=ep_size,
        ep_rank=mesh.get_local_rank("ep"),
        world_size=world,
        ep_group=mesh.get_group("ep"),
        replica_group=mesh.get_group("dp_replicate"),
        mesh=mesh,
    )


class _AllToAll(torch.autograd.Function):
    """rows [sum(send_splits), H] -> [sum(recv_splits), H]; backward sends the gradient back."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty(sum(send_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(rows, send_splits, recv_splits, group)


class AllToAllDispatcher:
    """Send expert-sorted rows to the ranks owning their experts, and the results back."""

    name = "all2all"

    def __init__(self, ep: ExpertParallelContext | None = None, num_experts: int | None = None, **_):
        if ep is None:
            raise ValueError("the all2all dispatcher needs expert parallelism: pass ep_size=N under torchrun")
        self.ep = ep
        self.num_local = num_experts // ep.ep_size
        self.last_local_rows = 0

    def dispatch(self, x: torch.Tensor, perm: Permutation) -> Dispatched:
        """x [S, H] sorted by global expert -> local rows [S_local, H] sorted by local expert."""
        ep, local = self.ep, self.num_local
        send_counts = perm.counts.view(ep.ep_size, local)  # [dst rank, local expert]
        recv_counts = torch.empty_like(send_counts)  # [src rank, local expert]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=ep.ep_group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all(x, send_splits, recv_splits, ep.ep_group)  # grouped by source rank
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=x.device).repeat(ep.ep_size), recv_counts.flatten(), output_size=received.shape[0]
        )
        order = torch.argsort(expert_of_row, stable=True)  # -> by local expert, then source rank
        counts = recv_counts.sum(0)
        self.last_local_rows = received.shape[0]  # rows this rank's experts got (for tests and traces)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return Dispatched(received[order], counts, offsets, handle=(order, send_splits, recv_splits))

    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """y [S_local, H] in local-expert order -> [S, H] back on the source ranks, in their order."""
        order, send_splits, recv_splits = dispatched.handle
        if y.shape[0] == 0 and torch.is_grad_enabled() and dispatched.x.requires_grad:
            # No row reached this rank's experts, so `y` may not be connected to the received rows;
            # connect it, or this rank would skip the backward all-to-alls the other ranks wait in.
            y = y + dispatched.x.sum() * 0
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(y[inverse], recv_splits, send_splits, self.ep.ep_group)


# ---- sharding, gradients and checkpoints -----------------------------------------------------------
def expert_modules(model: nn.Module):
    """(name, module) of every experts module moe_lab runs (inside MoELayers or adapted in place)."""
    from .layer import MoELayer

    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield f"{name}.experts", module.experts
        elif hasattr(module, "moe_lab_spec"):
            yield name, module


def shard_experts(model: nn.Module, ep: ExpertParallelContext) -> None:
    """Keep only this rank's experts in every experts module (slices of the full 3D tensors)."""
    for _, experts in expert_modules(model):
        for pname in EXPERT_PARAM_NAMES:
            param = getattr(experts, pname, None)
            if param is None:
                continue
            mine = ep.local_experts(param.shape[0])
            local = nn.Parameter(param.detach()[mine.start : mine.stop].clone(), requires_grad=param.requires_grad)
            local.moe_lab_expert_shard = (mine.start, mine.stop, param.shape[0])
            setattr(experts, pname, local)
        if hasattr(experts, "num_experts"):
            experts.num_experts = len(ep.local_experts(experts.num_experts))


def is_expert_shard(param: torch.Tensor) -> bool:
    return hasattr(param, "moe_lab_expert_shard")


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_non_experts_fsdp2(model: nn.Module, ep: ExpertParallelContext) -> None:
    """FSDP2 over all ranks for every parameter that is not an expert shard: one unit per decoder
    layer (v5's `_no_split_modules` classes) and the root for the rest (embeddings, norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (ep.world_size,), mesh_dim_names=("fsdp",))
    experts = {p for p in model.parameters() if is_expert_shard(p)}
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found for FSDP2 (_no_split_modules is empty)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in experts})
    fully_shard(model, mesh=mesh, ignored_params=experts)
    ep.fsdp_mesh = mesh


def reduce_gradients(model: nn.Module, ep: ExpertParallelContext) -> None:
    """After backward: every gradient becomes that of the mean loss over all ranks (see module doc)."""
    for param in model.parameters():
        if _is_dtensor(param) or not param.requires_grad:  # FSDP2 reduced its own shards already
            continue
        if param.grad is None:
            # e.g. experts that got no row on this rank: every rank must run the same collectives
            param.grad = torch.zeros_like(param)
        if is_expert_shard(param):
            if ep.dp_replicate > 1:
                dist.all_reduce(param.grad, group=ep.replica_group)
            param.grad.div_(ep.world_size)
        else:
            dist.all_reduce(param.grad)
            param.grad.div_(ep.world_size)


def full_state_dict(model: nn.Module, ep: ExpertParallelContext) -> dict[str, torch.Tensor]:
    """The single-process state dict: expert shards gathered over the ep group (every rank gets it)."""
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if is_expert_shard(tensor):
            pieces = [torch.empty_like(tensor) for _ in range(ep.ep_size)]
            dist.all_gather(pieces, tensor.detach().contiguous(), group=ep.ep_group)
            state[name] = torch.cat(pieces).cpu()
        elif _is_dtensor(tensor):
            state[name] = tensor.detach().full_tensor().cpu()
        else:
            state[name] = tensor.detach().cpu()
    return state


def enable_expert_parallel_save(model: nn.Module, ep: ExpertParallelContext) -> None:
    """Make `model.save_pretrained(path)` write one standard checkpoint (rank 0 writes; all ranks must call)."""
    original = model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        state = full_state_dict(model, ep)
        kwargs.setdefault("state_dict", state)
        kwargs.setdefault("is_main_process", dist.get_rank() == 0)
        if dist.get_rank() == 0:
            original(save_directory, *args, **kwargs)
        dist.barrier()

    model.save_pretrained = save_pretrained
