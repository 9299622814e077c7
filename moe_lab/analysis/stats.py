"""Routing statistics in NumPy, each also usable on JAX arrays (and under jax.jit / jax.grad).

Every function takes arrays and returns arrays; it works in the array library of its inputs
(NumPy, or jax.numpy when given JAX arrays). Nothing here imports torch. Conventions, named:

Shapes: T tokens, k experts per token, E experts, S steps, L layers, B sequences of length N (T = B*N).
- counts [E]: routed (token, slot) pairs per expert; they sum to T*k.
- load fractions [E]: counts / (T*k) (sum to 1).
- imbalance: max/mean of counts (1 = perfectly balanced; E/k when every token picks the same k
  experts) and the coefficient of variation std/mean (population std; 0 = balanced).
- router entropy [T]: of the token's distribution over all E experts, in nats; softmax of the logits,
  or for sigmoid routers (DeepSeek-V3) the sigmoid scores normalised to sum 1.
- auxiliary losses (all without their coefficient alpha, unless given):
  * `switch_aux_loss` (Switch Transformer, generalised to top-k as Mixtral / Transformers v5 do for
    one layer): E * sum_e f_e * P_e, f_e = counts_e / T (fraction of tokens sending a slot to e,
    sums to k), P_e = mean softmax probability of e. Balanced: k. With per_slot=True f_e = counts_e/(T*k)
    (sums to 1; balanced: 1), the normalisation Megatron-style implementations use.
  * `v5_load_balancing_loss`: exactly v5's `load_balancing_loss_func`: the counts and probabilities
    of all layers pooled before the product, top-k recomputed from the softmax of the logits.
  * `deepseek_seq_aux_loss` (DeepSeek-V3 complementary sequence-wise balance loss): per sequence
    f_i = E/(k N) * #tokens choosing i, P_i = mean_t s'_{t,i} with s' the affinities normalised per
    token; loss = alpha * sum_i f_i P_i, averaged over sequences. Balanced: 1.
  * `z_loss` (ST-MoE router z-loss): mean_t logsumexp(logits_t)^2.
- dropped tokens under a capacity factor cf: capacity C = ceil(cf * T * k / E) slots per expert;
  slots beyond C are dropped in a priority order: "token" (flat t*k+j order), "slot" (all first
  choices before any second choice, GShard/Switch style) or "weight" (largest weight first).
"""
from __future__ import annotations

import math

import numpy as np

AUX_LOSS_CONVENTIONS = ("switch", "switch_per_slot", "deepseek_seq", "z_loss")


def _xp(*arrays):
    """jax.numpy if any input is a JAX array (or tracer), else numpy."""
    for a in arrays:
        if type(a).__module__.startswith(("jax", "jaxlib")):
            import jax.numpy as jnp

            return jnp
    return np


def _one_hot(ids, num_experts, xp, dtype=None):
    """ids [...] -> [..., E] one-hot (float32 unless dtype given)."""
    return (ids[..., None] == xp.arange(num_experts)).astype(dtype or xp.float32)


# ---- load and imbalance ---------------------------------------------------------------------------
def expert_counts(ids, num_experts: int, mask=None):
    """ids [T, k] -> counts [E] (int64 in NumPy; float32 under JAX). mask [T] (1 = real token) drops padding."""
    xp = _xp(ids, mask)
    if xp is np and mask is None:
        return np.bincount(np.asarray(ids).reshape(-1).astype(np.int64), minlength=num_experts).astype(np.int64)
    hot = _one_hot(ids, num_experts, xp)  # [T, k, E]
    if mask is not None:
        hot = hot * xp.asarray(mask, dtype=xp.float32)[:, None, None]
    counts = hot.sum(axis=(0, 1))
    return counts.astype(np.int64) if xp is np else counts


def load_fractions(counts):
    """counts [..., E] -> fractions [..., E] summing to 1 (zeros where nothing was routed)."""
    xp = _xp(counts)
    counts = counts.astype(xp.float64 if xp is np else xp.float32)
    total = counts.sum(axis=-1, keepdims=True)
    return counts / xp.where(total == 0, 1, total)


def max_over_mean(counts):
    """counts [..., E] -> [...]: busiest expert's load over the mean load (1 = balanced)."""
    xp = _xp(counts)
    counts = counts.astype(xp.float32)
    mean = counts.mean(axis=-1)
    return counts.max(axis=-1) / xp.where(mean == 0, 1, mean)


def coefficient_of_variation(counts):
    """counts [..., E] -> [...]: population std / mean of the per-expert load (0 = balanced)."""
    xp = _xp(counts)
    counts = counts.astype(xp.float32)
    mean = counts.mean(axis=-1)
    return counts.std(axis=-1) / xp.where(mean == 0, 1, mean)


def imbalance(counts) -> dict:
    """counts [..., E] -> {"max_over_mean", "cv", "min_over_mean", "idle_experts"} each [...]."""
    xp = _xp(counts)
    c = counts.astype(xp.float32)
    mean = c.mean(axis=-1)
    safe = xp.where(mean == 0, 1, mean)
    return {"max_over_mean": c.max(axis=-1) / safe, "cv": c.std(axis=-1) / safe,
            "min_over_mean": c.min(axis=-1) / safe, "idle_experts": (c == 0).sum(axis=-1)}


# ---- router distributions -------------------------------------------------------------------------
def _logsumexp(x, xp):
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    return (m + xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def router_probs(logits, score: str = "softmax"):
    """logits [T, E] -> probabilities [T, E] (float32): softmax, or sigmoid scores normalised per token."""
    xp = _xp(logits)
    x = logits.astype(xp.float32)
    if score == "softmax":
        return xp.exp(x - _logsumexp(x, xp)[..., None])
    if score == "sigmoid":
        s = 1.0 / (1.0 + xp.exp(-x))
        return s / s.sum(axis=-1, keepdims=True)
    raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


def router_entropy(logits, score: str = "softmax", normalize: bool = False):
    """logits [T, E] -> entropy [T] in nats of each token's routing distribution; normalize=True
    divides by log E (1 = uniform over all experts, 0 = one expert)."""
    xp = _xp(logits)
    p = router_probs(logits, score)
    ent = -(p * xp.log(xp.where(p > 0, p, 1))).sum(axis=-1)
    if normalize:
        ent = ent / math.log(logits.shape[-1]) if logits.shape[-1] > 1 else ent * 0
    return ent


def mean_router_entropy(logits, score: str = "softmax", normalize: bool = False, mask=None):
    """logits [T, E] -> scalar: mean per-token entropy (over real tokens when mask [T] is given)."""
    xp = _xp(logits, mask)
    ent = router_entropy(logits, score, normalize)
    if mask is None:
        return ent.mean()
    m = xp.asarray(mask, dtype=xp.float32)
    return (ent * m).sum() / xp.maximum(m.sum(), 1)


def weight_entropy(weights):
    """weights [T, k] -> [T]: entropy (nats) of the token's k routing weights after normalising them to
    sum 1 (works without logits; 0 = one slot carries everything, log k = equal weights)."""
    xp = _xp(weights)
    w = weights.astype(xp.float32)
    w = w / xp.where(w.sum(axis=-1, keepdims=True) == 0, 1, w.sum(axis=-1, keepdims=True))
    return -(w * xp.log(xp.where(w > 0, w, 1))).sum(axis=-1)


# ---- top-k weights --------------------------------------------------------------------------------
def topk_weight_summary(weights) -> dict:
    """weights [T, k] -> {"mean" [k], "std" [k] of the weights sorted largest first per token,
    "sum_mean": mean of the per-token weight sum, "top1_share": mean share of the largest weight}."""
    xp = _xp(weights)
    w = weights.astype(xp.float32)
    ranked = -xp.sort(-w, axis=-1)
    total = w.sum(axis=-1)
    return {"mean": ranked.mean(axis=0), "std": ranked.std(axis=0), "sum_mean": total.mean(),
            "top1_share": (ranked[:, 0] / xp.where(total == 0, 1, total)).mean()}


def topk_weight_histogram(weights, bins: int = 20, value_range=(0.0, 1.0)):
    """weights [T, k] -> (hist [k, bins] counts of the j-th largest weight, edges [bins + 1]) (NumPy)."""
    w = -np.sort(-np.asarray(weights, dtype=np.float32), axis=-1)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    hist = np.stack([np.histogram(w[:, j], bins=edges)[0] for j in range(w.shape[1])]) if w.size else np.zeros((w.shape[1], bins), np.int64)
    return hist, edges


# ---- co-occurrence --------------------------------------------------------------------------------
def cooccurrence(ids, num_experts: int):
    """ids [T, k] -> C [E, E]: C[i, j] = tokens choosing both i and j (i != j); C[i, i] = counts_i.
    Symmetric (the Gram matrix of the tokens' multi-hot choices)."""
    xp = _xp(ids)
    multi = _one_hot(ids, num_experts, xp).sum(axis=1)  # [T, E]
    out = multi.T @ multi
    return out.astype(np.int64) if xp is np else out


def cooccurrence_lift(ids, num_experts: int):
    """ids [T, k] -> [E, E]: observed pair frequency over the frequency expected if the two choices were
    independent, C[i, j] * T / (c_i c_j) (1 = independent, > 1 = chosen together more often); the
    diagonal and pairs with an unused expert are 0."""
    xp = _xp(ids)
    c = cooccurrence(ids, num_experts).astype(xp.float32)
    counts = xp.diagonal(c)
    expected = counts[:, None] * counts[None, :]
    lift = c * ids.shape[0] / xp.where(expected == 0, 1, expected)
    return xp.where(xp.eye(num_experts, dtype=bool) | (expected == 0), 0.0, lift)


# ---- drift across steps ---------------------------------------------------------------------------
def load_drift(fractions, reference: str = "previous", metric: str = "tv"):
    """fractions [S, E] (load per step) -> [S - 1] ("previous") or [S] ("first") distances between
    load distributions: "tv" total variation (0..1) or "js" Jensen-Shannon divergence (nats, 0..log 2)."""
    xp = _xp(fractions)
    f = fractions.astype(xp.float32)
    if reference == "previous":
        a, b = f[1:], f[:-1]
    elif reference == "first":
        a, b = f, xp.broadcast_to(f[:1], f.shape)
    else:
        raise ValueError(f"reference must be 'previous' or 'first', got {reference!r}")
    if metric == "tv":
        return 0.5 * xp.abs(a - b).sum(axis=-1)
    if metric == "js":
        m = 0.5 * (a + b)

        def kl(p, q):
            return (p * xp.log(xp.where(p > 0, p, 1) / xp.where(q > 0, q, 1))).sum(axis=-1)

        return 0.5 * kl(a, m) + 0.5 * kl(b, m)
    raise ValueError(f"metric must be 'tv' or 'js', got {metric!r}")


def topk_overlap(ids_a, ids_b, num_experts: int):
    """ids_a, ids_b [T, k] (the same tokens routed at two steps) -> [T]: |A & B| / k per token
    (1 = same expert set, 0 = disjoint)."""
    xp = _xp(ids_a, ids_b)
    a = _one_hot(ids_a, num_experts, xp).sum(axis=1)
    b = _one_hot(ids_b, num_experts, xp).sum(axis=1)
    return (a * b).sum(axis=-1) / ids_a.shape[-1]


# ---- capacity -------------------------------------------------------------------------------------
def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * T * k / E)."""
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def dropped_slots(ids, num_experts: int, capacity_factor: float, weights=None, priority: str = "token"):
    """ids [T, k] -> bool [T, k]: True where the (token, slot) pair overflows its expert's capacity.

    priority: "token" (earlier tokens first, flat t*k+j), "slot" (every token's first choice before any
    second choice), "weight" (largest routing weight first; needs weights [T, k])."""
    xp = _xp(ids, weights)
    tokens, k = ids.shape
    cap = expert_capacity(tokens, num_experts, k, capacity_factor)
    flat = ids.reshape(-1)
    if priority == "token":
        order = xp.arange(tokens * k)
    elif priority == "slot":
        order = xp.arange(tokens * k).reshape(tokens, k).T.reshape(-1)
    elif priority == "weight":
        if weights is None:
            raise ValueError("priority='weight' needs the routing weights")
        order = xp.argsort(-weights.reshape(-1).astype(xp.float32), stable=True)
    else:
        raise ValueError(f"priority must be 'token', 'slot' or 'weight', got {priority!r}")
    ordered = flat[order]
    position = (xp.cumsum(_one_hot(ordered, num_experts, xp, xp.int32), axis=0) * _one_hot(ordered, num_experts, xp, xp.int32)).sum(axis=-1) - 1
    dropped_ordered = position >= cap
    inverse = xp.argsort(order)
    return dropped_ordered[inverse].reshape(tokens, k)


def dropped_tokens(ids, num_experts: int, capacity_factor: float, weights=None, priority: str = "token") -> dict:
    """Summary of `dropped_slots`: {"capacity", "dropped_slots" [T, k], "slot_fraction" (dropped pairs
    / T*k), "token_fraction" (tokens losing at least one slot), "lost_weight" (fraction of routing weight
    dropped; with weights), "overflow" [E] pairs beyond capacity per expert}."""
    xp = _xp(ids, weights)
    tokens, k = ids.shape
    mask = dropped_slots(ids, num_experts, capacity_factor, weights, priority)
    counts = _one_hot(ids, num_experts, xp).sum(axis=(0, 1))
    cap = expert_capacity(tokens, num_experts, k, capacity_factor)
    out = {"capacity": cap, "dropped_slots": mask,
           "slot_fraction": mask.astype(xp.float32).sum() / max(tokens * k, 1),
           "token_fraction": mask.any(axis=-1).astype(xp.float32).sum() / max(tokens, 1),
           "overflow": xp.maximum(counts - cap, 0)}
    if weights is not None:
        w = weights.astype(xp.float32)
        out["lost_weight"] = (w * mask).sum() / xp.where(w.sum() == 0, 1, w.sum())
    return out


# ---- auxiliary losses -----------------------------------------------------------------------------
def switch_aux_loss(logits, ids, num_experts: int, per_slot: bool = False, mask=None):
    """Switch/Mixtral load-balancing loss of one layer: logits [T, E], ids [T, k] -> scalar
    E * sum_e f_e P_e with f_e = counts_e / T (per_slot: / (T*k)), P_e = mean softmax prob (see module doc)."""
    xp = _xp(logits, ids, mask)
    probs = router_probs(logits, "softmax")
    hot = _one_hot(ids, num_experts, xp).sum(axis=1)  # [T, E]
    if mask is None:
        n = probs.shape[0]
        f, p = hot.sum(axis=0) / n, probs.sum(axis=0) / n
    else:
        m = xp.asarray(mask, dtype=xp.float32)[:, None]
        n = xp.maximum(m.sum(), 1)
        f, p = (hot * m).sum(axis=0) / n, (probs * m).sum(axis=0) / n
    if per_slot:
        f = f / ids.shape[-1]
    return num_experts * (f * p).sum()


def v5_load_balancing_loss(logits_per_layer, num_experts: int, top_k: int, mask=None):
    """Transformers v5's `load_balancing_loss_func` (Mixtral, Qwen3-MoE, ...) in NumPy/JAX:
    [logits [T, E] per layer] -> scalar; all layers pooled, top-k recomputed from the softmax."""
    xp = _xp(*logits_per_layer, mask)
    f_sum = xp.zeros(num_experts, dtype=xp.float32)
    p_sum = xp.zeros(num_experts, dtype=xp.float32)
    rows = 0.0
    m = None if mask is None else xp.asarray(mask, dtype=xp.float32).reshape(-1)
    for logits in logits_per_layer:
        probs = router_probs(logits, "softmax")
        ids = xp.argsort(-probs, axis=-1, stable=True)[:, :top_k]
        hot = _one_hot(ids, num_experts, xp).sum(axis=1)
        if m is None:
            f_sum, p_sum, rows = f_sum + hot.sum(0), p_sum + probs.sum(0), rows + probs.shape[0]
        else:
            f_sum, p_sum, rows = f_sum + (hot * m[:, None]).sum(0), p_sum + (probs * m[:, None]).sum(0), rows + m.sum()
    return num_experts * ((f_sum / rows) * (p_sum / rows)).sum()


def deepseek_seq_aux_loss(logits, ids, num_experts: int, seq_len: int, score: str = "sigmoid", alpha: float = 1.0):
    """DeepSeek-V3 sequence-wise balance loss: logits [T, E], ids [T, k], T = B * seq_len -> scalar
    mean over the B sequences of alpha * sum_i f_i P_i (see module doc). The affinities are the
    sigmoid scores (score="sigmoid") normalised per token; ids are the experts actually chosen."""
    xp = _xp(logits, ids)
    tokens, k = ids.shape
    if tokens % seq_len:
        raise ValueError(f"{tokens} tokens do not split into sequences of length {seq_len}")
    probs = router_probs(logits, score).reshape(-1, seq_len, num_experts)  # [B, N, E]
    hot = _one_hot(ids, num_experts, xp).sum(axis=1).reshape(-1, seq_len, num_experts)
    f = hot.sum(axis=1) * num_experts / (k * seq_len)  # [B, E]
    p = probs.mean(axis=1)  # [B, E]
    return alpha * (f * p).sum(axis=-1).mean()


def z_loss(logits, mask=None):
    """ST-MoE router z-loss: logits [T, E] -> scalar mean_t logsumexp(logits_t)^2."""
    xp = _xp(logits, mask)
    z = _logsumexp(logits.astype(xp.float32), xp) ** 2
    if mask is None:
        return z.mean()
    m = xp.asarray(mask, dtype=xp.float32)
    return (z * m).sum() / xp.maximum(m.sum(), 1)


def aux_losses(logits, ids, num_experts: int, seq_len: int | None = None, score: str = "softmax") -> dict:
    """All named conventions for one layer: {"switch", "switch_per_slot", "z_loss", and "deepseek_seq"
    when seq_len is given}; the DeepSeek loss uses `score` ("sigmoid" for DeepSeek-V3 routers)."""
    out = {"switch": switch_aux_loss(logits, ids, num_experts),
           "switch_per_slot": switch_aux_loss(logits, ids, num_experts, per_slot=True),
           "z_loss": z_loss(logits)}
    if seq_len:
        out["deepseek_seq"] = deepseek_seq_aux_loss(logits, ids, num_experts, seq_len, score=score)
    return out


# ---- whole traces (a moe_lab.analysis.trace.RoutingTrace, or anything with its methods) ----------------------
def load_matrix(trace, step: int | None = None):
    """[L, E] load fractions per layer at `step` (None: summed over all steps)."""
    counts = trace.counts_matrix()  # [S, L, E]
    c = counts.sum(axis=0) if step is None else counts[trace.steps.index(step)]
    return load_fractions(c)


def summarize(trace) -> dict:
    """Per step and layer metrics of a trace, each [S, L] (float64) unless noted:
    "steps" [S], "layers" [L] (names), "load" [S, L, E] fractions, "max_over_mean", "cv",
    "weight_entropy" (mean over tokens), "top1_share", and with logits "entropy" (mean per-token router
    entropy, nats, with the trace's router score), "z_loss", "switch" (aux loss)."""
    steps, layers = trace.steps, trace.layer_names
    counts = trace.counts_matrix()
    out = {"steps": np.asarray(steps), "layers": layers, "load": load_fractions(counts),
           "max_over_mean": max_over_mean(counts).astype(np.float64), "cv": coefficient_of_variation(counts).astype(np.float64)}
    shape = (len(steps), len(layers))
    names = ["weight_entropy", "top1_share"] + (["entropy", "z_loss", "switch"] if trace.has_logits else [])
    for name in names:
        out[name] = np.full(shape, np.nan)
    score = trace.meta.get("router_score") or "softmax"
    for (layer, step), rec in trace.records.items():
        i = steps.index(step)
        out["weight_entropy"][i, layer] = float(weight_entropy(rec["weights"]).mean())
        out["top1_share"][i, layer] = float(topk_weight_summary(rec["weights"])["top1_share"])
        if "logits" in rec:
            out["entropy"][i, layer] = float(mean_router_entropy(rec["logits"], score))
            out["z_loss"][i, layer] = float(z_loss(rec["logits"]))
            out["switch"][i, layer] = float(switch_aux_loss(rec["logits"], rec["ids"], trace.num_experts))
    return out
