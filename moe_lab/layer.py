"""moe_lab's MoE layer: router -> permutation -> dispatch -> experts -> combine, each stage swappable.

`MoELayer` replaces a v5 sparse MoE block and adopts its children under their v5 names (`gate` or
`router`, `experts`, `shared_experts`, NemotronH's `fc1_latent_proj` / `fc2_latent_proj`), so
parameter names, layouts and checkpoints are v5's.
Shapes: B batch, L sequence, T = B*L tokens, H hidden, E experts, k top-k, S = T*k routed rows.
"""
from __future__ import annotations

import logging
import sys
import weakref
from typing import Mapping

import torch
import torch.nn as nn

from .families import Family
from .registry import LayerNeeds, StageChoice, fused_pair, plan_layer
from .stages.experts import ExpertsSpec, first_weight
from .lora import ExpertsLoRA, LoRAFactors, lora_choice, note_peft_parametrized, unwrap_peft_experts, with_lora
from .stages.router import RoutingSpec

logger = logging.getLogger(__name__)


class LayerPlanner:
    """The stages one layer runs, planned by `registry.plan_layer`: what was asked, what runs, and why
    they differ.

    At construction the layer is planned without a device (`plan_unplaced`: activation, routing and
    expert parallelism; a model is often built on the CPU or the meta device and moved later), so a
    stage that can never compute it is refused before anything changes. At each forward the plan for
    the expert weights' device type and dtype is looked up (computed once per pair): a stage that
    cannot run there is refused at that first step, or substituted (with a warning) where allowed.

    For the "auto" backend (`choice.auto`), each placed forward takes `moe_lab.auto`'s decision for
    its device, dtype and shape instead; unplaced, the plan is auto's floor (the torch backend).
    Under `moe_lab.fastest`'s CUDA graphs (`choose_under_graphs`) that decision also says whether
    the layer is captured (`AutoDecision.graphed`).
    """

    def __init__(self, choice: StageChoice, model_type: str, routing_features: frozenset, spec: ExpertsSpec,
                 substitute: bool, expert_parallel: bool, hint: str | None = None):
        self.asked = choice
        self.model_type, self.routing_features, self.spec = model_type, routing_features, spec
        self.substitute = substitute or choice.auto is not None  # auto's floor runs references where it must
        self.expert_parallel, self.hint = expert_parallel, hint
        self._plans: dict = {}  # (device type or None, dtype) -> (planned stages, StageChoice)
        self._candidates: dict = {}  # auto: (device type, dtype, graph-safe only) -> auto.CandidateSet
        self.latest: tuple | None = None  # the key of the plan the last forward ran
        self.decision = None  # auto: the AutoDecision the last forward ran
        self.v5_parallel = False  # set at the first forward under transformers' own expert-parallel plan
        self.switched_to = None  # the one set_experts_implementation chose since, while it differs
        self.graph_choice = False  # auto under fastest()'s CUDA graphs: captured or eager, measured

    def restrict_to_graph_safe(self) -> None:
        """From now on "auto" chooses among the candidates a CUDA graph can replay (before any decision)."""
        from dataclasses import replace

        from .registry import AutoSettings

        if self.asked.auto is None or self.asked.auto.graph_safe_only:
            return
        if self.decision is not None:
            raise ValueError("auto already chose this layer's stages; restrict it before the first forward")
        self.asked = replace(self.asked, auto=AutoSettings(graph_safe_only=True))
        self._candidates.clear()

    def choose_under_graphs(self) -> bool:
        """From now on "auto" weighs its best graph-safe stages replayed from a CUDA graph against its
        best stages of all run eagerly, and its decision says whether the layer is captured
        (`moe_lab.fastest`'s CUDA graphs leave a layer that chose eager uncaptured). Where replays
        cannot be timed it chooses among graph-safe stages only, and says so. Before any decision;
        returns whether this layer now chooses (it does not when not "auto" or already graph-safe only)."""
        if self.asked.auto is None or self.asked.auto.graph_safe_only:
            return False
        if self.decision is not None:
            raise ValueError("auto already chose this layer's stages; ask for the choice before the first forward")
        self.graph_choice = True
        return True

    def _needs(self, device_type: str | None, dtype: torch.dtype) -> LayerNeeds:
        return LayerNeeds(self.model_type, self.routing_features, self.spec.activation_key, device_type, dtype,
                          self.expert_parallel)

    def _plan(self, device_type: str | None, dtype: torch.dtype) -> tuple[dict, StageChoice]:
        key = (device_type, dtype)
        plan = self._plans.get(key)
        if plan is None:
            kwargs = {} if self.hint is None else {"hint": self.hint}
            plan = self._plans[key] = plan_layer(self.asked, self._needs(device_type, dtype), self.substitute, **kwargs)
            substituted = [str(p) for p in plan[0].values() if p.why is not None]
            if device_type is not None and substituted:
                logger.warning("moe_lab: %s MoE layer on %s %s: %s", self.model_type, device_type,
                               str(dtype).replace("torch.", ""), "; ".join(substituted))
        return plan

    def plan_unplaced(self, weight: torch.Tensor) -> tuple[dict, StageChoice]:
        return self._plan(None, weight.dtype)

    def choice_for(self, weight: torch.Tensor, tokens: int | None = None, backward: bool = False,
                   trial=None, lora=None) -> StageChoice:
        """The stages to run on `weight`'s device and dtype (the meta device: not placed yet). For
        "auto": the decision for `tokens` rows (forward and `backward`), measured where needed with
        `trial(choice) -> step()` (see `auto_trial`); with `lora` (the forward's `ExpertsLoRA`) the
        trials run the LoRA layer and the decision is kept apart from the base layer's."""
        key = (None if weight.device.type == "meta" else weight.device.type, weight.dtype)
        self.latest = key
        if self.asked.auto is None or key[0] is None:
            choice = self._plan(*key)[1]
            if choice.untraceable and torch.compiler.is_compiling():
                raise_untraceable(self.model_type, choice)
            return choice
        self.decision = self._decide(weight, tokens, backward, trial, lora)
        return self.decision.chosen.choice

    def _decide(self, weight: torch.Tensor, tokens, backward: bool, trial, lora=None):
        from . import auto

        if not self.graph_choice or not backward:  # graphs replay training steps only: other forwards run eagerly
            return self._auto_decision(weight, tokens, backward, trial, lora, self.asked.auto.graph_safe_only, False)
        from .training.cuda_graphs import why_replays_not_measured

        not_measured = why_replays_not_measured(weight.device)
        if not_measured is not None:  # what a model loaded with cuda_graphs=True runs: graph-safe stages only
            decision = self._auto_decision(weight, tokens, backward, trial, lora, True, False)
            return auto.not_measured_under_graphs(decision, not_measured)
        decision = self._auto_decision(weight, tokens, backward, trial, lora, False, True)
        if decision.graphed is None:  # a rule that knows nothing of graphs (torch.compile, expert parallelism)
            decision = auto.ruled(decision, True)
        return decision

    def _auto_decision(self, weight: torch.Tensor, tokens, backward: bool, trial, lora, graph_safe_only: bool,
                       graphs: bool):
        """auto's decision among all candidates or the graph-safe ones only; `graphs`: timing replays too."""
        from . import auto

        key = (weight.device.type, weight.dtype)
        if key[0] not in auto.MEASURED_DEVICES:  # nothing is measured off CUDA: the floor
            planned, choice = self._plan(*key)
            return auto.AutoDecision(auto.Candidate(auto.FLOOR, planned, choice), f"rule: {key[0]} is not measured")
        candidate_set = self._candidates.get(key + (graph_safe_only,))
        if candidate_set is None:
            dispatch = self.asked.names["dispatch"] if self.expert_parallel else None
            candidate_set = self._candidates[key + (graph_safe_only,)] = auto.candidates_for(
                self._needs(*key), dispatch, graph_safe_only)
        if torch.compiler.is_compiling():
            return auto.traced_decision(candidate_set)
        if self.expert_parallel and candidate_set.candidates:
            return auto.AutoDecision(candidate_set.candidates[0], "rule: first preference under expert parallelism "
                                     "(not measured)", excluded=candidate_set.excluded)
        if trial is None or tokens is None:
            chosen = candidate_set.candidates[0] if candidate_set.candidates else candidate_set.floor
            return auto.AutoDecision(chosen, "rule: first preference (no trial given)", excluded=candidate_set.excluded)
        geometry = (self.model_type, self.spec, self.routing_features, tuple(weight.shape))
        workload = ""
        if lora is not None:  # LoRA on the experts: its own decision, timed with the update
            ranks = tuple(sorted((name, f.rank) for name, f in lora.lora.items()))
            geometry += (("lora", ranks),)
            workload = "with LoRA (" + ", ".join(f"{name} r{rank}" for name, rank in ranks) + ")"
        return auto.decide(candidate_set, geometry, weight.device, weight.dtype, tokens, backward, trial,
                           workload=workload, graphs=graphs)

    def describe(self) -> dict:
        """{stage: "runs" or "runs (asked X: why)"}: the last forward's plan, else the unplaced one; for
        "auto" also {"auto": its decision, and how it was made}."""
        if self.asked.auto is not None and self.decision is not None and self.latest is not None and self.latest[0]:
            out = {stage: str(p) for stage, p in self.decision.chosen.planned.items()}
            out["auto"] = self.decision.describe()
        else:
            planned = self._plans[self.latest][0] if self.latest in self._plans else next(iter(self._plans.values()))[0]
            out = {stage: str(p) for stage, p in planned.items()}
            if self.asked.auto is not None:
                out["auto"] = "not decided yet: each layer chooses at its first forward on a device"
        if self.v5_parallel:
            out["dispatch"] = V5_PARALLEL_DISPATCH
        if self.switched_to is not None:
            out["experts"] = (f"transformers' {self.switched_to!r} experts implementation (set_experts_implementation; "
                              f"moe_lab's stages run again after set_experts_implementation({PATCHED_IMPLEMENTATION!r}))")
        if getattr(self, "lora", None):  # the last forward ran PEFT's LoRA on the experts (moe_lab.lora)
            out["lora"] = self.lora
        if getattr(self, "balancing", None):  # router options of moe_lab.stages.balancing.Balancer
            out["balancing"] = self.balancing
        return out


def raise_untraceable(model_type: str, choice: StageChoice):
    raise RuntimeError(
        f"moe_lab: torch.compile / torch.export cannot trace the {', '.join(choice.untraceable)} stage(s) of this "
        f"{model_type} MoE layer (their kernels are not registered as custom ops yet). Build the model with "
        "moe_backend='torch', or with the default 'auto', which runs the torch stages in traced forwards.")


def _detached_experts(experts: nn.Module, spec: ExpertsSpec, requires_grad: bool) -> nn.Module:
    """A stand-in for a v5 experts module whose weights are detached leaves sharing its storage: a
    trial computes with the layer's own weights and no gradient reaches the model. A weight takes a
    gradient in the trial (`requires_grad`) only where it trains (a base frozen for LoRA does not)."""
    stand_in = nn.Module()
    for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
        tensor = getattr(experts, name, None)
        if isinstance(tensor, torch.Tensor):
            stand_in.__dict__[name] = tensor.detach().requires_grad_(requires_grad and tensor.requires_grad)
    if hasattr(experts, "act_fn"):
        stand_in.__dict__["act_fn"] = experts.act_fn
    return stand_in


def auto_trial(hidden: torch.Tensor, experts: nn.Module, spec: ExpertsSpec, backward: bool, dispatcher,
               ids: torch.Tensor | None = None, weights: torch.Tensor | None = None,
               router: nn.Module | None = None, routing: RoutingSpec | None = None,
               expert_hidden: torch.Tensor | None = None, lora=None):
    """trial(choice) -> step(): runs this layer once with `choice` on detached copies of this forward's
    hidden [T, H] (and backward to the hidden states and every weight that trains when `backward`).
    Routing: the given ids/weights [T, k] (v5's router ran), or `choice`'s router on `router`'s weights.
    expert_hidden [T, H']: the rows the routed experts take where they are not `hidden` (NemotronH's
    latent projection of it); the router still reads `hidden`. lora: the forward's `ExpertsLoRA`; the
    trial then runs what the layer will run, the LoRA counterpart of `choice` (`lora_choice`) with
    detached factors, a frozen base taking no gradient."""
    x = hidden.detach().requires_grad_(backward)
    x_experts = x if expert_hidden is None else expert_hidden.detach().requires_grad_(backward)
    stand_in = _detached_experts(experts, spec, backward)
    leaves = [x] + ([] if expert_hidden is None else [x_experts])
    leaves += [t for t in stand_in.__dict__.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    run_experts = stand_in
    if lora is not None:
        factors = {name: LoRAFactors(f.a.detach().requires_grad_(backward), f.b.detach().requires_grad_(backward),
                                     f.scale) for name, f in lora.lora.items()}
        run_experts = ExpertsLoRA(stand_in, factors)
        leaves += [t for f in factors.values() for t in (f.a, f.b) if t.requires_grad]
    if router is not None:
        router_weight = router.weight.detach().requires_grad_(backward)
        bias = getattr(router, "bias", None)
        bias = None if bias is None else bias.detach().requires_grad_(backward)
        correction = getattr(router, "e_score_correction_bias", None)
        correction = None if correction is None else correction.detach()
        leaves += [t for t in (router_weight, bias) if t is not None]
    else:
        weights = weights.detach().requires_grad_(backward)
        leaves.append(weights)
    cotangent = torch.randn_like(x_experts) if backward else None

    def trial(choice: StageChoice):
        run_choice = choice if lora is None else lora_choice(choice, spec, True, False, first_weight(stand_in, spec))[0]

        def step():
            with torch.enable_grad() if backward else torch.no_grad():
                if router is not None:
                    _, w, i = choice.router(x, router_weight, bias, correction, routing)
                else:
                    w, i = weights, ids
                out = run_routed_experts(x_experts, i, w, run_experts, spec, run_choice, dispatcher)
                if backward:
                    torch.autograd.grad(out, leaves, cotangent.to(out.dtype), allow_unused=True)
        return step

    return trial


def moe_layers_in(module: nn.Module) -> dict[str, tuple[LayerPlanner, nn.Module]]:
    """{name: (planner, experts module)} of the MoE layers moe_lab runs in `module` and below: a
    `MoELayer`'s planner and experts, or a generic experts module carrying its own planner."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, MoELayer):
            planner, experts = getattr(m, "planner", None), m.experts
        else:
            planner, experts = m.__dict__.get("moe_lab_planner"), m
        if isinstance(planner, LayerPlanner):
            out[name] = (planner, experts)
    return out


def planners_in(module: nn.Module) -> list[LayerPlanner]:
    """The planners of the MoE layers in `module` and below."""
    return [planner for planner, _ in moe_layers_in(module).values()]


class ModelPlan(Mapping):
    """`model.moe_lab_plan`: {layer name: {stage: what runs, and why where it is not what was asked}},
    read live from each layer's planner (after a forward: the plan of that forward's device and
    dtype; before: the plan made when the model was built)."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def _planners(self) -> dict:
        model = self._model()
        return {} if model is None else {name: planner for name, (planner, _) in moe_layers_in(model).items()}

    def __getitem__(self, name: str) -> dict:
        return self._planners()[name].describe()

    def __iter__(self):
        return iter(self._planners())

    def __len__(self) -> int:
        return len(self._planners())

    def __repr__(self) -> str:
        return repr(dict(self.items()))


def run_routed_experts(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    experts: nn.Module,
    spec: ExpertsSpec,
    choice: StageChoice,
    dispatcher,
) -> torch.Tensor:
    """hidden [T, H], ids [T, k], weights [T, k] -> out [T, H]: permute, dispatch, experts, combine.
    A token-level dispatcher (DeepEP) moves tokens first and runs the other stages on what it received."""
    if choice.caps("dispatch").token_level:
        return dispatcher.run(hidden, ids, weights, lambda x, local_ids, local_weights: run_local_experts(
            x, local_ids, local_weights, experts, spec, choice, dispatcher.num_local))
    if getattr(dispatcher, "pipelined", False):  # chunks interleave permutation, experts and combine
        return dispatcher.run_pipelined(
            hidden, ids, weights, lambda h, i: choice.permutation(h, i, spec.num_experts),
            lambda x, counts, offsets: choice.experts(x, counts, offsets, experts, spec),
            lambda y, perm, w: choice.combine(y, perm, w, hidden.dtype))
    fused = fused_pair(choice)
    if fused is not None and dispatcher.name == "local":
        return fused(hidden, ids, weights, experts, spec, choice)
    rows, perm = choice.permutation(hidden, ids, spec.num_experts)
    dispatched = dispatcher.dispatch(rows, perm)
    expert_out = choice.experts(dispatched.x, dispatched.counts, dispatched.offsets, experts, spec)
    expert_out = dispatcher.combine(expert_out, dispatched)
    return choice.combine(expert_out, perm, weights, hidden.dtype)


def run_local_experts(x, local_ids, local_weights, experts, spec, choice, num_local: int) -> torch.Tensor:
    """Tokens received by a token-level dispatcher: x [R, H], local_ids [R, k] (a local expert, or -1
    for an expert on another rank), local_weights [R, k] -> [R, H], each token's weighted sum over
    its local experts.

    Only the V real (token, slot) pairs are gathered and computed: sorted by local expert (stable),
    run through the chosen experts stage, weighted, and summed per token in float32 (index_add:
    summation order not fixed on CUDA). The permutation and combine stages of `choice` are not used
    here; under a token-level dispatcher these two steps are this function.
    """
    R, k = local_ids.shape
    flat = local_ids.reshape(-1)
    slots = (flat >= 0).nonzero().squeeze(1)  # [V] (t*k + j), ascending
    slot_of_row = slots[torch.argsort(flat[slots], stable=True)]  # by local expert, then slot
    counts = torch.bincount(flat[slot_of_row], minlength=num_local)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    token_of_row = slot_of_row // k
    y = choice.experts(x[token_of_row], counts, offsets, experts, spec)  # [V, H]
    row_weights = local_weights.reshape(-1)[slot_of_row].float()  # the product is float32; autograd keeps y and the weights
    out = torch.zeros(R, y.shape[1], dtype=torch.float32, device=x.device)
    out = out.index_add(0, token_of_row, y * row_weights[:, None])
    return out.to(x.dtype)


# ---- transformers' own experts implementations, chosen after moe_lab took the layer --------------
PATCHED_IMPLEMENTATION = "moe_lab"  # what a patched model's config says its experts run


def say_moe_lab_runs(experts: nn.Module) -> None:
    """Make the experts' config say what runs: `_experts_implementation = "moe_lab"` (a name v5's
    experts registry knows once moe_lab is imported; not written to checkpoints)."""
    config = getattr(experts, "config", None)
    if config is not None and hasattr(config, "_experts_implementation"):
        config._experts_implementation = PATCHED_IMPLEMENTATION


def switched_implementation(experts: nn.Module, planner: LayerPlanner) -> str | None:
    """The experts implementation a user chose with transformers' `set_experts_implementation` after
    moe_lab took this layer (the experts then run transformers' code for that name: "grouped_mm",
    "eager", ..., or a moe_lab registry entry such as "moe_lab_triton"), or None: moe_lab's stages
    (the config says "moe_lab")."""
    current = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    planner.switched_to = None if current in (None, PATCHED_IMPLEMENTATION) else current
    return planner.switched_to


def v5_experts_class(experts: nn.Module) -> type:
    """The transformers class an experts module had before moe_lab adapted it."""
    cls = type(experts)
    return cls.__mro__[1] if cls in _ADAPTED_EXPERTS.values() else cls


# ---- experts sharded by transformers' own expert-parallel plan -----------------------------------
V5_PARALLEL_DISPATCH = ("transformers' expert-parallel plan (DistributedConfig(enable_expert_parallel=True)): "
                        "transformers moves the tokens, moe_lab's stages run this rank's experts")


def sharded_by_transformers(weight: torch.Tensor) -> bool:
    """Whether transformers' own parallel plan has distributed this expert weight (a DTensor): its
    experts module is then reached through the forward transformers installed on it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(weight, DTensor)


def run_v5_parallel_experts(hidden, top_k_index, top_k_weights, experts, spec: ExpertsSpec,
                            planner: LayerPlanner) -> torch.Tensor:
    """The experts under transformers' expert-parallel plan, called by the forward it installed (the
    weights are this rank's local shards then): hidden [R, H], top_k_index [R, k] local expert ids,
    where the local count E_local marks a route to another rank's expert, top_k_weights [R, k] ->
    [R, H], each row's weighted sum over its local experts (transformers sums the ranks' parts)."""
    weight = first_weight(experts, spec)
    num_local = weight.shape[0]
    planner.v5_parallel = num_local != spec.num_experts  # else a direct call with every expert here
    choice = planner.choice_for(weight)  # not measured: the rows each rank gets depend on the other ranks
    local_ids = torch.where((top_k_index >= 0) & (top_k_index < num_local), top_k_index, -1)
    return run_local_experts(hidden, local_ids, top_k_weights, experts, spec, choice, num_local)


# ---- the router: v5's router module, its forward swapped for the chosen router stage -------------
def _routed_forward(self, hidden_states: torch.Tensor):
    """hidden [..., H] -> RouterOutput(logits [T, E], weights [T, k], ids [T, k]), v5's tuple order."""
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    return self.moe_lab_route(
        hidden,
        self.weight,
        getattr(self, "bias", None),
        getattr(self, "e_score_correction_bias", None),
        self.moe_lab_routing,
    )


_ADAPTED_ROUTERS: dict[type, type] = {}


def adapt_router(router: nn.Module, routing: RoutingSpec, route_fn) -> None:
    """Make `router` (a v5 router module) run `route_fn` with `routing`, keeping its class lineage.

    The new class subclasses v5's, so v5's output recorders (`output_router_logits`) still find it,
    and its parameters keep their names.
    """
    base = type(router)
    if base not in _ADAPTED_ROUTERS.values():
        if base not in _ADAPTED_ROUTERS:
            name = f"MoeLab{base.__name__}"
            adapted = type(name, (base,), {"forward": _routed_forward, "__module__": __name__})
            setattr(sys.modules[__name__], name, adapted)  # picklable by reference
            _ADAPTED_ROUTERS[base] = adapted
        router.__class__ = _ADAPTED_ROUTERS[base]
    router.moe_lab_route = route_fn
    router.moe_lab_routing = routing


class MoELayer(nn.Module):
    """A sparse MoE block run through moe_lab's stages; a drop-in for the v5 block it was built from.

    forward(hidden [B, L, H]) -> out [B, L, H] (GPT-OSS: (out, router_scores [T, k]), as v5 returns).
    With the family's latent projections (NemotronH), the router reads the hidden states, the routed
    experts compute on fc1_latent_proj(hidden) [T, H'] and their sum goes through fc2_latent_proj;
    the shared experts read the hidden states, as in v5's block.
    """

    def __init__(self, block: nn.Module, family: Family, config, choice: StageChoice, experts_spec: ExpertsSpec, ep=None,
                 substitute: bool = False):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        own = [n for n, _ in block.named_parameters(recurse=False)] + [n for n, _ in block.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"{type(block).__name__} holds tensors outside its children ({own}); cannot adopt it")
        self.family = family
        self.routing = family.routing(config)
        self.experts_spec = experts_spec
        self.planner = LayerPlanner(choice, family.model_type, self.routing.features(), experts_spec, substitute,
                                    expert_parallel=ep is not None)
        self.choice = self.planner.plan_unplaced(first_weight(self.experts, experts_spec))[1]  # refuses here
        self.dispatcher = self.choice.dispatch(ep=ep, num_experts=experts_spec.num_experts)
        self.jitter_noise = float(getattr(config, family.jitter_attr, 0.0) or 0.0) if family.jitter_attr else 0.0
        adapt_router(self.router_module, self.routing, self.choice.router)
        adapt_layer_experts(self.experts, self)

    @property
    def plan(self) -> dict:
        """{stage: what runs (and, where it is not what was asked, why)}: see `LayerPlanner.describe`."""
        return self.planner.describe()

    @property
    def router_module(self) -> nn.Module:
        return getattr(self, self.family.router_attr)

    def extra_repr(self) -> str:
        return f"family={self.family.model_type}, backend={self.choice.label}, dispatch={self.dispatcher.name}"

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:
            hidden = hidden * torch.empty_like(hidden).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        latent = None if self.family.latent_attrs is None else [getattr(self, a) for a in self.family.latent_attrs]
        expert_hidden = hidden if latent is None else latent[0](hidden)  # [T, H'] the rows the routed experts take
        experts, lora = unwrap_peft_experts(self.experts, self.experts_spec)  # PEFT's LoRA wrappers (moe_lab.lora)
        weight = first_weight(experts, self.experts_spec)
        backward = torch.is_grad_enabled() and (weight.requires_grad or lora is not None and lora.requires_grad)
        if sharded_by_transformers(weight) or switched_implementation(experts, self.planner) is not None:
            # transformers' parallel plan (its installed forward moves the tokens, then run_v5_parallel_experts),
            # or the experts implementation a user chose with set_experts_implementation
            _, weights, ids = self.router_module(hidden)  # the router stage of the unplaced plan
            out = self.experts(expert_hidden, ids, weights)
            return self._finish_output(out, latent, shape, hidden_states, weights)
        choice = self.planner.choice_for(weight, hidden.shape[0], backward, trial=lambda c: auto_trial(
            hidden, experts, self.experts_spec, backward, self.dispatcher, router=self.router_module,
            routing=self.routing, expert_hidden=None if expert_hidden is hidden else expert_hidden, lora=lora)(c),
            lora=lora)
        if choice is not self.choice:  # moved to another device or dtype since the last forward
            if choice.names["dispatch"] != self.choice.names["dispatch"]:
                raise RuntimeError(f"moe_lab: the dispatch stage would change from {self.choice.names['dispatch']!r} "
                                   f"to {choice.names['dispatch']!r} on this device and dtype; rebuild the model there")
            self.choice = choice
            self.router_module.moe_lab_route = choice.router
        _, weights, ids = self.router_module(hidden)
        run_experts, run_choice = with_lora(experts, lora, self.choice, self.planner)
        out = run_routed_experts(expert_hidden, ids, weights, run_experts, self.experts_spec, run_choice,
                                 self.dispatcher)
        return self._finish_output(out, latent, shape, hidden_states, weights)

    def _finish_output(self, out, latent, shape, hidden_states, weights):
        """The routed experts' sum [T, H'] -> the block's output as v5 returns it (latent projection
        back, shared experts added, GPT-OSS's router scores beside it)."""
        if latent is not None:
            out = latent[1](out)
        out = out.view(shape)
        if self.family.shared_attr is not None:
            out = out + getattr(self, self.family.shared_attr)(hidden_states)
        if self.family.returns_router_scores:
            return out, weights
        return out


# ---- the generic path: v5's block and router untouched, the experts run through moe_lab ----------
def _generic_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """v5's experts signature: hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H].
    The experts of a `MoELayer` have this forward too, reached only under transformers' own
    expert-parallel plan (`moe_lab_layer_parts`: the layer's planner and spec)."""
    parts = self.__dict__.get("moe_lab_layer_parts")
    planner, spec = parts if parts is not None else (self.moe_lab_planner, self.moe_lab_spec)
    if switched_implementation(self, planner) is not None:  # set_experts_implementation: transformers' code runs
        return v5_experts_class(self).forward(self, hidden_states, top_k_index, top_k_weights)
    if parts is not None or first_weight(self, spec).shape[0] != spec.num_experts and \
            self.moe_lab_dispatcher.name == "local":  # local shards: transformers' plan reached us
        return run_v5_parallel_experts(hidden_states, top_k_index, top_k_weights, self, spec, planner)
    weight = first_weight(self, self.moe_lab_spec)
    note_peft_parametrized(self, self.moe_lab_planner)  # PEFT's LoRA on a generic layer: said in the plan
    backward = torch.is_grad_enabled() and weight.requires_grad
    choice = self.moe_lab_planner.choice_for(weight, hidden_states.shape[0], backward, trial=lambda c: auto_trial(
        hidden_states, self, self.moe_lab_spec, backward, self.moe_lab_dispatcher, ids=top_k_index,
        weights=top_k_weights)(c))
    return run_routed_experts(hidden_states, top_k_index, top_k_weights, self, self.moe_lab_spec, choice,
                              self.moe_lab_dispatcher)


_ADAPTED_EXPERTS: dict[type, type] = {}


def adapt_layer_experts(experts: nn.Module, layer: "MoELayer") -> None:
    """Give a `MoELayer`'s experts module moe_lab's experts forward, which transformers' own
    expert-parallel plan captures and calls (the layer itself never calls it otherwise)."""
    _adapt_experts_class(experts)
    experts.moe_lab_layer_parts = (layer.planner, layer.experts_spec)
    say_moe_lab_runs(experts)


def _adapt_experts_class(experts: nn.Module) -> None:
    base = type(experts)
    if base not in _ADAPTED_EXPERTS.values():
        if base not in _ADAPTED_EXPERTS:
            name = f"MoeLab{base.__name__}"
            adapted = type(name, (base,), {"forward": _generic_experts_forward, "__module__": __name__})
            setattr(sys.modules[__name__], name, adapted)
            _ADAPTED_EXPERTS[base] = adapted
        experts.__class__ = _ADAPTED_EXPERTS[base]


def adapt_experts(experts: nn.Module, spec: ExpertsSpec, choice: StageChoice, ep=None, substitute: bool = False,
                  hint: str | None = None) -> None:
    """Make a v5 experts module compute through moe_lab's stages (its weights and names unchanged)."""
    _adapt_experts_class(experts)
    model_type = str(getattr(getattr(experts, "config", None), "model_type", "?"))
    # v5's own router runs: the router stage is not used here (no routing features to check)
    experts.moe_lab_planner = LayerPlanner(choice, model_type, frozenset(), spec, substitute, expert_parallel=ep is not None,
                                           hint=hint)
    experts.moe_lab_choice = experts.moe_lab_planner.plan_unplaced(first_weight(experts, spec))[1]  # refuses here
    say_moe_lab_runs(experts)
    experts.moe_lab_spec = spec
    experts.moe_lab_dispatcher = experts.moe_lab_choice.dispatch(ep=ep, num_experts=spec.num_experts)
