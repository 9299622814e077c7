"""Backends by name: each stage of the MoE layer picks one implementation from a registry.

Stages: router -> permutation -> dispatch -> experts -> combine (see DESIGN.md). A backend word
("eager", "torch", "triton", ...) names one implementation per stage; a mapping such as
{"experts": "triton", "router": "torch"} overrides single stages (the rest come from "torch").
"auto", the default, lets each layer take the fastest exact candidate on its device (`moe_lab.auto`).

An implementation registers with an availability check (can it run on this machine at all?) and
its `Capabilities` (which devices, dtypes, activations, routing features, whether it is exact,
token-level, CUDA-graph safe, usable under expert parallelism). Choosing one that cannot run here
fails at construction with a message naming the stage, the backend, why, and what to install; a
layer it cannot compute is planned by `plan_layer`: refused with the reason, or, where the user
allowed substitution, run by the stage's reference and recorded in the layer's plan.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

STAGES = ("router", "permutation", "dispatch", "experts", "combine")
AUTO = "auto"  # the default backend word: chosen per layer and shape (moe_lab.auto)
DEFAULT_BACKEND = AUTO
MAPPING_BASE = "torch"  # the backend of the stages a mapping does not name


class BackendUnavailableError(RuntimeError):
    """A chosen stage implementation cannot run on this machine (missing package or device).
    `stage`, `name` and `reason` say which and why."""

    def __init__(self, message: str, stage: str = "", name: str = "", reason: str = ""):
        super().__init__(message)
        self.stage, self.name, self.reason = stage, name, reason


# the reference implementation of each stage: what a substitution runs (dispatch under expert
# parallelism: all2all, since every rank holds only its own experts)
REFERENCE = {"router": "eager", "permutation": "eager", "dispatch": "local", "experts": "eager", "combine": "eager"}


def reference_for(stage: str, needs: "LayerNeeds") -> str:
    return "all2all" if stage == "dispatch" and needs.expert_parallel else REFERENCE[stage]


@dataclass(frozen=True)
class LayerNeeds:
    """What one MoE layer asks of its stages. routing_features: `RoutingSpec.features()`;
    activation: `ExpertsSpec.activation_key`; device_type / dtype: the expert weights' where the
    layer runs, or device_type None before it is placed (a model built on the CPU or the meta
    device and moved later): device and dtype are then checked at its first forward."""

    model_type: str
    routing_features: frozenset
    activation: str
    device_type: str | None
    dtype: torch.dtype
    expert_parallel: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What an implementation computes. None means "any".

    devices: device types it runs on; dtypes: {device type: dtypes} of the expert weights;
    activations: `ExpertsSpec.activation_key`s it computes (experts stage); routing: the
    `RoutingSpec.features()` it implements (router stage); exact: equal to the reference up to
    float rounding (the tests hold it there); token_level: a dispatcher that moves tokens and runs
    permutation/combine itself (DeepEP); graph_safe: no host synchronisation and static shapes, so
    a CUDA graph can replay it; traceable: torch.compile / torch.export trace it (torch operations,
    or custom ops with fake implementations; Triton, TE and DeepEP launches are not traced yet);
    expert_parallel: runs on expert shards under `ep_size > 1`;
    fuses_with: an experts implementation that also does this permutation's gather (and is then
    called once for permutation + experts + combine through `fused`).
    """

    devices: frozenset | None = None
    dtypes: Mapping | None = None
    activations: frozenset | None = None
    routing: frozenset | None = None
    exact: bool = True
    token_level: bool = False
    graph_safe: bool = False
    traceable: bool = True
    expert_parallel: bool = True
    fuses_with: str | None = None

    def why_not(self, needs: LayerNeeds, stage: str) -> str | None:
        """None if this implementation computes the layer `needs` describes, else why not."""
        placed = needs.device_type is not None
        if placed and self.devices is not None and needs.device_type not in self.devices:
            return f"runs on {'/'.join(sorted(self.devices))}, not {needs.device_type}"
        allowed = None if self.dtypes is None or not placed else self.dtypes.get(needs.device_type)
        if allowed is not None and needs.dtype not in allowed:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in allowed))
            return f"takes {names} weights on {needs.device_type}, not {str(needs.dtype).replace('torch.', '')}"
        if stage == "experts" and self.activations is not None and needs.activation not in self.activations:
            return f"computes activations {', '.join(sorted(self.activations))}, not {needs.activation!r}"
        if stage == "router" and self.routing is not None and not needs.routing_features <= self.routing:
            missing = ", ".join(sorted(needs.routing_features - self.routing))
            return f"does not implement {needs.model_type}'s routing ({missing})"
        if needs.expert_parallel and not self.expert_parallel:
            return "does not run under expert parallelism"
        return None


@dataclass
class StageImpl:
    stage: str
    name: str
    fn: object
    why_unavailable: Callable[[], str | None] = lambda: None
    description: str = ""
    caps: Capabilities = field(default_factory=Capabilities)
    fused: object = None  # with caps.fuses_with: fn(hidden, ids, weights, experts_module, spec, choice) -> out


_IMPLS: dict[str, dict[str, StageImpl]] = {stage: {} for stage in STAGES}
# A backend word -> the implementation name it uses for each stage.
_BACKENDS: dict[str, dict[str, str]] = {}


def register_stage(stage: str, name: str, fn, why_unavailable=None, description: str = "",
                   caps: Capabilities | None = None, fused=None) -> StageImpl:
    """Register `fn` as implementation `name` of `stage`; returns the `StageImpl`, which a `moe_backend`
    mapping also takes as a stage's value. `why_unavailable()` returns None when it can
    run on this machine, else a sentence saying why not and what to install; `caps` says what it
    computes (default: everything, exactly); `fused` is the combined function of a `caps.fuses_with` pair."""
    if stage not in STAGES:
        raise ValueError(f"unknown MoE stage {stage!r}; stages are {', '.join(STAGES)}")
    caps = caps or Capabilities()
    if (caps.fuses_with is None) != (fused is None):
        raise ValueError(f"{stage} {name!r}: caps.fuses_with and fused= go together")
    if not caps.traceable:  # torch.compile runs it eagerly (a graph break; a full graph is refused by the planner)
        fn = torch.compiler.disable(fn) if isinstance(fn, types.FunctionType) else fn  # classes, callables: their own
        fused = None if fused is None else torch.compiler.disable(fused)
    impl = _IMPLS[stage][name] = StageImpl(stage, name, fn, why_unavailable or (lambda: None), description, caps, fused)
    return impl


def register_backend(word: str, per_stage: Mapping[str, str]) -> None:
    """Register a backend word: the implementation name each of the five stages uses."""
    if set(per_stage) != set(STAGES):
        raise ValueError(f"backend {word!r} must name an implementation for each stage {', '.join(STAGES)}")
    _BACKENDS[word] = dict(per_stage)


def fused_pair(choice: "StageChoice"):
    """The function that runs permutation + experts + combine as one for this choice, or None: an
    experts implementation declaring `fuses_with` the chosen permutation. Used only when rows stay
    local; under expert parallelism the stages run one by one."""
    experts = choice.impls["experts"]
    if experts.caps.fuses_with is not None and experts.caps.fuses_with == choice.names["permutation"]:
        return experts.fused
    return None


def capabilities(stage: str, name: str) -> Capabilities:
    return _IMPLS[stage][name].caps


def available_backends() -> list[str]:
    """"auto" first, then every registered backend word."""
    return [AUTO] + sorted(_BACKENDS)


def stage_implementations(stage: str) -> list[str]:
    return sorted(_IMPLS[stage])


@dataclass(frozen=True)
class AutoSettings:
    """What "auto" may choose from: graph_safe_only keeps the candidates a CUDA graph can replay
    (set when the model runs with Options(cuda_graphs=True))."""

    graph_safe_only: bool = False


@dataclass(frozen=True)
class StageChoice:
    """The resolved implementation of every stage; `names` maps stage -> implementation name.

    With `auto` set, this is the "auto" backend: `names` are then its floor (the torch backend, run
    where nothing is measured, e.g. on the CPU), and each layer's planner picks among `moe_lab.auto`'s
    candidates on its device."""

    names: dict = field(default_factory=dict)
    impls: dict = field(default_factory=dict)
    requested: str | None = None  # what the user wrote (a backend word or stage=name pairs), for messages
    auto: AutoSettings | None = None

    # choice.router, choice.experts, ...: plain properties (torch.compile traces them; a __getattr__
    # reading the instance dict through object.__getattribute__ breaks its graph)
    router = property(lambda self: self.impls["router"].fn)
    permutation = property(lambda self: self.impls["permutation"].fn)
    dispatch = property(lambda self: self.impls["dispatch"].fn)
    experts = property(lambda self: self.impls["experts"].fn)
    combine = property(lambda self: self.impls["combine"].fn)

    def caps(self, stage: str) -> Capabilities:
        return self.impls[stage].caps

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph can replay every local stage of this choice."""
        return all(self.impls[s].caps.graph_safe for s in STAGES)

    @property
    def untraceable(self) -> list[str]:
        """The stages torch.compile / torch.export cannot trace, as "stage 'name'"."""
        return [f"{s} {self.names[s]!r}" for s in STAGES if not self.impls[s].caps.traceable]

    def with_stage(self, stage: str, name: str) -> "StageChoice":
        """This choice with `stage` run by implementation `name` (what was requested is kept)."""
        impl = _lookup_impl(stage, name, self.requested)
        return StageChoice({**self.names, stage: name}, {**self.impls, stage: impl}, self.requested, self.auto)

    @property
    def label(self) -> str:
        """A short name: "auto", the backend word if all stages agree with one, else stage=impl pairs."""
        if self.auto is not None:
            return AUTO
        for word, per_stage in sorted(_BACKENDS.items()):
            if per_stage == self.names:
                return word
        return ",".join(f"{s}={self.names[s]}" for s in STAGES)


def _lookup_impl(stage: str, name: str, requested) -> StageImpl:
    impls = _IMPLS[stage]
    if name not in impls:
        raise ValueError(
            f"moe_backend={requested!r}: the {stage} stage has no implementation {name!r}; "
            f"choose one of {', '.join(sorted(impls))}"
        )
    impl = impls[name]
    reason = impl.why_unavailable()
    if reason:
        raise BackendUnavailableError(f"moe_backend={requested!r}: the {stage} stage {name!r} cannot run here: {reason}",
                                      stage, name, reason)
    return impl


def resolve_backend(moe_backend: str | Mapping[str, str] | StageChoice | None = None) -> StageChoice:
    """Turn a backend word or a per-stage mapping into a StageChoice, checking each stage can run here.

    None | "auto": the "auto" backend (see StageChoice; its floor is the torch backend).
    "torch" | "eager" | "triton" | ...: every stage from that backend.
    {"experts": "triton", "router": "torch"}: stages named explicitly, each value a backend word,
    an implementation name or a registered `StageImpl` (e.g. `moe_lab.jax.router(fn)`); unnamed
    stages come from "torch".
    """
    if isinstance(moe_backend, StageChoice):
        return moe_backend
    requested = None if moe_backend is None else _requested_label(moe_backend)  # None: the user named nothing
    if moe_backend is None or moe_backend == AUTO:
        floor = resolve_backend(MAPPING_BASE)
        return StageChoice(floor.names, floor.impls, requested=requested, auto=AutoSettings())
    if isinstance(moe_backend, str):
        if moe_backend not in _BACKENDS:
            raise ValueError(
                f"unknown moe_backend {moe_backend!r}; available backends: {', '.join(available_backends())} "
                f"(or a mapping of stage -> backend over the stages {', '.join(STAGES)})"
            )
        per_stage = dict(_BACKENDS[moe_backend])
    elif isinstance(moe_backend, Mapping):
        unknown = set(moe_backend) - set(STAGES)
        if unknown:
            raise ValueError(f"moe_backend names unknown stages {sorted(unknown)}; stages are {', '.join(STAGES)}")
        per_stage = dict(_BACKENDS[MAPPING_BASE])
        for stage, value in moe_backend.items():
            if isinstance(value, StageImpl):  # an implementation object (moe_lab.jax.router(fn)): its name
                value = _registered_name(stage, value)
            elif value not in _IMPLS[stage] and value in _BACKENDS:
                value = _BACKENDS[value][stage]  # a backend word: that backend's choice for this stage
            per_stage[stage] = value
    else:
        raise TypeError(f"moe_backend must be a backend name or a mapping of stage -> name, got {type(moe_backend).__name__}")
    impls = {stage: _lookup_impl(stage, name, moe_backend) for stage, name in per_stage.items()}
    return StageChoice(per_stage, impls, requested=requested)


def _registered_name(stage: str, impl: StageImpl) -> str:
    if impl.stage != stage or _IMPLS[stage].get(impl.name) is not impl:
        raise ValueError(f"moe_backend: the {stage} stage was given {impl.stage} implementation {impl.name!r}, "
                         f"which is not registered for the {stage} stage (register_stage returns the objects it takes)")
    return impl.name


def _requested_label(moe_backend) -> str:
    if isinstance(moe_backend, str):
        return moe_backend
    if isinstance(moe_backend, Mapping):
        return ",".join(f"{stage}={getattr(moe_backend[stage], 'name', moe_backend[stage])}"
                        for stage in STAGES if stage in moe_backend)
    return str(moe_backend)


# ---- per-layer plans: what each stage runs for one layer, and why ------------------------------------
@dataclass(frozen=True)
class PlannedStage:
    """asked: the implementation the choice names; runs: what will run; why: the reason they differ."""

    asked: str
    runs: str
    why: str | None = None

    def __str__(self) -> str:
        return self.runs if self.why is None else f"{self.runs} (asked {self.asked}: {self.why})"


class StageRefusedError(ValueError):
    """A chosen stage cannot compute a layer and substitution was not allowed; `reasons` lists each
    refused stage and why."""

    def __init__(self, message: str, reasons: tuple = ()):
        super().__init__(message)
        self.reasons = tuple(reasons)


def plan_layer(choice: "StageChoice", needs: LayerNeeds, substitute: bool,
               hint: str = "pass substitute=True to run each stage's reference instead (recorded in model.moe_lab_plan)",
               ) -> tuple[dict, "StageChoice"]:
    """({stage: PlannedStage}, the StageChoice to run) for one layer. A stage whose capabilities do not
    cover `needs` is refused (StageRefusedError naming every such stage and why, then `hint`), or
    with `substitute` replaced by the stage's reference implementation."""
    planned, refused, names = {}, [], dict(choice.names)
    for stage in STAGES:
        impl = choice.impls[stage]
        why = impl.caps.why_not(needs, stage)
        if why is None:
            planned[stage] = PlannedStage(impl.name, impl.name)
            continue
        if not substitute:
            refused.append(f"{stage} {impl.name!r} {why}")
            continue
        fallback = reference_for(stage, needs)
        reference_why = _IMPLS[stage][fallback].caps.why_not(needs, stage)
        if reference_why is not None:
            refused.append(f"{stage} {impl.name!r} {why}; its reference {fallback!r} {reference_why}")
            continue
        planned[stage] = PlannedStage(impl.name, fallback, why)
        names[stage] = fallback
    if refused:
        where = f"{str(needs.dtype).replace('torch.', '')} on {needs.device_type}" if needs.device_type else "any device"
        raise StageRefusedError(
            f"moe_backend={choice.requested or choice.label!r} cannot run {needs.model_type}'s MoE layer "
            f"({needs.activation}, {where}): " + "; ".join(refused)
            + f". Choose other stages (moe_lab.available_backends()), or {hint}", refused)
    if names == choice.names:
        return planned, choice
    impls = {s: choice.impls[s] if n == choice.names[s] else _IMPLS[s][n] for s, n in names.items()}
    return planned, StageChoice(names, impls, requested=choice.requested, auto=choice.auto)
