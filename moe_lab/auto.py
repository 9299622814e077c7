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
- Under `moe_lab.fastest`'s CUDA graphs (`decide(..., graphs=True)`), a graph-safe candidate is also
  timed replayed from a CUDA graph (`measure_replayed`), and `choose_under_graphs` weighs the best
  graph-safe candidate replayed against the best of all run eagerly: the decision says whether the
  layer is captured (`AutoDecision.graphed`) and why. Graphs save the host's launches, which pace
  small experts (Qwen3-30B-A3B: 128 x 768), while torch's grouped_mm beats the graph-safe Triton
  experts on a few big ones (Mixtral-8x7B: 8 x 14336). Such decisions are kept apart from plain ones.

`AutoDecision.describe()` is what the model's plan shows (`model.moe_lab_plan[layer]["auto"]`).
"""
from __future__ import annotations

import dataclasses
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
# what a decision under CUDA graphs compared (`decide(..., graphs=True)`); part of its cache keys
GRAPHS_REPLAYED = "graph-safe replayed vs all eager"


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
    # under fastest()'s CUDA graphs: the graph-safe candidates' times replayed from a CUDA graph, whether
    # the layer is captured (None: no graphs asked) and why, in words
    replayed_ms: dict = field(default_factory=dict)
    graphed: bool | None = None
    graphs_why: str = ""

    def describe(self) -> str:
        parts = [f"{self.chosen.label} ({self.how}"]
        if self.times_ms:
            mode = ("forward+backward" if self.backward else "forward") + (f" {self.workload}" if self.workload else "")
            parts[0] += f", {mode} of {self.tokens} tokens: " + _listed(self.times_ms)
            if self.replayed_ms:
                parts[0] += "; replayed from a CUDA graph: " + _listed(self.replayed_ms)
        parts[0] += ")"
        if self.graphed is not None:
            parts.append(f"CUDA graphs: {'captured' if self.graphed else 'eager, not captured'} ({self.graphs_why})")
        if self.excluded:
            parts.append("not candidates: " + "; ".join(f"{label}: {why}" for label, why in self.excluded.items()))
        return "; ".join(parts)


def _listed(times_ms: dict) -> str:
    return ", ".join(f"{label} {ms:.3f} ms" for label, ms in sorted(times_ms.items(), key=lambda kv: kv[1]))


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


# (gpu, layer geometry, dtype, token bucket, backward, GRAPHS_REPLAYED or None, candidate labels) -> AutoDecision,
# for the life of the process
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
           backward: bool, run: Callable[[StageChoice], Callable[[], None]], workload: str = "",
           graphs: bool = False) -> AutoDecision:
    """The decision for one layer shape; measured once per key with `run(choice)`, which returns a
    callable running the layer once with that choice (forward, and backward when `backward`).
    `workload`: what `run` computes besides the base layer (e.g. LoRA's update), said in the plan;
    the geometry must tell such layers apart. `graphs` (fastest()'s CUDA graphs, on a device where
    replays can be timed): the graph-safe candidates are also timed replayed from a CUDA graph and
    `choose_under_graphs` decides, captured or eager; kept and cached apart from plain decisions."""
    candidates, excluded = candidate_set.candidates, candidate_set.excluded
    if not candidates:
        return ruled(AutoDecision(candidate_set.floor, "rule: no exact candidate here", excluded=excluded), graphs)
    if len(candidates) == 1:
        return ruled(AutoDecision(candidates[0], "rule: the only candidate", excluded=excluded), graphs)
    mode = GRAPHS_REPLAYED if graphs else None
    labels = tuple(c.label for c in candidates)  # a graph-safe-only set must not reuse a decision among all
    key = (_gpu_name(device), geometry, dtype, token_bucket(tokens), backward, mode, labels)
    decision = _DECISIONS.get(key)
    if decision is not None:
        return decision
    disk_key = auto_cache.key_of(key[0], geometry, dtype, key[3], backward, labels, graphs=mode)
    stored = auto_cache.load(disk_key)
    by_label = {c.label: c for c in candidates}
    if stored is not None and stored.get("chosen") in by_label and (not graphs or "replayed_ms" in stored):
        how = f"measured, cached ({auto_cache.path()}, {stored.get('measured_at')})"
        if graphs:
            decision = _graphs_decision(candidates, how, stored.get("times_ms", {}), stored["replayed_ms"],
                                        stored.get("replay_failed", {}), excluded, stored.get("tokens"), backward,
                                        workload)
        else:
            decision = AutoDecision(by_label[stored["chosen"]], how, stored.get("times_ms", {}), excluded,
                                    stored.get("tokens"), backward, workload)
        _DECISIONS[key] = decision
        return decision
    if (device.type == "cuda" and torch.cuda.is_available()
                                         and torch.cuda.is_current_stream_capturing()):
        return ruled(AutoDecision(candidates[0], "rule: first preference (this forward is traced or captured; "
                                   "nothing measured)", excluded=excluded), graphs)
    times = {c.label: measure(run(c.choice), device) for c in candidates}
    entry = {}
    if graphs:
        replayed, failed = {}, {}
        for c in candidates:
            if c.choice.graph_safe:
                try:
                    replayed[c.label] = measure_replayed(run(c.choice), device)
                except Exception as exc:  # noqa: BLE001 - recorded in the decision; the candidate runs eagerly only
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # a sticky device fault raises here, not a silent "eager"
                    failed[c.label] = f"{type(exc).__name__}: {exc}"
                    logger.warning("moe_lab auto: replaying %s from a CUDA graph failed: %s", c.label, failed[c.label])
        decision = _graphs_decision(candidates, "measured", times, replayed, failed, excluded, tokens, backward,
                                    workload)
        entry = {"replayed_ms": replayed, "replay_failed": failed, "graphed": decision.graphed}
    else:
        decision = AutoDecision(fastest_of(candidates, times), "measured", times, excluded, tokens, backward, workload)
    _DECISIONS[key] = decision
    if not entry.get("replay_failed"):  # a failed replay (out of memory, say) may not fail next time: not kept on disk
        auto_cache.store(disk_key, {"chosen": decision.chosen.label, "times_ms": times, "tokens": tokens,
                                    "backward": backward, **entry})
    logger.info("moe_lab auto: %s", decision.describe())
    return decision


def fastest_of(candidates: list, times_ms: dict) -> Candidate:
    """The fastest of `candidates` by `times_ms`, where a later one must beat an earlier by more than MARGIN."""
    best = candidates[0]
    for c in candidates[1:]:
        if times_ms[c.label] < times_ms[best.label] * (1 - MARGIN):
            best = c
    return best


def choose_under_graphs(candidates: list, eager_ms: dict, replayed_ms: dict) -> tuple[Candidate, bool, str]:
    """Under fastest()'s CUDA graphs: (what the layer runs, whether it is captured, why in words) from
    every candidate's eager time and the graph-safe ones' times replayed from a CUDA graph (ms). The
    best graph-safe candidate, captured, stays unless the best of all, run eagerly, is faster by more
    than MARGIN (a captured layer also saves its attention's and norms' launches, not timed here)."""
    best_eager = fastest_of(candidates, eager_ms)
    eager = f"{best_eager.label} {eager_ms[best_eager.label]:.3f} ms"
    safe = [c for c in candidates if c.label in replayed_ms]
    if not safe:
        return best_eager, False, f"{eager}; no graph-safe candidate was replayed"
    best_safe = fastest_of(safe, replayed_ms)
    replayed = f"graph-safe {best_safe.label} replayed {replayed_ms[best_safe.label]:.3f} ms"
    if eager_ms[best_eager.label] < replayed_ms[best_safe.label] * (1 - MARGIN):
        return best_eager, False, f"{eager} vs {replayed}"
    return best_safe, True, f"{replayed} vs {eager} eager"


def _graphs_decision(candidates, how, times, replayed, failed, excluded, tokens, backward, workload) -> AutoDecision:
    chosen, graphed, why = choose_under_graphs(candidates, times, replayed)
    if failed:
        why += "; not replayable: " + "; ".join(f"{label} ({error})" for label, error in failed.items())
    return AutoDecision(chosen, how, times, excluded, tokens, backward, workload, replayed, graphed, why)


def ruled(decision: AutoDecision, graphs: bool) -> AutoDecision:
    """A decision made by a rule (nothing timed); under CUDA graphs, captured where its stages are graph-safe."""
    if not graphs:
        return decision
    safe = decision.chosen.choice.graph_safe
    return dataclasses.replace(decision, graphed=safe, graphs_why=f"by rule: {decision.chosen.label} is "
                               f"{'' if safe else 'not '}graph-safe (nothing replayed)")


def not_measured_under_graphs(decision: AutoDecision, why: str) -> AutoDecision:
    """`decision` made among graph-safe candidates only because replays cannot be timed here (`why`):
    the layer is captured, as without a choice, and the decision says so."""
    return dataclasses.replace(decision, graphed=True, graphs_why=f"replays not measured ({why}): restricted to "
                               "graph-safe candidates and captured, as with cuda_graphs=True at load")


def measure_replayed(step: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of `step` captured once in a CUDA graph and replayed on `device`: what the
    layer costs inside fastest()'s graphs, with no launch from the host. Warmed up eagerly on a side
    stream first (compiles, autotuning, the allocator), as a capture needs; the graph is dropped after."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(max(1, WARMUP)):
            step()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    capture = torch.cuda.Stream(device)
    try:
        # the capture runs on a stream this function owns and restores: torch.cuda.graph switches back
        # to the caller's stream only after a successful capture_end
        with torch.cuda.device(device), torch.cuda.stream(capture):
            with torch.cuda.graph(graph, stream=capture, capture_error_mode="thread_local"):
                step()
        return measure(graph.replay, device)
    finally:
        graph.reset()


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
