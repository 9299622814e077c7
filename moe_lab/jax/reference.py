"""A JAX reference of moe_lab's MoE layer: readable, differentiable with jax.grad, torch-free math.

The same stages as the torch layer (see DESIGN.md), with the same semantics:

    logits = router_logits(hidden, router["weight"], router.get("bias"), routing)      # [T, E]
    weights, ids = select_experts(logits, routing, router.get("e_score_correction_bias"))  # [T, k]
    perm = permute(ids, E)                                # stable sort of the T*k slots by expert
    rows = hidden[perm.token_of_row]                      # [S, H], S = T*k, expert order
    y = experts(rows, perm.counts, params, experts_spec)  # two jax.lax.ragged_dot grouped GEMMs
    out = combine(y, perm, weights, hidden.dtype)         # [T, H], weighted sum over k in float32

`routing` is a `moe_lab.RoutingSpec` and `experts_spec` a `moe_lab.ExpertsSpec` (any object with
their fields works: this module never imports torch, except in the `*_from_torch` helpers).

Routing variants (RoutingSpec semantics, exactly as Transformers v5 defines them per family):
- softmax over E, top-k, optional renormalisation (+ eps) (Qwen3-MoE, Mixtral, ...);
- top-k on the logits, softmax over those k (GPT-OSS: topk_before_softmax);
- sigmoid scores; correction bias added for the selection only; group-limited choice (a group is
  scored by the sum of its best two biased scores, the best topk_group groups compete); weights are
  the unbiased scores of the chosen experts, renormalised (+ eps), times the scaling (DeepSeek-V3).
Ties and order: the rule of torch's `moe_lab.stages.router.select_experts`, the ids of a row largest
score first, among equal scores the lower expert index first (a stable descending sort, NaN above
+inf, -0.0 equal to 0.0), softmax families selecting on the logits (experts 0..k-1 where a row's
probabilities are all NaN). Backends whose routers break ties otherwise are compared on given ids:
`weights_for_ids` computes the weights of those (same math, ids fixed).

Expert layouts (Transformers v5's 3D tensors):
- standard: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I], act(gate) * up;
- GPT-OSS: gate_up_proj [E, H, 2I] with gate/up interleaved in columns, gate_up_proj_bias [E, 2I],
  down_proj [E, I, H], down_proj_bias [E, H], activation (clamp(up, +-limit) + 1) *
  g * sigmoid(alpha * g) with g = min(gate, limit), alpha = 1.702, limit = 7;
- non-gated: up_proj [E, I, H], act(up).
"""
from __future__ import annotations

from typing import NamedTuple

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised where jax is absent
    raise ImportError("moe_lab.jax.reference needs JAX: pip install 'moe_lab[jax]' (or pip install jax)") from exc

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# ---- router ---------------------------------------------------------------------------------------
def router_logits(hidden, weight, bias, routing):
    """hidden [T, H], weight [E, H], bias [E] or None -> logits [T, E] (float32 if routing.logits_fp32)."""
    if routing.logits_fp32:
        hidden, weight = hidden.astype(jnp.float32), weight.astype(jnp.float32)
        bias = None if bias is None else bias.astype(jnp.float32)
    out = hidden @ weight.T
    return out if bias is None else out + bias


def _topk_ids(scores, k):
    """scores [..., n] -> int32 [..., k]: the indices of the k largest scores, largest first; among
    equal scores the lower index first (a stable descending sort). NaN ranks above +inf, all NaNs
    are equal and -0.0 equals 0.0, as in torch.sort (`jax.lax.top_k` orders -0.0 below 0.0 and a
    negative NaN below -inf)."""
    return jnp.argsort(jax.lax.stop_gradient(scores), axis=-1, descending=True, stable=True)[..., :k].astype(jnp.int32)


def _group_limited_mask(choice, routing):
    """choice [T, E] biased scores -> bool [T, E]: experts in each token's kept groups."""
    tokens = choice.shape[0]
    per_group = routing.num_experts // routing.n_group
    grouped = choice.reshape(tokens, routing.n_group, per_group)
    best_two = jnp.take_along_axis(grouped, _topk_ids(grouped, min(2, per_group)), axis=-1)
    group_scores = best_two.sum(axis=-1)  # [T, n_group]
    kept = _topk_ids(group_scores, routing.topk_group)
    group_mask = jax.nn.one_hot(kept, routing.n_group, dtype=jnp.int32).sum(axis=1) > 0  # [T, n_group]
    return jnp.repeat(group_mask, per_group, axis=1)


def _finish_weights(weights, logits, routing):
    if routing.scaling != 1.0:
        weights = weights * routing.scaling
    return weights.astype(logits.dtype) if routing.weights_in_logits_dtype else weights


def _renormalize(weights, routing):
    if routing.renormalize:
        return weights / (weights.sum(axis=-1, keepdims=True) + routing.renormalize_eps)
    return weights


def select_experts(logits, routing, correction_bias=None):
    """logits [T, E] -> (weights [T, k], ids [T, k] int32) with the family's v5 semantics and the
    tie rule of torch's `select_experts` (see the module docstring)."""
    k = routing.top_k
    if routing.topk_before_softmax:  # GPT-OSS
        ids = _topk_ids(logits, k)
        weights = jax.nn.softmax(jnp.take_along_axis(logits, ids, axis=-1), axis=-1)
    elif routing.score == "softmax":
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        # softmax is monotonic: select on the logits; a row of NaN probabilities ties, experts 0..k-1
        all_nan = jnp.isnan(probs).any(axis=-1, keepdims=True)
        ids = _topk_ids(jnp.where(all_nan, 0.0, logits), k)
        weights = _renormalize(jnp.take_along_axis(probs, ids, axis=-1), routing)
    else:  # sigmoid (DeepSeek-V3)
        scores = jax.nn.sigmoid(logits.astype(jnp.float32))
        choice = scores if correction_bias is None else scores + correction_bias.astype(jnp.float32)
        if routing.n_group > 1:
            choice = jnp.where(_group_limited_mask(choice, routing), choice, -jnp.inf)
        ids = _topk_ids(choice, k)
        weights = _renormalize(jnp.take_along_axis(scores, ids, axis=-1), routing)
    return _finish_weights(weights, logits, routing), ids


def weights_for_ids(logits, ids, routing):
    """logits [T, E], ids [T, k] (chosen elsewhere) -> weights [T, k]: what `select_experts` returns for
    those ids, differentiable in the logits (the correction bias only ever affects the choice)."""
    if routing.topk_before_softmax:
        weights = jax.nn.softmax(jnp.take_along_axis(logits, ids, axis=-1), axis=-1)
    elif routing.score == "softmax":
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights = _renormalize(jnp.take_along_axis(probs, ids, axis=-1), routing)
    else:
        scores = jax.nn.sigmoid(logits.astype(jnp.float32))
        weights = _renormalize(jnp.take_along_axis(scores, ids, axis=-1), routing)
    return _finish_weights(weights, logits, routing)


class RouterOutput(NamedTuple):
    """logits [T, E], weights [T, k], ids [T, k] int32 (v5's tuple order)."""

    logits: jax.Array
    weights: jax.Array
    ids: jax.Array


def route(hidden, router: dict, routing, ids=None) -> RouterOutput:
    """hidden [T, H], router {"weight" [E, H], optional "bias" [E], "e_score_correction_bias" [E]} ->
    RouterOutput. With `ids` [T, k] given, those experts are used (weights via `weights_for_ids`)."""
    logits = router_logits(hidden, router["weight"], router.get("bias"), routing)
    if ids is None:
        weights, ids = select_experts(logits, routing, router.get("e_score_correction_bias"))
    else:
        weights = weights_for_ids(logits, ids, routing)
    return RouterOutput(logits, weights, ids)


# ---- permutation ----------------------------------------------------------------------------------
class Permutation(NamedTuple):
    """slot_of_row [S]: flat slot t*k+j of each expert-sorted row (stable: ties in slot order);
    counts [E] int32; token_of_row [S]; num_tokens T and top_k k (Python ints)."""

    slot_of_row: jax.Array
    counts: jax.Array
    token_of_row: jax.Array
    num_tokens: int
    top_k: int


def permute(ids, num_experts: int) -> Permutation:
    """ids [T, k] -> Permutation: one stable argsort and one bincount (jit-friendly: shapes are static)."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    slot_of_row = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return Permutation(slot_of_row, counts, slot_of_row // k, tokens, k)


# ---- experts --------------------------------------------------------------------------------------
def activation(spec):
    """The expert activation: h [S, 2I] -> [S, I] (gated) or [S, I] -> [S, I] (plain)."""
    if spec.activation == "gpt_oss":
        def gpt_oss_glu(h):
            gate = jnp.minimum(h[:, ::2], spec.limit)
            up = jnp.clip(h[:, 1::2], -spec.limit, spec.limit)
            return (up + 1) * (gate * jax.nn.sigmoid(gate * spec.alpha))
        return gpt_oss_glu
    if spec.act_name not in _ACTIVATIONS:
        raise NotImplementedError(f"moe_lab.jax.reference has no activation {spec.act_name!r}; known: {sorted(_ACTIVATIONS)}")
    act = _ACTIVATIONS[spec.act_name]
    if spec.activation == "plain":
        return act
    if spec.interleaved:
        return lambda h: act(h[:, ::2]) * h[:, 1::2]

    def glu(h):
        gate, up = jnp.split(h, 2, axis=-1)
        return act(gate) * up
    return glu


def experts(x, counts, params: dict, spec):
    """x [S, H] rows in expert order, counts [E] -> y [S, H] through two `jax.lax.ragged_dot`s.

    params: v5's names and layouts: "gate_up_proj" (or "up_proj"), "down_proj", and with spec.has_bias
    "gate_up_proj_bias" (or "up_proj_bias"), "down_proj_bias"."""
    first = "gate_up_proj" if spec.gated else "up_proj"
    w1, w2 = params[first], params["down_proj"]
    x = x.astype(w1.dtype)
    # ragged_dot takes rhs [E, in, out]; v5's standard layout is [E, out, in].
    w1_io = w1 if spec.transposed else jnp.swapaxes(w1, 1, 2)
    w2_io = w2 if spec.transposed else jnp.swapaxes(w2, 1, 2)
    counts = counts.astype(jnp.int32)
    h = jax.lax.ragged_dot(x, w1_io, counts)
    expert_of_row = None
    if spec.has_bias:
        expert_of_row = jnp.repeat(jnp.arange(spec.num_experts), counts, total_repeat_length=x.shape[0])
        h = h + params[f"{first}_bias"][expert_of_row]
    y = jax.lax.ragged_dot(activation(spec)(h), w2_io, counts)
    if spec.has_bias:
        y = y + params["down_proj_bias"][expert_of_row]
    return y


def experts_loop(x, counts, params: dict, spec):
    """The same as `experts`, one expert at a time with Python-int counts (for reading, and tests)."""
    first = "gate_up_proj" if spec.gated else "up_proj"
    act = activation(spec)
    pieces, start = [], 0
    for e, n in enumerate([int(c) for c in counts]):
        rows = x[start : start + n].astype(params[first].dtype)
        w1, w2 = params[first][e], params["down_proj"][e]
        h = rows @ w1 if spec.transposed else rows @ w1.T
        if spec.has_bias:
            h = h + params[f"{first}_bias"][e]
        y = act(h) @ w2 if spec.transposed else act(h) @ w2.T
        if spec.has_bias:
            y = y + params["down_proj_bias"][e]
        pieces.append(y)
        start += n
    return jnp.concatenate(pieces) if pieces else jnp.zeros((0, x.shape[-1]), params[first].dtype)


# ---- combine and the layer ------------------------------------------------------------------------
def combine(rows, perm: Permutation, weights, out_dtype):
    """rows [S, H] in expert order, weights [T, k] -> out [T, H]: un-permute, weight, sum over k in float32."""
    inverse = jnp.argsort(perm.slot_of_row)
    by_slot = rows[inverse].reshape(perm.num_tokens, perm.top_k, rows.shape[-1])
    out = jnp.einsum("tkh,tk->th", by_slot.astype(jnp.float32), weights.astype(jnp.float32))
    return out.astype(out_dtype)


def routed_experts(hidden, ids, weights, params: dict, spec):
    """hidden [T, H], ids [T, k], weights [T, k] -> out [T, H] (mirrors moe_lab.layer.run_routed_experts)."""
    perm = permute(ids, spec.num_experts)
    y = experts(hidden[perm.token_of_row], perm.counts, params, spec)
    return combine(y, perm, weights, hidden.dtype)


def moe_layer(hidden, router: dict, params: dict, routing, spec, ids=None):
    """hidden [..., H] -> (out [..., H], RouterOutput): router, permutation, experts, combine
    (no shared experts; add them outside as v5 does)."""
    shape = hidden.shape
    flat = hidden.reshape(-1, shape[-1])
    r = route(flat, router, routing, ids)
    return routed_experts(flat, r.ids, r.weights, params, spec).reshape(shape), r


# ---- parameters from a torch module ----------------------------------------------------------------
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
_ROUTER_PARAMS = ("weight", "bias", "e_score_correction_bias")


def params_from_torch(module, names=None) -> dict:
    """{name: jax array} of a torch module's direct tensors (parameters or buffers) among `names`
    (default: v5's expert and router names), copied through `moe_lab.jax.dlpack` (detached, read-only)."""
    from .dlpack import torch_to_jax

    out = {}
    for name in names or _EXPERT_PARAMS + _ROUTER_PARAMS:
        value = getattr(module, name, None)
        if value is not None and hasattr(value, "detach"):
            out[name] = torch_to_jax(value.detach().clone())
    return out
