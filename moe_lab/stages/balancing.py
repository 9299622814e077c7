"""Load-balancing methods as router options, for every family: auxiliary-loss-free bias balancing
(DeepSeek-V3), Transformers v5's auxiliary load-balancing loss, and a capacity factor with dropping.

    from moe_lab.stages.balancing import BalancingSpec, Balancer

    balancer = Balancer(model, BalancingSpec(bias_update_rate=1e-3, capacity_factor=1.25))
    for batch in batches:
        loss = model(**batch).loss + balancer.aux_loss()      # 0 unless aux_loss_coef > 0
        loss.backward(); opt.step(); opt.zero_grad()
        stats = balancer.step()                              # bias update; this step's routing statistics

The plain references come first (`select_with_bias`, `bias_update_reference`, `capacity_drop_reference`,
`v5_aux_loss`); `Balancer` applies them to a model through a forward hook on each router module (the
router stage itself is unchanged, whichever implementation runs it), and says so in
``model.moe_lab_plan[layer]["balancing"]``. Shapes: T tokens, E experts, k experts per token.

Conventions, stated:
- score override (``score``): the family's `RoutingSpec` with another score function ("softmax" or
  "sigmoid"); the selection is recomputed from the router's logits by `select_with_bias`.
- aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 §2.1.2): a bias b [E] is added to the scores
  for the choice of experts only (the weights are the unbiased scores). After each optimizer step,
  ``b_e += rate * sign(mean(c) - c_e)`` where c [E] are the (token, slot) pairs routed to each expert
  in the forwards since the last update (all micro-batches; summed over ranks under torch.distributed),
  before any capacity drop. The bias is DeepSeek-V3's own ``e_score_correction_bias`` where the router
  has one (so checkpoints keep it), else a non-persistent buffer ``moe_lab_balance_bias`` on the router
  (checkpoints stay v5's; the learned bias is not saved). Scores: softmax probabilities or sigmoid
  scores; GPT-OSS (top-k on logits) adds it to the logits.
- v5's auxiliary loss (``aux_loss_coef``): exactly `load_balancing_loss_func` of Transformers v5
  (Mixtral, Qwen3-MoE): the logits of every MoE layer of one forward pooled, softmax, top-k recomputed,
  ``E * sum_e f_e P_e``; `Balancer.aux_loss()` returns ``coef * loss`` for any family (without padding
  mask). Do not also pass ``output_router_logits=True`` with ``router_aux_loss_coef > 0``: v5 would add it twice.
- capacity with dropping (``capacity_factor``): per router call (one layer, one forward of T tokens),
  C = ceil(capacity_factor * T * k / E) slots per expert; slots are served in a fixed priority order
  and those beyond C are dropped: their weight becomes 0 (the token's other slots keep their weights,
  not renormalised; the residual carries the token). Priority "slot" (default; GShard/Switch): every
  token's first choice before any second choice, earlier tokens first within a choice; "token":
  flat order t*k + j. The same as `moe_lab.analysis.stats.dropped_slots`. The expert ids are not
  changed and the experts still compute the dropped rows (times 0): this reproduces what the model
  learns under dropping, not its saving in compute.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .router import RoutingSpec, _topk_ids, finish_weights, select_experts

PRIORITIES = ("slot", "token")
BIAS_BUFFER = "moe_lab_balance_bias"


@dataclass(frozen=True)
class BalancingSpec:
    """Router options that change what a model learns (see the module docstring for the conventions).

    score: None (the family's), "softmax" or "sigmoid".
    bias_update_rate: DeepSeek-V3's bias update speed gamma (0: no aux-loss-free balancing; 1e-3 in the paper).
    aux_loss_coef: coefficient of v5's load-balancing loss returned by `Balancer.aux_loss` (0: none).
    capacity_factor: None (dropless) or > 0: slots per expert = ceil(cf * T * k / E).
    capacity_priority: "slot" or "token" (which slots drop first: the later ones in this order).
    """

    score: str | None = None
    bias_update_rate: float = 0.0
    aux_loss_coef: float = 0.0
    capacity_factor: float | None = None
    capacity_priority: str = "slot"

    def __post_init__(self):
        if self.score not in (None, "softmax", "sigmoid"):
            raise ValueError(f"BalancingSpec.score must be None, 'softmax' or 'sigmoid', got {self.score!r}")
        for name in ("bias_update_rate", "aux_loss_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"BalancingSpec.{name} must be a finite number >= 0, got {v!r}")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0):
            raise ValueError(f"BalancingSpec.capacity_factor must be None or a number > 0, got {cf!r}")
        if self.capacity_priority not in PRIORITIES:
            raise ValueError(f"BalancingSpec.capacity_priority must be one of {PRIORITIES}, got {self.capacity_priority!r}")

    @property
    def active(self) -> bool:
        return self != BalancingSpec()

    def describe(self) -> str:
        parts = []
        if self.score:
            parts.append(f"score={self.score}")
        if self.bias_update_rate:
            parts.append(f"aux-loss-free bias (rate {self.bias_update_rate:g})")
        if self.aux_loss_coef:
            parts.append(f"v5 aux loss (coef {self.aux_loss_coef:g})")
        if self.capacity_factor is not None:
            parts.append(f"capacity factor {self.capacity_factor:g}, drop by {self.capacity_priority} priority")
        return "; ".join(parts) or "none"


# ---- references ---------------------------------------------------------------------------------
def routing_with_score(spec: RoutingSpec, score: str | None) -> RoutingSpec:
    """The family's spec with another score function (None: unchanged). Group-limited choice is a
    sigmoid-router feature: a switch to softmax needs n_group == 1."""
    if score is None or score == spec.score and not spec.topk_before_softmax:
        return spec
    if spec.n_group > 1 and score != "sigmoid":
        raise ValueError(f"score={score!r} with group-limited routing (n_group={spec.n_group}): set n_group=1")
    return replace(spec, score=score, topk_before_softmax=False)


def select_with_bias(logits: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None = None):
    """logits [T, E], bias [E] or None -> (weights [T, k], ids [T, k]): `select_experts` with `bias`
    added to the scores for the choice only (ties: lower index first, as `select_experts`).

    softmax: choice = softmax(logits) + bias, weights = the chosen probabilities (renormalised,
    scaled as the spec says). sigmoid: bias added to the spec's correction bias (DeepSeek-V3's own
    rule). top-k on logits (GPT-OSS): choice = logits + bias, weights = softmax of the chosen logits.
    bias None: exactly `select_experts`."""
    if bias is None:
        return select_experts(logits, spec)
    if spec.score == "sigmoid" and not spec.topk_before_softmax:
        return select_experts(logits, spec, bias)
    k = spec.top_k
    if spec.topk_before_softmax:
        ids = _topk_ids(logits.float() + bias.float(), k)
        top = logits.gather(1, ids)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        ids = _topk_ids(probs + bias.float(), k)
        weights = probs.gather(1, ids)
        if spec.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renormalize_eps)
    return finish_weights(weights, spec, logits.dtype), ids


def bias_update_reference(bias: list[float], counts: list[int], rate: float) -> list[float]:
    """DeepSeek-V3's update, one expert at a time (float32 arithmetic, as the buffer): an expert
    above the mean load loses `rate`, one below gains it, one exactly at the mean keeps its bias."""
    import numpy as np

    mean = sum(counts) / len(counts)
    out = []
    for b, c in zip(bias, counts):
        error = mean - c
        step = rate if error > 0 else -rate if error < 0 else 0.0
        out.append(float(np.float32(b) + np.float32(step)))
    return out


def bias_update(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """In place: bias [E] += rate * sign(mean(counts) - counts) (the vectorised `bias_update_reference`)."""
    c = counts.double()
    bias.add_((torch.sign(c.mean() - c) * rate).to(bias.dtype))


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * T * k / E) (as `moe_lab.analysis.stats.expert_capacity`)."""
    return int(math.ceil(capacity_factor * tokens * top_k / num_experts))


def capacity_drop_reference(ids: list[list[int]], num_experts: int, cap: int, priority: str = "slot") -> list[list[bool]]:
    """ids [T][k] -> dropped [T][k], by walking the slots in priority order with a counter per expert."""
    tokens, k = len(ids), len(ids[0]) if ids else 0
    order = ([(t, j) for j in range(k) for t in range(tokens)] if priority == "slot"
             else [(t, j) for t in range(tokens) for j in range(k)])
    used = [0] * num_experts
    dropped = [[False] * k for _ in range(tokens)]
    for t, j in order:
        e = ids[t][j]
        dropped[t][j] = used[e] >= cap
        used[e] += 1
    return dropped


def capacity_drop(ids: torch.Tensor, num_experts: int, cap: int, priority: str = "slot") -> torch.Tensor:
    """ids [T, k] -> bool [T, k], True where the slot is beyond its expert's `cap` in priority order
    (vectorised `capacity_drop_reference`: a stable sort by expert gives each slot its position)."""
    tokens, k = ids.shape
    if priority == "slot":
        order = torch.arange(tokens * k, device=ids.device).view(tokens, k).t().reshape(-1)
    elif priority == "token":
        order = torch.arange(tokens * k, device=ids.device)
    else:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    experts = ids.reshape(-1)[order]
    by_expert = torch.sort(experts, stable=True).indices  # slots grouped by expert, priority order kept
    counts = torch.bincount(experts, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(experts)
    position[by_expert] = torch.arange(experts.numel(), device=ids.device) - starts[experts[by_expert]]
    dropped = torch.empty(tokens * k, dtype=torch.bool, device=ids.device)
    dropped[order] = position >= cap
    return dropped.view(tokens, k)


def v5_aux_loss(logits_per_layer, num_experts: int, top_k: int) -> torch.Tensor:
    """Transformers v5's `load_balancing_loss_func` without attention mask: [logits [T, E]] -> scalar
    E * sum over (slot, expert) of mean(one_hot(top-k)) * mean(softmax), the layers' rows pooled."""
    logits = torch.cat([x.reshape(-1, x.shape[-1]) for x in logits_per_layer], dim=0)
    probs = F.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    mask = F.one_hot(selected, num_experts)
    tokens_per_expert = torch.mean(mask.float(), dim=0)  # [k, E]
    prob_per_expert = torch.mean(probs, dim=0)  # [E]
    return torch.sum(tokens_per_expert * prob_per_expert.unsqueeze(0)) * num_experts


def router_entropy_sum(logits: torch.Tensor, score: str) -> torch.Tensor:
    """logits [T, E] -> sum over tokens of the entropy (nats) of the routing distribution: softmax, or
    sigmoid scores normalised per token (`moe_lab.analysis.stats.router_entropy`'s convention)."""
    x = logits.detach().float()
    if score == "softmax":
        logp = torch.log_softmax(x, dim=-1)
        p = logp.exp()
    else:
        s = torch.sigmoid(x)
        p = s / s.sum(dim=-1, keepdim=True)
        logp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    return -(p * logp).sum()


# ---- applying them to a model -------------------------------------------------------------------
def _in_backward_recompute() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Layer:
    """One router's state: its spec, bias, and what was routed since the last `Balancer.step`."""

    def __init__(self, name: str, module: nn.Module, family_spec: RoutingSpec, balancing: BalancingSpec):
        self.name, self.module = name, module
        self.routing = routing_with_score(family_spec, balancing.score)
        E = self.routing.num_experts
        weight = module.weight
        own = getattr(module, "e_score_correction_bias", None)
        uses_own = isinstance(own, torch.Tensor) and self.routing.has_correction_bias and self.routing.score == "sigmoid"
        self.bias = None
        if balancing.bias_update_rate > 0:
            if uses_own:
                self.bias = own
            else:
                if not hasattr(module, BIAS_BUFFER):
                    module.register_buffer(BIAS_BUFFER, torch.zeros(E, dtype=torch.float32, device=weight.device),
                                           persistent=False)
                self.bias = getattr(module, BIAS_BUFFER)
        # the router stage already chose with this bias (DeepSeek-V3's own) and the family's score
        self.reselect = self.routing is not family_spec or (self.bias is not None and not uses_own)
        self.logits: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        E = self.routing.num_experts
        dev = self.module.weight.device
        self.counts = torch.zeros(E, dtype=torch.int64, device=dev)
        self.kept = torch.zeros(E, dtype=torch.int64, device=dev)
        self.dropped = torch.zeros((), dtype=torch.int64, device=dev)
        self.entropy = torch.zeros((), dtype=torch.float64, device=dev)
        self.tokens = 0


class Balancer:
    """Applies a `BalancingSpec` to every moe_lab router of `model` (forward hooks; `remove()` undoes).

    Per router call: the choice is recomputed where the spec asks for it (score override, a bias the
    router stage does not add itself), slots beyond capacity get weight 0, and, in training mode,
    the selection counts, kept counts, dropped slots and router entropy are accumulated. The logits
    of the current forward are kept (with their graph) for `aux_loss`. `step()` (after the optimizer
    step) applies the bias update and returns the step's statistics, then starts the next step.
    """

    def __init__(self, model: nn.Module, spec: BalancingSpec, group=None):
        from ..analysis.trace import find_routers

        self.model, self.spec, self.group = model, spec, group
        self.layers: list[_Layer] = []
        for name, module in find_routers(model):
            routing = getattr(module, "moe_lab_routing", None)
            if not isinstance(routing, RoutingSpec):
                raise ValueError(f"router {name} ({type(module).__name__}) does not run moe_lab's router stage; "
                                 "balancing options need a model whose family moe_lab routes (moe_lab.families)")
            self.layers.append(_Layer(name, module, routing, spec))
        if not self.layers:
            raise ValueError(f"no MoE routers found in {type(model).__name__}")
        self._handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]
        self._handles.append(model.register_forward_pre_hook(self._new_forward))
        self._describe_in_plan()

    # -- hooks
    def _new_forward(self, module, args):
        if not _in_backward_recompute():
            for layer in self.layers:
                layer.logits = []

    def _hook(self, layer: _Layer):
        spec = self.spec

        def hook(module, args, output):
            if _in_backward_recompute():  # activation checkpointing recomputes the same choice
                return None
            logits, weights, ids = output
            if layer.reselect:
                weights, ids = select_with_bias(logits, layer.routing, layer.bias)
            dropped = None
            if spec.capacity_factor is not None:
                cap = capacity(ids.shape[0], layer.routing.num_experts, ids.shape[1], spec.capacity_factor)
                dropped = capacity_drop(ids, layer.routing.num_experts, cap, spec.capacity_priority)
                weights = weights.masked_fill(dropped, 0.0)
            if spec.aux_loss_coef:
                layer.logits.append(logits)
            if module.training:
                with torch.no_grad():
                    E = layer.routing.num_experts
                    flat = ids.reshape(-1)
                    layer.counts += torch.bincount(flat, minlength=E)
                    if dropped is None:
                        layer.kept += torch.bincount(flat, minlength=E)
                    else:
                        layer.kept += torch.bincount(flat[~dropped.reshape(-1)], minlength=E)
                        layer.dropped += dropped.sum()
                    layer.entropy += router_entropy_sum(logits, layer.routing.score).double()
                    layer.tokens += ids.shape[0]
            if type(output) is tuple:
                return (logits, weights, ids)
            return type(output)(logits, weights, ids)

        return hook

    def _describe_in_plan(self) -> None:
        text = self.spec.describe()
        for layer in self.layers:
            block = self._block_of(layer.name)
            planner = getattr(block, "planner", None) if block is not None else None
            if planner is not None:
                planner.balancing = text

    def _block_of(self, router_name: str):
        parent = router_name.rsplit(".", 1)[0] if "." in router_name else ""
        try:
            return self.model.get_submodule(parent)
        except AttributeError:
            return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers:
            block = self._block_of(layer.name)
            if block is not None and hasattr(getattr(block, "planner", None), "balancing"):
                del block.planner.balancing

    # -- per step
    def aux_loss(self) -> torch.Tensor | float:
        """coef * v5's load-balancing loss over the logits of the last forward (0.0 when the coef is 0)."""
        if not self.spec.aux_loss_coef:
            return 0.0
        logits = [x for layer in self.layers for x in layer.logits]
        if not logits:
            raise RuntimeError("Balancer.aux_loss(): no router logits recorded; call it after the model's forward")
        first = self.layers[0].routing
        return self.spec.aux_loss_coef * v5_aux_loss(logits, first.num_experts, first.top_k)

    @torch.no_grad()
    def step(self) -> dict:
        """End a training step: all-reduce the counts under torch.distributed, update the biases,
        return {"layers": [name], "counts", "kept" [L][E], "dropped" [L], "tokens" [L], "entropy" [L]
        (mean nats per token), "bias_absmax" [L]} (Python numbers), and reset the accumulators."""
        return statistics_as_numbers(self.step_tensors())

    @torch.no_grad()
    def step_tensors(self) -> dict:
        """`step()` without reading anything back to the host: "counts", "kept" [L, E] int64, "dropped"
        [L] int64, "entropy" [L] float64 (summed nats), "bias_absmax" [L] float32 as tensors on the
        routers' device, "tokens" [L] and "layers" as Python values. A loop that keeps many steps' worth
        reads them back at once (`statistics_as_numbers`) instead of waiting for the GPU every step."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        counts, kept, dropped, entropy, bias_absmax, tokens = [], [], [], [], [], []
        for layer in self.layers:
            layer_counts = layer.counts
            if distributed:
                layer_counts = layer_counts.clone()
                dist.all_reduce(layer_counts, group=self.group)
            if layer.bias is not None and self.spec.bias_update_rate and layer.tokens:
                bias_update(layer.bias, layer_counts, self.spec.bias_update_rate)
            counts.append(layer.counts)
            kept.append(layer.kept)
            dropped.append(layer.dropped)
            entropy.append(layer.entropy)
            bias_absmax.append(layer.bias.detach().abs().max().float() if layer.bias is not None
                               else torch.zeros((), device=layer.counts.device))
            tokens.append(int(layer.tokens))
            layer.reset()
        return {"layers": [layer.name for layer in self.layers], "counts": torch.stack(counts),
                "kept": torch.stack(kept), "dropped": torch.stack(dropped), "tokens": tokens,
                "entropy": torch.stack(entropy), "bias_absmax": torch.stack(bias_absmax)}


def statistics_as_numbers(stats: dict) -> dict:
    """`Balancer.step_tensors()` output -> `Balancer.step()`'s Python numbers (entropy per token)."""
    tokens = stats["tokens"]
    return {"layers": list(stats["layers"]), "counts": stats["counts"].tolist(), "kept": stats["kept"].tolist(),
            "dropped": [int(d) for d in stats["dropped"].tolist()], "tokens": list(tokens),
            "entropy": [e / max(t, 1) for e, t in zip(stats["entropy"].tolist(), tokens)],
            "bias_absmax": [float(b) for b in stats["bias_absmax"].tolist()]}


def spec_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(BalancingSpec))
