"""The "auto" backend: for each MoE layer, the fastest exact stages on its device, measured.

For one layer on one device and dtype the candidates are `CANDIDATES`, kept where every stage can
run here, computes the layer (its routing, activation, dtype: `registry.plan_layer` with no
substitution) and is exact against the reference (`Capabilities.exact`); with
`AutoSettings.graph_safe_only` only those a CUDA graph can replay. The floor is the torch backend,
with any stage it cannot compute run by that stage's reference (recorded in the plan): it is what
auto runs where nothing is measured.

- On a CUDA device with two or more candidates, the choice is measured at the layer's first forward
  of each shape: every candidate runs this layer's forward (and backward, when gradients are on)
  on this forward's own hidden states with the layer's own weights (detached: no gradient reaches
  the model), and the fastest median time wins. One decision per (GPU, layer geometry, dtype,
  token bucket, gradients on/off), kept for the life of the process, so layers of one shape share it,
  and on disk (`moe_lab.auto_cache`: per GPU, shape and code version), so the next process reuses it.
- Elsewhere (device types not in MEASURED_DEVICES such as the CPU, one candidate, a forward being traced by torch.compile or captured by a CUDA
  graph before any measurement) the choice follows a rule, and the decision says which.

`AutoDecision.describe()` is what the model's plan shows (`model.moe_lab_plan[layer]["auto"]`).
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import auto_cache
from .registry import (BackendUnavailableError, LayerNeeds, StageChoice, StageRefusedError, plan_layer,
                       resolve_backend)

logger = logging.getLogger(__name__)

# (label, backend) in order of preference: a later candidate must be measurably faster to win
CANDIDATES = (
    ("triton_gather", "triton_gather"),
    ("triton", "triton"),
    ("triton_routing+torch_experts", {"router": "triton", "permutation": "triton", "experts": "torch",
                                      "combine": "triton"}),
    ("torch", "torch"),
)
FLOOR = "torch"
MEASURED_DEVICES = {"cuda"}  # device types where auto measures (elsewhere: the floor)
WARMUP, REPEATS = 2, 5
# a candidate later in CANDIDATES replaces an earlier one only if faster by more than this fraction
MARGIN = 0.02


@dataclass(frozen=True)
class Candidate:
    label: str
    planned: dict  # {stage: PlannedStage}
    choice: StageChoice


@dataclass
class CandidateSet:
    """The candidates for one layer on one device and dtype, and why the others were left out."""

    candidates: list
    excluded: dict  # label -> reason
    floor: Candidate


@dataclass(frozen=True)
class AutoDecision:
    """What auto runs for one layer shape: `chosen`, and how (measured times in ms, or the rule)."""

    chosen: Candidate
    how: str  # "measured" | a rule, in words
    times_ms: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)
    tokens: int | None = None
    backward: bool | None = None
    workload: str = ""  # what the trials ran besides the base layer ("with LoRA (...)"), if anything

    def describe(self) -> str:
        parts = [f"{self.chosen.label} ({self.how}"]
        if self.times_ms:
            mode = ("forward+backward" if self.backward else "forward") + (f" {self.workload}" if self.workload else "")
            parts[0] += f", {mode} of {self.tokens} tokens: " + ", ".join(
                f"{label} {ms:.3f} ms" for label, ms in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        parts[0] += ")"
        if self.excluded:
            parts.append("not candidates: " + "; ".join(f"{label}: {why}" for label, why in self.excluded.items()))
        return "; ".join(parts)


def candidates_for(needs: LayerNeeds, expert_parallel_dispatch: str | None, graph_safe_only: bool) -> CandidateSet:
    """The candidates for a placed layer (`needs.device_type` set) and the floor.

    `expert_parallel_dispatch`: the dispatch implementation every candidate keeps under expert
    parallelism (None: rows stay local)."""
    kept, excluded = [], {}
    for label, backend in CANDIDATES:
        try:
            choice = resolve_backend(backend)
        except BackendUnavailableError as exc:
            excluded[label] = f"{exc.stage} {exc.name!r} cannot run here: {exc.reason}"
            continue
        if expert_parallel_dispatch is not None:
            choice = choice.with_stage("dispatch", expert_parallel_dispatch)
        try:
            planned, choice = plan_layer(choice, needs, substitute=False)
        except StageRefusedError as exc:
            excluded[label] = "; ".join(exc.reasons)
            continue
        inexact = [s for s, impl in choice.impls.items() if not impl.caps.exact]
        if inexact:
            excluded[label] = f"not exact against the reference: {', '.join(inexact)}"
            continue
        if graph_safe_only and not choice.graph_safe:
            excluded[label] = "not CUDA-graph safe (Options(cuda_graphs=True))"
            continue
        kept.append(Candidate(label, planned, choice))
    floor_choice = resolve_backend(FLOOR)
    if expert_parallel_dispatch is not None:
        floor_choice = floor_choice.with_stage("dispatch", expert_parallel_dispatch)
    planned, floor_choice = plan_layer(floor_choice, needs, substitute=True)
    return CandidateSet(kept, excluded, Candidate(FLOOR, planned, floor_choice))


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def token_bucket(tokens: int) -> int:
    """The power of two at or above `tokens`: layers of one shape bucket share a decision."""
    return 1 << max(0, int(tokens) - 1).bit_length()


# (gpu, layer geometry, dtype, token bucket, backward) -> AutoDecision, for the life of the process
_DECISIONS: dict = {}


def forget_decisions() -> None:
    """Drop every decision made so far (the next forward of each shape measures again)."""
    _DECISIONS.clear()


def traced_decision(candidate_set: CandidateSet) -> "AutoDecision":
    """What a layer runs in a forward torch.compile or torch.export traces (nothing is measured
    there): the first traceable candidate, else the floor (the torch stages)."""
    for candidate in candidate_set.candidates:
        if not candidate.choice.untraceable:
            return AutoDecision(candidate, "rule: traced by torch.compile: the first traceable candidate (the Triton, "
                                "TE and DeepEP stages are not traced yet)", excluded=candidate_set.excluded)
    return AutoDecision(candidate_set.floor, "rule: traced by torch.compile: the floor", excluded=candidate_set.excluded)


def decide(candidate_set: CandidateSet, geometry: tuple, device: torch.device, dtype: torch.dtype, tokens: int,
           backward: bool, run: Callable[[StageChoice], Callable[[], None]], workload: str = "") -> AutoDecision:
    """The decision for one layer shape; measured once per key with `run(choice)`, which returns a
    callable running the layer once with that choice (forward, and backward when `backward`).
    `workload`: what `run` computes besides the base layer (e.g. LoRA's update), said in the plan;
    the geometry must tell such layers apart."""
    candidates, excluded = candidate_set.candidates, candidate_set.excluded
    if not candidates:
        return AutoDecision(candidate_set.floor, "rule: no exact candidate here", excluded=excluded)
    if len(candidates) == 1:
        return AutoDecision(candidates[0], "rule: the only candidate", excluded=excluded)
    key = (_gpu_name(device), geometry, dtype, token_bucket(tokens), backward)
    decision = _DECISIONS.get(key)
    if decision is not None:
        return decision
    disk_key = auto_cache.key_of(key[0], geometry, dtype, key[3], backward, [c.label for c in candidates])
    stored = auto_cache.load(disk_key)
    by_label = {c.label: c for c in candidates}
    if stored is not None and stored.get("chosen") in by_label:
        decision = AutoDecision(by_label[stored["chosen"]], f"measured, cached ({auto_cache.path()}, "
                                f"{stored.get('measured_at')})", stored.get("times_ms", {}), excluded,
                                stored.get("tokens"), backward, workload)
        _DECISIONS[key] = decision
        return decision
    if (device.type == "cuda" and torch.cuda.is_available()
                                         and torch.cuda.is_current_stream_capturing()):
        return AutoDecision(candidates[0], "rule: first preference (this forward is traced or captured; "
                            "nothing measured)", excluded=excluded)
    times = {c.label: measure(run(c.choice), device) for c in candidates}
    best = candidates[0]
    for c in candidates[1:]:
        if times[c.label] < times[best.label] * (1 - MARGIN):
            best = c
    decision = AutoDecision(best, "measured", times, excluded, tokens, backward, workload)
    _DECISIONS[key] = decision
    auto_cache.store(disk_key, {"chosen": best.label, "times_ms": times, "tokens": tokens, "backward": backward})
    logger.info("moe_lab auto: %s", decision.describe())
    return decision


def measure(step: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of `step` on `device` over REPEATS runs after WARMUP runs (compiles and
    autotunes happen in the warm-up); CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(WARMUP):
        step()
    samples = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            step()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)
