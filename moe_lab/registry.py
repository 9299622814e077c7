"""Backends by name: each stage of the MoE layer picks one implementation from a registry.

Stages: router -> permutation -> dispatch -> experts -> combine (see DESIGN.md). A backend word
("eager", "torch", "triton", ...) names one implementation per stage; a mapping such as
{"experts": "triton", "router": "torch"} overrides single stages (the rest come from "torch").

An implementation registers with an availability check; choosing one that cannot run here fails
at construction with a message naming the stage, the backend, why, and what to install.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

STAGES = ("router", "permutation", "dispatch", "experts", "combine")
DEFAULT_BACKEND = "torch"


class BackendUnavailableError(RuntimeError):
    """A chosen stage implementation cannot run on this machine (missing package or device)."""


@dataclass
class StageImpl:
    stage: str
    name: str
    fn: object
    why_unavailable: Callable[[], str | None] = lambda: None
    description: str = ""


_IMPLS: dict[str, dict[str, StageImpl]] = {stage: {} for stage in STAGES}
# A backend word -> the implementation name it uses for each stage.
_BACKENDS: dict[str, dict[str, str]] = {}


def register_stage(stage: str, name: str, fn, why_unavailable=None, description: str = "") -> None:
    """Register `fn` as implementation `name` of `stage`. `why_unavailable()` returns None when it can
    run here, else a sentence saying why not and what to install."""
    if stage not in STAGES:
        raise ValueError(f"unknown MoE stage {stage!r}; stages are {', '.join(STAGES)}")
    _IMPLS[stage][name] = StageImpl(stage, name, fn, why_unavailable or (lambda: None), description)


def register_backend(word: str, per_stage: Mapping[str, str]) -> None:
    """Register a backend word: the implementation name each of the five stages uses."""
    if set(per_stage) != set(STAGES):
        raise ValueError(f"backend {word!r} must name an implementation for each stage {', '.join(STAGES)}")
    _BACKENDS[word] = dict(per_stage)


# (permutation impl, experts impl) -> a function that runs both (and the combine) as one, for
# kernels that fuse across the stage boundary (e.g. the gather into the GEMM prologue). Used only
# when rows stay local; under expert parallelism the stages run one by one.
_FUSED_PAIRS: dict[tuple[str, str], object] = {}


def register_fused_pair(permutation: str, experts: str, fn) -> None:
    """fn(hidden [T, H], ids [T, k], weights [T, k], experts_module, spec, choice) -> out [T, H]."""
    _FUSED_PAIRS[(permutation, experts)] = fn


def fused_pair(choice: "StageChoice"):
    return _FUSED_PAIRS.get((choice.names["permutation"], choice.names["experts"]))


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def stage_implementations(stage: str) -> list[str]:
    return sorted(_IMPLS[stage])


@dataclass(frozen=True)
class StageChoice:
    """The resolved implementation of every stage; `names` maps stage -> implementation name."""

    names: dict = field(default_factory=dict)
    impls: dict = field(default_factory=dict)

    def __getattr__(self, stage):  # choice.router, choice.experts, ...
        impls = object.__getattribute__(self, "impls")
        if stage in impls:
            return impls[stage].fn
        raise AttributeError(stage)

    @property
    def label(self) -> str:
        """A short name: the backend word if all stages agree with one, else stage=impl pairs."""
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
        raise BackendUnavailableError(f"moe_backend={requested!r}: the {stage} stage {name!r} cannot run here: {reason}")
    return impl


def resolve_backend(moe_backend: str | Mapping[str, str] | StageChoice | None = None) -> StageChoice:
    """Turn a backend word or a per-stage mapping into a StageChoice, checking each stage can run here.

    "torch" | "eager" | "triton" | ...: every stage from that backend.
    {"experts": "triton", "router": "torch"}: stages named explicitly, each value a backend word
    or an implementation name; unnamed stages come from "torch".
    """
    if isinstance(moe_backend, StageChoice):
        return moe_backend
    if moe_backend is None:
        moe_backend = DEFAULT_BACKEND
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
        per_stage = dict(_BACKENDS[DEFAULT_BACKEND])
        for stage, value in moe_backend.items():
            if value not in _IMPLS[stage] and value in _BACKENDS:
                value = _BACKENDS[value][stage]  # a backend word: that backend's choice for this stage
            per_stage[stage] = value
    else:
        raise TypeError(f"moe_backend must be a backend name or a mapping of stage -> name, got {type(moe_backend).__name__}")
    impls = {stage: _lookup_impl(stage, name, moe_backend) for stage, name in per_stage.items()}
    return StageChoice(per_stage, impls)
