"""Expert parallelism on torch.distributed: experts sharded over ranks, rows sent to their owner.

Two entries, one path:
- `moe_lab.AutoModelForCausalLM.from_pretrained(path, ep_size=N)` (or `patch_model(model, ep_size=N)`)
  builds the mesh below over every rank and applies it;
- `apply_expert_parallel(model, mesh)` applies a mesh the user built (torchtitan's form) to a model
  that moe_lab has patched: a DeviceMesh over all ranks with an "ep" dimension and optionally a
  "dp_replicate" one.

The mesh is (dp_replicate, ep): each rank of an `ep` group holds E/ep consecutive experts (rank r owns
experts [r*E/ep, (r+1)*E/ep)); the `dp_replicate` dimension holds copies of the same expert shard.
Everything that is not an expert is replicated on every rank, and every rank feeds its own batch
(data parallel over all ranks).

The `all2all` dispatcher sends each expert-sorted row to the rank owning its expert with
`all_to_all_single` (uneven splits, autograd: the backward of a send is the reverse send), runs the
local experts, and sends the results back. Works on NCCL and on gloo.

Gradients are reduced inside backward, with no call from the user: once `loss.backward()` returns,
every gradient is that of the mean of the ranks' losses. A hook on each parameter notes what this
backward adds to its gradient; at the end of the backward (an autograd-engine callback, as DDP's)
`GradientReducer` reduces those contributions in buckets, in one fixed order on every rank:
non-expert gradients are averaged over all ranks; an expert shard's gradient already holds the
contributions of every rank's tokens (they came through the all-to-all), so it is summed over its
replicas and divided by the world size. Only this backward's contribution is reduced, so gradients
accumulated over micro-batches stay right.

An optimizer that steps inside backward (`moe_lab.training.optim.TritonAdamWInBackward`,
`OptimizerInBackward`) must see each gradient only once it is reduced; a parameter's gradient is
complete (autograd's post-accumulate hook) before it is reduced. So such an optimizer registers
the update of each parameter this reducer hooks with `GradientReducer.register_update`, and the
reducer runs it once the gradient is reduced: right after that parameter's bucket (while later
buckets are still in flight), for every parameter that has a gradient after the reduction (also one
that got none on this rank: replicas stay equal); a parameter that the DDP around the model averages
is updated after DDP's own end-of-backward reduction (an autograd-engine callback queued after
DDP's). FSDP2 runs a sharded parameter's post-accumulate hooks itself, after its reduce-scatter, so
those updates run there, layer by layer during backward.

Under DistributedDataParallel (the HF Trainer and accelerate wrap the model in it when several
processes run) the expert shards are on DDP's ignore list (each rank holds different experts), DDP
averages the rest itself, and the hooks, seeing the forward run inside that DDP, reduce only the
expert shards. With `fsdp=True` the non-expert parameters are sharded with FSDP2 (`fully_shard` per
decoder layer and at the root, over all ranks; the experts are its ignored parameters): FSDP2
averages their gradients itself (reduce-scatter), and the hooks reduce only the experts.

A gradient norm computed on one rank sees only that rank's expert shards: `clip_grad_norm_(model,
max_norm)` here counts every shard once (the norm one process computes, the same on every rank). The
HF Trainer's `max_grad_norm` and accelerate's `Accelerator.clip_grad_norm_` use it by themselves for
an expert-parallel model (`moe_lab.parallel.trainer_support`).
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


logger = logging.getLogger(__name__)

_EXPERT_PARALLEL_MODELS = weakref.WeakSet()  # every model apply_expert_parallel made expert-parallel

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


def make_mesh(ep_size: int, num_experts=(), model_type: str = "?"):
    """The (dp_replicate, ep) DeviceMesh over all ranks (initialising torch.distributed from torchrun's
    environment if needed); refuses an ep_size that does not divide every layer's expert count or the world."""
    for count in sorted(set([num_experts] if isinstance(num_experts, int) else num_experts)):
        check_divisible(count, ep_size, model_type)
    if ep_size < 1:
        raise ValueError(f"ep_size must be at least 1, got {ep_size}")
    init_distributed_if_needed()
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world} (ranks in this job)")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp_replicate", "ep"))


def context_from_mesh(mesh) -> ExpertParallelContext:
    """The ExpertParallelContext of a DeviceMesh with an "ep" dimension (and optionally "dp_replicate")
    that spans every rank of the job."""
    names = tuple(mesh.mesh_dim_names or ())
    if "ep" not in names or set(names) - {"ep", "dp_replicate"}:
        raise ValueError(f"expert parallelism takes a DeviceMesh with dimensions 'ep' and optionally 'dp_replicate', "
                         f"got {names or 'unnamed dimensions'}")
    world = dist.get_world_size()
    if mesh.size() != world:
        raise ValueError(f"the mesh spans {mesh.size()} ranks, the job {world}: every rank must be in it "
                         "(non-expert gradients are averaged over all ranks)")
    return ExpertParallelContext(
        ep_size=mesh.size(names.index("ep")),
        ep_rank=mesh.get_local_rank("ep"),
        world_size=world,
        ep_group=mesh.get_group("ep"),
        replica_group=mesh.get_group("dp_replicate") if "dp_replicate" in names else None,
        mesh=mesh,
    )


def make_context(ep_size: int, num_experts: int, model_type: str = "?") -> ExpertParallelContext:
    """Build the (dp_replicate, ep) mesh over all ranks and its context (see `make_mesh`)."""
    return context_from_mesh(make_mesh(ep_size, num_experts, model_type))


# ---- applying a mesh to a patched model ------------------------------------------------------------
def _moe_sites(model: nn.Module):
    """(qualified name, module, is_layer) of every place moe_lab runs experts: a `MoELayer` (is_layer)
    or a v5 experts module adapted in place (the generic path)."""
    from ..layer import MoELayer

    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield name, module, True
        elif hasattr(module, "moe_lab_spec"):
            yield name, module, False


def expert_modules(model: nn.Module):
    """(name, module) of every experts module moe_lab runs (inside MoELayers or adapted in place)."""
    for name, module, is_layer in _moe_sites(model):
        yield (f"{name}.experts", module.experts) if is_layer else (name, module)


def _site_parts(module: nn.Module, is_layer: bool):
    """(dispatcher, planner, experts module) of one site."""
    if is_layer:
        return module.dispatcher, module.planner, module.experts
    return module.moe_lab_dispatcher, module.moe_lab_planner, module


def _rebuild_site(model: nn.Module, module: nn.Module, is_layer: bool, dispatch: str, ep: ExpertParallelContext):
    """Rebuild one site with an expert-parallel dispatcher through the layer's own constructor, which
    plans its stages for expert parallelism (refusing, or substituting, as the layer was built to).
    A MoELayer comes back unattached (nothing changes until it replaces the old one); a generic
    experts module is adapted in place."""
    from ..layer import MoELayer, adapt_experts
    from ..registry import resolve_backend

    planner = _site_parts(module, is_layer)[1]
    choice = resolve_backend({**planner.asked.names, "dispatch": dispatch})
    if is_layer:
        return MoELayer(module, module.family, model.config, choice, planner.spec, ep=ep, substitute=planner.substitute)
    adapt_experts(module, planner.spec, choice, ep=ep, substitute=planner.substitute)
    return module


def apply_expert_parallel(model: nn.Module, mesh, *, dispatch: str = "all2all", fsdp: bool = False) -> nn.Module:
    """Shard the experts of a moe_lab-patched model over `mesh` and make its gradients right; returns it.

    `mesh`: a DeviceMesh over all ranks with an "ep" dimension (expert shards) and optionally a
    "dp_replicate" one (copies of each shard), e.g.
    `init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp_replicate", "ep"))`. `dispatch`: the
    dispatcher that moves rows between ranks ("all2all", or "deepep" on one node of GPUs); `fsdp`:
    shard the non-expert parameters with FSDP2 over all ranks. After this, each rank keeps E/ep
    experts per layer, gradients are reduced inside backward (see the module doc: no
    `reduce_gradients` call), DDP wrapping the model leaves the expert shards alone, and
    `save_pretrained` (called on every rank) and the HF Trainer's `save_model` and checkpoints write
    one standard checkpoint, and the Trainer's and accelerate's gradient clipping use the whole model's
    norm (see `moe_lab.parallel.trainer_support`). `from_pretrained(..., ep_size=N)` calls this with the
    mesh of `make_mesh(N)`.
    """
    if getattr(model, "moe_lab_ep", None) is not None:
        raise ValueError("this model is already expert-parallel (model.moe_lab_ep is set)")
    sites = list(_moe_sites(model))
    if not sites:
        raise ValueError(f"{type(model).__name__} has no moe_lab MoE layer: patch it first "
                         "(moe_lab.patch_model or moe_lab.AutoModelForCausalLM)")
    contexts = {id(c): c for c in (getattr(_site_parts(m, l)[0], "ep", None) for _, m, l in sites) if c is not None}
    if len(contexts) > 1 or any(c.mesh is not mesh for c in contexts.values()):
        raise ValueError("some MoE layers already dispatch over another expert-parallel mesh")
    ep = next(iter(contexts.values())) if contexts else context_from_mesh(mesh)  # patch_model built it
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    for _, module, is_layer in sites:  # every check before anything changes
        check_divisible(_site_parts(module, is_layer)[1].spec.num_experts, ep.ep_size, model_type)
    unbound = [(n, m, l) for n, m, l in sites if getattr(_site_parts(m, l)[0], "ep", None) is None]
    if any(_site_parts(m, l)[0].name != "local" for _, m, l in unbound):
        raise ValueError("apply_expert_parallel takes a model whose MoE layers dispatch locally")
    rebuilt = [(name, is_layer, _rebuild_site(model, module, is_layer, dispatch, ep)) for name, module, is_layer in unbound]
    for name, is_layer, new in rebuilt:
        if is_layer:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if rebuilt:  # model.moe_lab_plan reads the rebuilt layers' planners itself
        labels = {_site_parts(m, l)[1].asked.label for _, m, l in _moe_sites(model)}
        if len(labels) == 1:
            model.moe_lab_backend = labels.pop()
    shard_experts(model, ep)
    if fsdp:
        shard_non_experts_fsdp2(model, ep)
    enable_expert_parallel_save(model, ep)
    ignore_expert_shards_in_ddp(model)
    model.moe_lab_ep = ep
    model.moe_lab_grad_reducer = GradientReducer(model, ep)
    _EXPERT_PARALLEL_MODELS.add(model)
    from .trainer_support import install_trainer_support

    install_trainer_support()
    return model


# ---- sharding ----------------------------------------------------------------------------------------
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


@functools.cache
def _dtensor_class():
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(tensor) -> bool:
    return isinstance(tensor, _dtensor_class())


def ignore_expert_shards_in_ddp(model: nn.Module) -> None:
    """Put the expert shards on DistributedDataParallel's ignore list for `model`: DDP wrapping it
    (as the HF Trainer and accelerate do) neither broadcasts them from rank 0 nor averages their
    gradients. (DDP reads the list from the module it wraps: a wrapper around this model needs
    the same call on itself.)"""
    from torch.nn.parallel import DistributedDataParallel

    names = {name for name, param in model.named_parameters() if is_expert_shard(param)}
    names |= set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()) or ())
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))


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


# ---- gradients -------------------------------------------------------------------------------------
_FRESH = object()  # the parameter had no gradient when this backward reached it: all of p.grad is new
BUCKET_BYTES = 25 * 2**20  # gradients reduced per collective (as DDP's default bucket)
_PARAMETERS_REGISTERED = [0]  # bumped whenever any module registers a parameter (PEFT adapters, ...)


@functools.cache
def _count_parameter_registrations() -> None:
    def bump(module, name, param):
        _PARAMETERS_REGISTERED[0] += 1

    nn.modules.module.register_module_parameter_registration_hook(bump)


class GradientReducer:
    """Reduces the gradients of an expert-parallel model inside every backward (see the module doc).

    Each trainable parameter that is not a DTensor (FSDP2 reduces those) gets a tensor hook that
    notes this backward's contribution to its gradient, and the first hook of a backward queues
    `_reduce` to run when the backward ends. `_reduce` walks all those parameters in one order on
    every rank; a parameter that got no gradient on this rank contributes zeros, so every rank runs
    the same collectives. A parameter with no gradient on any rank keeps `grad=None`.

    The parameters are looked up again at the first forward that records gradients (a model
    materialised from the meta device gets new ones) and whenever a module registered a new
    parameter since (PEFT adapters). Making a frozen parameter trainable after training started
    needs `refresh()`. `enabled = False` turns the reduction off (then call `reduce_gradients`).
    `last_reduced`: how many parameters the last backward reduced (DDP's own are not counted).
    """

    def __init__(self, model: nn.Module, ep: ExpertParallelContext):
        _count_parameter_registrations()
        self.ep = ep
        self.enabled = True
        self.last_reduced = 0
        self._model = weakref.ref(model)
        self._token = object()
        self._params: list[torch.Tensor] = []
        self._seen_registrations = -1  # refresh at the first forward
        self._pending: dict[int, object] = {}
        self._updates: dict[int, tuple] = {}  # id -> (parameter ref, update): an optimizer stepping in backward
        self._queued = False
        self._ddp_ref = None
        self._ddp_ids: frozenset = frozenset()  # parameters the DDP around this model reduces
        self._skip: frozenset = frozenset()  # those of them that the last forward ran under
        self.refresh()
        self._seen_registrations = -1
        model.register_forward_pre_hook(self._before_forward)

    # -- hooks
    def refresh(self) -> None:
        """Hook every trainable parameter the model has now (see the class doc)."""
        model = self._model()
        self._seen_registrations = _PARAMETERS_REGISTERED[0]
        params = [p for p in model.parameters() if p.requires_grad and not _is_dtensor(p)]
        for param in params:
            if getattr(param, "_moe_lab_reducer", None) is not self._token:
                param.register_hook(self._grad_hook(weakref.ref(param)))
                param._moe_lab_reducer = self._token
                param._moe_lab_grad_reducer = weakref.ref(self)  # for an optimizer stepping in backward
        self._params = params

    def _grad_hook(self, param_ref):
        def hook(grad):
            param = param_ref()
            if not self.enabled or param is None or id(param) in self._skip:
                return None
            key = id(param)
            seen = self._pending.get(key)
            if seen is None:
                self._pending[key] = _FRESH if param.grad is None else grad
            elif seen is not _FRESH:
                self._pending[key] = seen + grad
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._reduce)
            return None

        return hook

    def register_update(self, param: torch.Tensor, update):
        """Run ``update(param)`` inside every backward once ``param``'s gradient is reduced (by this
        reducer, or by the DDP around the model), where it has a gradient then (see the module doc).
        For an optimizer that steps in backward; it must also call `ensure_reduction` from the
        parameter's post-accumulate-grad hook. Returns a handle whose ``remove()`` undoes this."""
        if not self._owns(param):
            raise ValueError("register_update: this parameter's gradient is not reduced by this reducer "
                             "(a DTensor, frozen, or not in the model)")
        key = id(param)
        self._updates[key] = (weakref.ref(param), update)
        reducer = self

        class Handle:
            def remove(self_):
                entry = reducer._updates.get(key)
                if entry is not None and entry[1] is update:
                    del reducer._updates[key]

        return Handle()

    def _owns(self, param) -> bool:
        return getattr(param, "_moe_lab_reducer", None) is self._token

    def ensure_reduction(self) -> None:
        """Make sure the end-of-backward reduction (and the registered updates) runs in this backward."""
        if not self.enabled:
            raise RuntimeError("an optimizer steps inside backward, but the automatic gradient reduction of this "
                               "expert-parallel model is off (moe_lab_grad_reducer.enabled = False): it would step on "
                               "one rank's gradients; turn the reduction on or step after reduce_gradients")
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def _run_updates(self, params) -> None:
        """The registered updates of ``params`` that have a (reduced) gradient now."""
        for param in params:
            entry = self._updates.get(id(param))
            if entry is not None and param.grad is not None and entry[0]() is param:
                entry[1](param)

    def _run_updates_after_ddp(self) -> None:
        """Queued from `_reduce`, so after DDP's end-of-backward callback (queued during backward): the
        gradients DDP averages are in .grad now."""
        self._run_updates([p for p in self._params if id(p) in self._skip])

    def _before_forward(self, model, args):
        if not torch.is_grad_enabled():
            return
        if self._seen_registrations != _PARAMETERS_REGISTERED[0]:
            self.refresh()
        self._skip = self._ddp_reduced(model)

    def _ddp_reduced(self, model) -> frozenset:
        """ids of the parameters a DistributedDataParallel running this forward reduces itself."""
        from torch.nn.parallel import DistributedDataParallel

        ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
        if ddp is None:
            return frozenset()
        if self._ddp_ref is None or self._ddp_ref() is not ddp:
            ignored = getattr(ddp, "parameters_to_ignore", set())
            ids = frozenset(id(p) for n, p in ddp.module.named_parameters() if n not in ignored)
            averaged = [n for n, p in model.named_parameters() if is_expert_shard(p) and id(p) in ids]
            if averaged:
                raise RuntimeError(
                    f"DistributedDataParallel would average expert shards ({averaged[0]}, ...) that differ per rank. "
                    "It reads its ignore list from the module it wraps: call "
                    "moe_lab.parallel.expert_parallel.ignore_expert_shards_in_ddp(wrapper) on that module before wrapping")
            self._ddp_ref, self._ddp_ids = weakref.ref(ddp), ids
        return self._ddp_ids

    # -- the end-of-backward reduction
    def _reduce(self) -> None:
        self._queued = False
        self._reduce_own()
        if self._updates and any(id(p) in self._updates for p in self._params if id(p) in self._skip):
            # parameters the DDP around the model averages: updated after its own end-of-backward reduction
            torch.autograd.Variable._execution_engine.queue_callback(self._run_updates_after_ddp)

    def _reduce_own(self) -> None:
        pending, self._pending = self._pending, {}
        if not self.enabled:
            return
        with torch.no_grad():
            params = [p for p in self._params if id(p) not in self._skip]
            if not params:
                return
            contributions = []
            for param in params:
                seen = pending.get(id(param))
                contributions.append(param.grad if seen is _FRESH else seen)  # None: nothing from this rank
            flags = torch.tensor([c is not None for c in contributions], dtype=torch.float32, device=params[0].device)
            dist.all_reduce(flags)  # which parameters got a gradient on some rank
            todo = [(p, pending.get(id(p)), c) for p, c, any_rank in zip(params, contributions, flags.tolist()) if any_rank]
            self.last_reduced = len(todo)
            experts = [t for t in todo if is_expert_shard(t[0])]
            replicated = [t for t in todo if not is_expert_shard(t[0])]
            works = self._launch(replicated, None)
            if self.ep.dp_replicate > 1:
                works += self._launch(experts, self.ep.replica_group)
            else:  # each expert shard lives on one rank: its gradient is already the sum over all tokens
                self._scale_in_place(experts)
                self._run_updates([t[0] for t in experts])  # beside the replicated buckets' all-reduces
            for work, bucket, flat in works:
                work.wait()
                flat.div_(self.ep.world_size)
                reduced = [r.view_as(t[0]) for t, r in zip(bucket, flat.split([t[0].numel() for t in bucket]))]
                fresh = [(t[0].grad, r) for t, r in zip(bucket, reduced) if t[1] is _FRESH and t[2] is not None]
                if fresh:  # the whole gradient is this backward's: overwrite it (one fused copy)
                    torch._foreach_copy_([g for g, _ in fresh], [r for _, r in fresh])
                for (param, seen, contribution), r in zip(bucket, reduced):
                    if not (seen is _FRESH and contribution is not None):
                        self._add_reduced(param, contribution, r)
                self._run_updates([t[0] for t in bucket])  # this bucket is final; later ones may be in flight

    def _launch(self, items, group):
        """Start the all-reduces of `items` in buckets (per dtype and device): [(work, bucket, flat)]."""
        by_kind: dict = {}
        for item in items:
            by_kind.setdefault((item[0].dtype, item[0].device), []).append(item)
        works = []
        for same_kind in by_kind.values():
            buckets, size = [[]], 0
            for item in same_kind:
                if size >= BUCKET_BYTES:
                    buckets.append([])
                    size = 0
                buckets[-1].append(item)
                size += item[0].numel() * item[0].element_size()
            for bucket in buckets:
                flat = torch.cat([(c if c is not None else torch.zeros_like(p)).reshape(-1) for p, _, c in bucket])
                works.append((dist.all_reduce(flat, group=group, async_op=True), bucket, flat))
        return works

    def _scale_in_place(self, items) -> None:
        world = self.ep.world_size
        fresh = [p.grad for p, seen, c in items if seen is _FRESH and c is not None]
        if fresh:
            torch._foreach_div_(fresh, world)
        for param, seen, contribution in items:
            if seen is _FRESH and contribution is not None:
                continue
            if contribution is None:  # no gradient on this rank: its reduced gradient is zero
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            else:  # accumulated onto an earlier gradient: keep that, scale this backward's part
                param.grad.add_(contribution, alpha=1.0 / world - 1.0)

    @staticmethod
    def _add_reduced(param, contribution, reduced) -> None:
        """p.grad held an earlier gradient (or none) plus `contribution` (or nothing) from this
        backward: replace the contribution by its reduction."""
        if param.grad is None:
            param.grad = reduced.clone()
            return
        param.grad.add_(reduced)
        if contribution is not None:
            param.grad.sub_(contribution)


def reduce_gradients(model: nn.Module, ep: ExpertParallelContext | None = None) -> None:
    """No longer needed: gradients are reduced inside backward (see the module doc), and calling
    this after such a backward does nothing. It reduces by hand only where the automatic reduction
    was turned off (`model.moe_lab_grad_reducer.enabled = False`): every gradient becomes that of the
    mean loss over all ranks."""
    reducer = getattr(model, "moe_lab_grad_reducer", None)
    if reducer is not None and reducer.enabled:
        warnings.warn("moe_lab.parallel.expert_parallel.reduce_gradients is no longer needed: expert-parallel gradients are "
                      "reduced inside backward; this call does nothing", DeprecationWarning, stacklevel=2)
        return
    ep = ep if ep is not None else model.moe_lab_ep
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


def expert_parallel_context_of(parameters) -> ExpertParallelContext | None:
    """The context of the expert-parallel model whose expert shards are among ``parameters`` (a
    sequence), or None where none is: the same answer on every rank (every rank holds the same
    parameters, each with its own shard of the experts)."""
    shards = {id(p) for p in parameters if is_expert_shard(p)}
    if not shards:
        return None
    found = {id(m): m.moe_lab_ep for m in list(_EXPERT_PARALLEL_MODELS) if any(id(p) in shards for p in m.parameters())}
    if len(found) != 1:
        raise ValueError("these parameters hold expert shards of " + ("several expert-parallel models: clip each "
                         "model's gradients separately" if found else "no model that is expert-parallel now"))
    return found.popitem()[1]


def clip_grad_norm_(model, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for an expert-parallel model, called on every rank after backward
    (the gradients are reduced by then): the norm of the whole model's gradient as one process computes
    it (each expert shard counted once, its sum of powers reduced over the ep group; replicated
    parameters once; FSDP2's DTensor shards over their mesh), the same on every rank, and every
    gradient scaled by torch's factor ``min(1, max_norm / (norm + 1e-6))``. Returns the norm (before
    clipping); ``max_norm=inf`` only computes it. `model`: the expert-parallel model, a module wrapping
    it (DDP, torch.compile), or an iterable of its parameters, the same ones on every rank. The HF
    Trainer (``max_grad_norm``) and accelerate's ``Accelerator.clip_grad_norm_`` come here by themselves
    (`moe_lab.parallel.trainer_support`)."""
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    ep = expert_parallel_context_of(params)
    if ep is None:
        raise ValueError("clip_grad_norm_: no expert shard among these parameters (not an expert-parallel model): "
                         "use torch.nn.utils.clip_grad_norm_")
    return clip_expert_parallel_grads_(params, ep, max_norm, norm_type)


def clip_expert_parallel_grads_(params, ep: ExpertParallelContext, max_norm: float, norm_type: float = 2.0):
    """`clip_grad_norm_` on ``params`` of the expert-parallel model of ``ep`` (see there). A collective
    over the ep group (and FSDP2's mesh): every rank calls it with the same parameters."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    norm_type = float(norm_type)
    inf = norm_type == float("inf")
    groups: dict = {}  # "experts", "replicated", or an FSDP2 mesh -> parameters with a gradient
    for param in params:
        if param.grad is not None:
            key = "experts" if is_expert_shard(param) else getattr(param.grad, "device_mesh", "replicated")
            groups.setdefault(key, []).append(param)
    device = next(p for p in params if is_expert_shard(p)).device  # the device of the ep group's collectives
    norms = {}
    for key, group in groups.items():
        norm = get_total_norm([p.grad for p in group], norm_type)
        norms[key] = (norm.full_tensor() if _is_dtensor(norm) else norm).float().to(device)
    shards = norms.pop("experts", torch.zeros((), device=device))  # every rank joins, with or without shards
    shards = shards.clone() if inf else shards.pow(norm_type)
    dist.all_reduce(shards, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=ep.ep_group)
    total = torch.linalg.vector_norm(torch.stack([shards if inf else shards.pow(1.0 / norm_type), *norms.values()]),
                                     norm_type)
    if float(max_norm) != float("inf"):  # inf: the factor is 1, nothing to scale
        for group in groups.values():
            clip_grads_with_norm_(group, max_norm, total)
    return total


def clip_grad_norm_callback(max_norm: float, norm_type: float = 2.0):
    """A `transformers.TrainerCallback` that clips with `clip_grad_norm_` before every optimizer step, for
    ``TrainingArguments(max_grad_norm=0)``. No longer needed: the Trainer's own ``max_grad_norm`` clips
    by the whole model's norm under expert parallelism (`moe_lab.parallel.trainer_support`)."""
    from transformers import TrainerCallback

    class ClipExpertParallelGradNorm(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if args.max_grad_norm and args.max_grad_norm > 0:
                raise ValueError("clip_grad_norm_callback with max_grad_norm > 0 would clip twice: the Trainer's "
                                 "max_grad_norm clips by the whole model's norm under expert parallelism; drop the "
                                 "callback (or set max_grad_norm=0)")

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            clip_grad_norm_(model, max_norm, norm_type)

    return ClipExpertParallelGradNorm()


# ---- checkpoints ---------------------------------------------------------------------------------
def full_state_dict(model: nn.Module, ep: ExpertParallelContext, keep: bool = True) -> dict[str, torch.Tensor]:
    """The single-process state dict: expert shards gathered over the ep group. A collective: every
    rank calls it; with ``keep=False`` this rank joins the gathers and keeps nothing (returns {})."""
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if is_expert_shard(tensor):
            pieces = [torch.empty_like(tensor) for _ in range(ep.ep_size)]
            dist.all_gather(pieces, tensor.detach().contiguous(), group=ep.ep_group)
            full = torch.cat(pieces) if keep else None
        elif _is_dtensor(tensor):
            full = tensor.detach().full_tensor()  # a collective too
        else:
            full = tensor.detach()
        if keep:
            state[name] = full.cpu()
    return state


def enable_expert_parallel_save(model: nn.Module, ep: ExpertParallelContext) -> None:
    """Make `model.save_pretrained(path)` write one standard checkpoint: every rank calls it (the expert
    shards are gathered), the rank where ``is_main_process`` (default: rank 0) writes. The
    `transformers.Trainer` calls it on its writing process only: `trainer_support` makes the
    Trainer's `save_model` gather first on every rank."""
    original = model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        gathered = getattr(model, "_moe_lab_gathered_state", None)
        if gathered is not None:  # inside the Trainer's save_model: every rank gathered already, this one writes
            if kwargs.get("state_dict") is None:
                kwargs["state_dict"] = gathered
            if kwargs.get("is_main_process", True):
                original(save_directory, *args, **kwargs)
            return
        writer = kwargs.get("is_main_process")
        writer = dist.get_rank() == 0 if writer is None else bool(writer)
        state = full_state_dict(model, ep, keep=writer)
        if kwargs.get("state_dict") is None:  # the Trainer passes state_dict=None
            kwargs["state_dict"] = state
        kwargs["is_main_process"] = writer
        if writer:
            original(save_directory, *args, **kwargs)
        dist.barrier()

    model.save_pretrained = save_pretrained
