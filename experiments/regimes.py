"""Routing regimes imposed on any v5-style router module through a forward hook.

Regimes (the ``routing`` field of a cell):

* ``real``: the router as initialised/trained; nothing is changed.
* ``balanced``: forced round-robin, as NeMo AutoModel benchmarks: token t (flattened over the
  batch) takes experts ``(t*k + j) % E`` for j < k, so every expert gets the same row count.
* ``skewed`` / ``skewed@<alpha>``: a controlled Zipf-like imbalance: per layer a seeded random
  permutation ranks the experts; each token draws k distinct experts with probability
  proportional to ``1 / rank**alpha`` (alpha defaults to 1.2). Fixed seed, so every backend sees
  the same assignment.

Under a forced regime the routing weights stay differentiable: they are the router's own softmax
over the forced experts, renormalised to the sum of the real top-k weights (so the block's output
scale matches the family's scoring: softmax, sigmoid with scaling, top-k-then-softmax), which keeps
gradients flowing into the router. Forced ids are cached per (router, token count), so
activation-checkpoint recomputation sees the same assignment and the measured step does not pay
for sampling.

Routers are found by the model's ``_can_record_outputs["router_logits"]`` recorder class where
present, else by class name suffix ``Router`` / ``TopkRouter`` / ``TopKRouter``; the router's
forward must return ``(logits [T, E], weights [T, k], ids [T, k])``.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_ZIPF_ALPHA = 1.2
REGIMES = ("real", "balanced", "skewed")


def parse(regime: str) -> tuple[str, float | None]:
    """``"skewed@1.5"`` -> ("skewed", 1.5); ``"balanced"`` -> ("balanced", None)."""
    name, _, arg = regime.partition("@")
    if name not in REGIMES:
        raise ValueError(f"unknown routing regime {regime!r}; expected one of {REGIMES} (skewed@<alpha> allowed)")
    if name == "skewed":
        return name, float(arg) if arg else DEFAULT_ZIPF_ALPHA
    if arg:
        raise ValueError(f"routing regime {name!r} takes no argument (got {regime!r})")
    return name, None


def router_classes(model: nn.Module) -> tuple[type, ...]:
    """The router module classes of a v5 (or moe_lab-patched) model."""
    rec = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    target = getattr(rec, "target_class", None)
    if isinstance(target, type):
        return (target,)
    return ()


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every router, in model order."""
    classes = router_classes(model)
    found = []
    for name, mod in model.named_modules():
        cname = type(mod).__name__
        if (classes and isinstance(mod, classes)) or (
                not classes and cname.endswith(("Router", "TopkRouter", "TopKRouter"))):
            found.append((name, mod))
    return found


def balanced_ids(tokens: int, k: int, experts: int) -> torch.Tensor:
    """[tokens, k] int64: token t takes experts (t*k + j) % E (distinct as long as k <= E)."""
    t = torch.arange(tokens, dtype=torch.int64)[:, None]
    j = torch.arange(k, dtype=torch.int64)[None, :]
    return (t * k + j) % experts


def zipf_probs(experts: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """[E] probabilities 1/rank**alpha over a seeded random ranking of the experts."""
    ranks = torch.randperm(experts, generator=generator).to(torch.float64) + 1.0
    p = ranks.pow(-alpha)
    return p / p.sum()


def skewed_ids(tokens: int, k: int, experts: int, alpha: float, seed: int) -> torch.Tensor:
    """[tokens, k] int64: k distinct experts per token, drawn from a Zipf-like law (seeded)."""
    g = torch.Generator().manual_seed(seed)
    p = zipf_probs(experts, alpha, g)
    return torch.multinomial(p.expand(tokens, experts), k, replacement=False, generator=g)


class RegimeHook:
    """Forward hook that replaces a router's (weights, ids) according to a regime."""

    def __init__(self, regime: str, layer_index: int, seed: int):
        self.name, self.alpha = parse(regime)
        self.seed = seed * 1_000_003 + layer_index
        self._cache: dict[tuple, torch.Tensor] = {}

    def ids(self, tokens: int, k: int, experts: int, device) -> torch.Tensor:
        key = (tokens, k, experts, str(device))
        if key not in self._cache:
            if self.name == "balanced":
                ids = balanced_ids(tokens, k, experts)
            else:
                ids = skewed_ids(tokens, k, experts, self.alpha, self.seed)
            self._cache[key] = ids.to(device)
        return self._cache[key]

    def __call__(self, module, args, output):
        logits, weights, ids = output
        logits2d = logits.reshape(-1, logits.shape[-1])
        tokens, experts = logits2d.shape
        k = ids.shape[-1]
        forced = self.ids(tokens, k, experts, ids.device).to(ids.dtype).reshape(ids.shape)
        probs = torch.softmax(logits2d.float(), dim=-1).gather(1, forced.reshape(tokens, k))
        scale = weights.reshape(tokens, k).float().sum(-1, keepdim=True)
        new_w = probs / probs.sum(-1, keepdim=True) * scale
        result = (logits, new_w.to(weights.dtype).reshape(weights.shape), forced)
        return type(output)(*result) if hasattr(type(output), "_fields") else result


def apply(model: nn.Module, regime: str, seed: int = 0) -> list:
    """Install the regime on every router of ``model``; returns the hook handles ([] for real)."""
    name, _ = parse(regime)
    if name == "real":
        return []
    routers = find_routers(model)
    if not routers:
        raise RuntimeError(f"routing regime {regime!r}: no router modules found in {type(model).__name__}")
    handles = [mod.register_forward_hook(RegimeHook(regime, i, seed)) for i, (_, mod) in enumerate(routers)]
    log.info("routing regime %s installed on %d routers", regime, len(handles))
    return handles


def expert_load(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """[E] fraction of routed rows per expert for a [T, k] id tensor."""
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=experts).to(torch.float64)
    return counts / counts.sum()
