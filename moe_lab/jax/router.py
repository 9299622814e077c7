"""A router written in JAX, run inside the PyTorch training step as moe_lab's router stage.

    import moe_lab, moe_lab.jax

    def my_router(params, hidden):              # plain jax.numpy
        logits = hidden @ params["weight"].T    # params: the v5 router module's tensors by name
        ...
        return weights, ids                     # [T, k] float, [T, k] int  (optionally logits [T, E] third)

    model = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend={"router": moe_lab.jax.router(my_router)})
    model.moe_lab_plan          # {"...mlp": {"router": "jax:my_router", ...}}

`router(fn)` registers a router-stage implementation (`registry.register_stage`) named
"jax:<fn name>" with its declared capabilities: the devices JAX and torch share here (the CPU; CUDA
where JAX has a GPU backend), float32 / bfloat16 / float16, not exact (it replaces the family's
routing, so `auto` never picks it), not CUDA-graph safe (it calls JAX from the host), not under
expert parallelism (untested). The returned object is that `StageImpl`; pass it as the value of the
"router" stage in a `moe_backend` mapping (or its name, once registered).

What crosses, and how:
- params: {"weight" [E, H], "bias" [E] (GPT-OSS), "e_score_correction_bias" [E] (DeepSeek-V3, a
  buffer)}: the v5 router module's tensors, so they are ordinary torch parameters of the model, in
  its checkpoint under v5's names. hidden [T, H]. Both go to JAX through DLPack without copies
  (`moe_lab.jax.dlpack.torch_to_jax`; CPU and GPU alike), detached.
- fn runs under `jax.jit` (compiled once per shape and dtype). With gradients on, the forward is
  `jax.vjp(fn)` (jitted; the pullback is returned from the jitted call as a pytree) and the torch
  `autograd.Function`'s backward runs that pullback (jitted) on d(weights) (and d(logits)): the
  gradients of every floating parameter and of hidden come back through DLPack. ids are integers:
  no gradient.
- The outputs come back through DLPack; ids are widened to int64 (a [T, k] copy), as the
  permutation stage expects. The stage returns `RouterOutput(logits, weights, ids)`: logits are the
  fn's third output if it returns one, else v5's linear logits computed in torch (what
  `output_router_logits` and v5's load-balancing loss read).
- Checked, in the user's terms: the number of outputs, their shapes ([T, k], [T, k], [T, E]) and
  dtypes (floating weights and logits, integer ids), once per input shape (from `jax.eval_shape`, no
  device work), and every call that the ids lie in [0, E) (`moe_lab._checks.require_all`: a host check
  on the CPU, a device-side assertion on the GPU unless Options(host_checks=True)).

Slots with weight 0 are allowed and exact downstream: combine adds 0 * y (tests/test_jax_router.py
holds a layer with extra zero-weight slots equal to the layer without them), so a router whose
number of experts varies per token (expert choice, sparsemax) pads its rows to a static k with
zero weights. Each padded slot still costs an expert row of compute.

Two routers the families do not have, built this way (`expert_choice`, `sparsemax_topk`): see their
docstrings, and notebooks/jax_router.ipynb, which trains a tiny model with each.

Limits: `torch.compile` does not trace into JAX (the stage is wrapped in `torch.compiler.disable`: a
graph break; fullgraph=True refuses); CUDA graphs cannot capture it; models of the generic path
(OLMoE, Qwen2-MoE: v5's own router runs) do not use the router stage at all; a router that needs
parameters the v5 module does not have is not supported (the fn gets exactly the module's tensors).
"""
from __future__ import annotations

import itertools
import logging

import torch

from ..registry import _IMPLS, Capabilities, StageImpl, register_stage
from ..stages.router import RouterOutput, RoutingSpec, router_logits

log = logging.getLogger(__name__)

FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16})
PARAM_NAMES = ("weight", "bias", "e_score_correction_bias")


class JaxRouterError(ValueError):
    """A JAX router function returned something the router stage cannot use."""


def _jax():
    try:
        import jax
    except ImportError as exc:  # pragma: no cover - exercised where jax is absent
        raise ImportError("moe_lab.jax.router needs JAX: pip install 'moe_lab[jax]' (or pip install jax)") from exc
    return jax


def jax_devices() -> frozenset:
    """The torch device types whose tensors JAX can take through DLPack here: "cpu", and "cuda" where
    JAX has a GPU backend."""
    jax = _jax()
    out = {"cpu"}
    try:
        if jax.devices("gpu"):
            out.add("cuda")
    except RuntimeError:
        pass
    return frozenset(out)


class JaxRouter:
    """The router-stage function of one JAX router: (hidden [T, H], weight [E, H], bias [E] | None,
    correction_bias [E] | None, spec) -> RouterOutput(logits [T, E], weights [T, k], ids [T, k] int64).
    See the module docstring."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name
        jax = _jax()
        self._jit = jax.jit(fn)

        def forward_vjp(params, hidden):
            def differentiable(p, h):
                out = fn(p, h)
                return (out[0],) + tuple(out[2:]), out[1]  # (weights[, logits]), aux: ids
            primal, pullback, ids = jax.vjp(differentiable, params, hidden, has_aux=True)
            return primal, ids, pullback

        self._jit_vjp = jax.jit(forward_vjp)
        self._jit_pullback = jax.jit(lambda pullback, cotangent: pullback(cotangent))
        self._checked: dict = {}

    def __repr__(self) -> str:
        return f"moe_lab.jax.router({self.name})"

    def __deepcopy__(self, memo):  # models holding it are deep-copied (the jitted functions are not)
        return self

    def __reduce__(self):
        return _rebuild, (self.fn, self.name)

    # ---- checks ------------------------------------------------------------------------------------
    def _where(self, spec: RoutingSpec, hidden) -> str:
        return f"moe_lab.jax.router({self.name}) on a layer of {spec.num_experts} experts, hidden {tuple(hidden.shape)}"

    def check_outputs(self, params: dict, hidden, spec: RoutingSpec) -> bool:
        """Check the fn's output structure, shapes and dtypes for these inputs (once per shapes and
        dtypes; no device work); returns whether it returns logits too."""
        jax = _jax()
        key = (tuple((n, tuple(p.shape), str(p.dtype)) for n, p in params.items()), tuple(hidden.shape), str(hidden.dtype))
        if key in self._checked:
            return self._checked[key]
        where = self._where(spec, hidden)
        try:
            out = jax.eval_shape(self.fn, params, hidden)
        except Exception as exc:
            raise JaxRouterError(f"{where}: the JAX function fails on params {{{', '.join(f'{n!r}: {tuple(p.shape)} {p.dtype}' for n, p in params.items())}}} "
                                 f"and hidden {tuple(hidden.shape)} {hidden.dtype}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
            raise JaxRouterError(f"{where}: the JAX function must return (weights [T, k], ids [T, k]) or "
                                 f"(weights, ids, logits [T, E]); it returned {got}")
        tokens, experts = hidden.shape[0], spec.num_experts
        weights, ids = out[0], out[1]
        if len(weights.shape) != 2 or weights.shape[0] != tokens or weights.shape[1] < 1:
            raise JaxRouterError(f"{where}: weights must be [T, k] = [{tokens}, k >= 1]; got {tuple(weights.shape)}")
        k = weights.shape[1]
        if tuple(ids.shape) != (tokens, k):
            raise JaxRouterError(f"{where}: ids must have the weights' shape [T, k] = [{tokens}, {k}]; got {tuple(ids.shape)}")
        jnp = _jax().numpy  # its issubdtype knows bfloat16 (numpy's does not)

        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise JaxRouterError(f"{where}: weights must be floating point; got {weights.dtype}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise JaxRouterError(f"{where}: ids must be integers (expert indices in [0, {experts})); got {ids.dtype}")
        if len(out) == 3:
            logits = out[2]
            if tuple(logits.shape) != (tokens, experts):
                raise JaxRouterError(f"{where}: logits (the third output) must be [T, E] = [{tokens}, {experts}]; "
                                     f"got {tuple(logits.shape)}")
            if not jnp.issubdtype(logits.dtype, jnp.floating):
                raise JaxRouterError(f"{where}: logits must be floating point; got {logits.dtype}")
        self._checked[key] = len(out) == 3
        return self._checked[key]

    def _check_ids(self, ids: torch.Tensor, spec: RoutingSpec, hidden) -> None:
        from .._checks import require_all

        E = spec.num_experts
        if ids.numel():
            require_all((ids >= 0) & (ids < E), f"{self._where(spec, hidden)}: the JAX function returned expert ids "
                        f"outside [0, {E})", lambda: f"found ids from {int(ids.min())} to {int(ids.max())}")

    # ---- the stage ---------------------------------------------------------------------------------
    @torch.compiler.disable
    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, bias, correction_bias, spec: RoutingSpec) -> RouterOutput:
        from .dlpack import torch_to_jax

        tensors = {n: t for n, t in zip(PARAM_NAMES, (weight, bias, correction_bias)) if t is not None}
        names = tuple(tensors)
        jparams = {n: torch_to_jax(t) for n, t in tensors.items()}
        jhidden = torch_to_jax(hidden)
        has_logits = self.check_outputs(jparams, jhidden, spec)
        leaves = (hidden,) + tuple(tensors[n] for n in names)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
        if grad:
            outs = _JaxRouterFunction.apply(self, names, jparams, jhidden, has_logits, *leaves)
        else:
            outs = self._forward_no_grad(jparams, jhidden)
        weights, ids = outs[0], outs[1]
        self._check_ids(ids, spec, hidden)
        logits = outs[2] if has_logits else router_logits(hidden, weight, bias, spec)
        return RouterOutput(logits, weights, ids)

    def _forward_no_grad(self, jparams, jhidden):
        from .dlpack import jax_to_torch

        out = self._jit(jparams, jhidden)
        return (jax_to_torch(out[0]), jax_to_torch(out[1]).long()) + tuple(jax_to_torch(o) for o in out[2:])


def _rebuild(fn, name):
    impl = _IMPLS["router"].get(name)
    if impl is not None and isinstance(impl.fn, JaxRouter) and impl.fn.fn is fn:
        return impl.fn
    return router(fn, name=name).fn


class _JaxRouterFunction(torch.autograd.Function):
    """(hidden, *router tensors) -> (weights, ids[, logits]) by jax.vjp(fn); backward: the pullback."""

    @staticmethod
    def forward(ctx, stage: JaxRouter, names, jparams, jhidden, has_logits, hidden, *tensors):
        from .dlpack import jax_to_torch

        (weights, *logits), ids, pullback = stage._jit_vjp(jparams, jhidden)
        ctx.pullback, ctx.stage, ctx.names = pullback, stage, names
        ctx.dtypes = (weights.dtype,) + tuple(l.dtype for l in logits)
        ctx.hidden_dtype = hidden.dtype
        t_ids = jax_to_torch(ids).long()
        ctx.mark_non_differentiable(t_ids)
        return (jax_to_torch(weights), t_ids) + tuple(jax_to_torch(l) for l in logits)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_weights, _d_ids, *d_logits):
        from .dlpack import jax_to_torch, torch_to_jax

        jnp = _jax().numpy
        cotangent = tuple(torch_to_jax(d.contiguous()).astype(dt) if d is not None else None
                          for d, dt in zip((d_weights,) + d_logits, ctx.dtypes))
        cotangent = tuple(c if c is not None else jnp.zeros((), dt) for c, dt in zip(cotangent, ctx.dtypes))
        d_params, d_hidden = ctx.stage._jit_pullback(ctx.pullback, cotangent)
        ctx.pullback = None  # frees JAX's residuals
        grads = [jax_to_torch(d_hidden) if ctx.needs_input_grad[5] else None]
        for i, name in enumerate(ctx.names):
            grads.append(jax_to_torch(d_params[name]) if ctx.needs_input_grad[6 + i] else None)
        return (None, None, None, None, None, *grads)


_COUNTER = itertools.count(2)


def router(fn, *, name: str | None = None) -> StageImpl:
    """Register the JAX function `fn(params, hidden) -> (weights [T, k], ids [T, k])` (or with
    logits [T, E] third) as a router-stage implementation; returns its `StageImpl`, the value to give
    the "router" stage in `moe_backend`. name: default "jax:<fn's name>" (made unique with "#2", ...
    if another function holds it)."""
    if not callable(fn):
        raise TypeError(f"moe_lab.jax.router takes a JAX function fn(params, hidden) -> (weights, ids); got {type(fn).__name__}")
    for impl in _IMPLS["router"].values():  # the same function again: the same implementation
        if isinstance(impl.fn, JaxRouter) and impl.fn.fn is fn and (name is None or impl.name == name):
            return impl
    base = name or f"jax:{getattr(fn, '__name__', type(fn).__name__)}"
    if base in _IMPLS["router"] and not isinstance(_IMPLS["router"][base].fn, JaxRouter):
        raise ValueError(f"router name {base!r} is taken by a built-in router implementation")
    name = base
    while name in _IMPLS["router"]:
        name = f"{base}#{next(_COUNTER)}"
    devices = jax_devices()
    caps = Capabilities(devices=devices, dtypes={d: FLOATS for d in devices}, exact=False, graph_safe=False,
                        traceable=False, expert_parallel=False)
    doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    impl = register_stage("router", name, JaxRouter(fn, name), caps=caps,
                          description=f"JAX router {name} (replaces the family's routing)" + (f": {doc[0]}" if doc else ""))
    return impl


# ---- two routers the families do not have ------------------------------------------------------------
def expert_choice(top_k: int, capacity_factor: float = 1.0, max_experts: int | None = None, score: str = "softmax"):
    """Expert-choice routing (Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing") as a
    JAX router fn: every expert picks its C = ceil(capacity_factor * T * top_k / E) highest-scoring
    tokens (scores: softmax over experts of the router logits), so the load is balanced by
    construction and a token gets 0..E experts.

    Output format (weights [T, m], ids [T, m]) with m = max_experts (default E: nothing is dropped):
    per token, the experts that picked it, highest score first, weight = its score; the remaining
    slots have weight 0 (exactly) and point at the token's best-scoring unpicked experts (so padded
    rows are spread over experts rather than piled on expert 0). With m < E a token keeps only its m
    best picks. Each of the T*m slots costs an expert row of compute (m = E: E/top_k times top-k's);
    the routing statistics of the real choice are the slots with weight > 0.

    Not causal: a token's experts depend on the other tokens of the batch (as in the paper), and at
    T = 1 every expert picks the one token. Gradients reach the router through the picked scores.
    """
    def expert_choice_router(params, hidden):
        import jax
        import jax.numpy as jnp

        logits = hidden @ params["weight"].T
        if "bias" in params:
            logits = logits + params["bias"]
        logits = logits.astype(jnp.float32)
        T, E = logits.shape
        scores = jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)
        capacity = max(1, min(T, -(-int(capacity_factor * T * top_k) // E)))
        # each expert's top-C tokens: a stable descending sort of the column, lower token index first on ties
        token_rank = jnp.argsort(jnp.argsort(-jax.lax.stop_gradient(scores), axis=0, stable=True), axis=0, stable=True)
        picked = token_rank < capacity  # [T, E]
        m = E if max_experts is None else min(max_experts, E)
        # per token: picked experts first (by score), then the unpicked ones (by score): key in (-2, 1]
        key = jnp.where(picked, jax.lax.stop_gradient(scores), jax.lax.stop_gradient(scores) - 2.0)
        ids = jnp.argsort(-key, axis=-1, stable=True)[:, :m].astype(jnp.int32)
        weights = jnp.where(jnp.take_along_axis(picked, ids, axis=-1), jnp.take_along_axis(scores, ids, axis=-1), 0.0)
        return weights.astype(hidden.dtype), ids, logits

    expert_choice_router.__doc__ = f"expert choice, capacity factor {capacity_factor}, top_k {top_k}, max experts {max_experts or 'E'}"
    return expert_choice_router


def sparsemax(z, axis: int = -1):
    """Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of z onto the simplex; like
    softmax, but exact zeros outside a data-dependent support. Differentiable (piecewise linear)."""
    import jax.numpy as jnp

    z = jnp.moveaxis(z, axis, -1)
    n = z.shape[-1]
    z_sorted = -jnp.sort(-z, axis=-1)
    k = jnp.arange(1, n + 1, dtype=z.dtype)
    cumsum = jnp.cumsum(z_sorted, axis=-1)
    support = 1 + k * z_sorted > cumsum
    k_z = support.sum(axis=-1, keepdims=True)
    tau = (jnp.take_along_axis(cumsum, k_z - 1, axis=-1) - 1) / k_z.astype(z.dtype)
    return jnp.moveaxis(jnp.maximum(z - tau, 0.0), -1, axis)


def sparsemax_topk(top_k: int, temperature: float = 1.0, renormalize: bool = True):
    """A soft top-k router: weights = sparsemax(logits / temperature) at the top_k largest logits
    (renormalised over those k when the support is wider than k). Sparsemax gives exact zeros outside
    its support, so a confident token uses fewer than top_k experts: its remaining slots carry weight
    0 (exactly; still computed). The temperature sets how sparse: small -> often one expert, large ->
    softmax-like, all k used. Gradients reach the router through sparsemax's Jacobian."""
    def sparsemax_topk_router(params, hidden):
        import jax
        import jax.numpy as jnp

        logits = hidden @ params["weight"].T
        if "bias" in params:
            logits = logits + params["bias"]
        logits = logits.astype(jnp.float32)
        probs = sparsemax(logits / temperature)
        ids = jnp.argsort(-jax.lax.stop_gradient(logits), axis=-1, stable=True)[:, :top_k].astype(jnp.int32)
        weights = jnp.take_along_axis(probs, ids, axis=-1)
        if renormalize:
            weights = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-20)
        return weights.astype(hidden.dtype), ids, logits

    sparsemax_topk_router.__doc__ = f"sparsemax soft top-{top_k}, temperature {temperature}"
    return sparsemax_topk_router
