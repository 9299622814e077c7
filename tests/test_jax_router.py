"""A router written in JAX as moe_lab's router stage (moe_lab.jax.router): values and gradients against
torch (the family's routing written in JAX equals moe_lab's reference router, stage and whole model),
the two example routers against JAX's own vjp, zero-weight slots exact downstream, the registration
(plan, capabilities, refusals) and the errors a wrong JAX function gets. CPU, hypothesis over shapes."""
from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, strategies as st

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import moe_lab  # noqa: E402
import moe_lab.jax  # noqa: E402
from hypothesis_profiles import examples  # noqa: E402
from moe_lab.jax import reference as jr  # noqa: E402
from moe_lab.jax.router import JaxRouterError, expert_choice, sparsemax, sparsemax_topk  # noqa: E402
from moe_lab.layer import run_routed_experts  # noqa: E402
from moe_lab.registry import LayerNeeds, StageRefusedError, plan_layer, resolve_backend  # noqa: E402
from moe_lab.stages.dispatch import LocalDispatcher  # noqa: E402
from moe_lab.stages.router import RoutingSpec, route_reference  # noqa: E402
from tiny_models import tiny_config  # noqa: E402


def family_routing_in_jax(routing: RoutingSpec):
    """The family's own routing, written in JAX (the JAX reference), as a JAX router fn."""
    def family_router(params, hidden):
        logits = jr.router_logits(hidden, params["weight"], params.get("bias"), routing)
        weights, ids = jr.select_experts(logits, routing, params.get("e_score_correction_bias"))
        return weights, ids, logits
    return family_router


def _tensors(T, H, E, seed, bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(E, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(E, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def _grads(outs, leaves, seed):
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


# ---- the family's routing in JAX equals the torch reference router -----------------------------------
@examples(ci=6)
@given(T=st.integers(0, 12), H=st.integers(1, 9), E=st.integers(1, 7), data=st.data(),
       gpt_oss=st.booleans(), renormalize=st.booleans(), seed=st.integers(0, 2**16))
def test_family_router_in_jax_equals_reference(T, H, E, data, gpt_oss, renormalize, seed):
    k = data.draw(st.integers(1, E))
    routing = RoutingSpec(E, k, topk_before_softmax=gpt_oss, renormalize=renormalize and not gpt_oss)
    impl = moe_lab.jax.router(family_routing_in_jax(routing), name=f"jax:test_family_{gpt_oss}_{renormalize}_{E}_{k}")
    hidden, weight, bias = _tensors(T, H, E, seed, bias=gpt_oss)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    got = impl.fn(hidden, weight, bias, None, routing)
    ref = route_reference(hidden, weight, bias, None, routing)
    assert got.ids.dtype == torch.int64 and torch.equal(got.ids, ref.ids)
    torch.testing.assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    if T:
        for a, b in zip(_grads(got[:2] + (got.logits,), leaves, seed), _grads(ref[:2] + (ref.logits,), leaves, seed)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_logits_computed_in_torch_when_fn_returns_two():
    routing = RoutingSpec(5, 2, renormalize=True)
    fn = family_routing_in_jax(routing)
    impl = moe_lab.jax.router(lambda p, h: fn(p, h)[:2], name="jax:test_two_outputs")
    hidden, weight, _ = _tensors(7, 6, 5, 0)
    got, ref = impl.fn(hidden, weight, None, None, routing), route_reference(hidden, weight, None, None, routing)
    torch.testing.assert_close(got.logits, ref.logits)
    for a, b in zip(_grads(tuple(got[:2]) + (got.logits,), [hidden, weight], 0), _grads(tuple(ref[:2]) + (ref.logits,), [hidden, weight], 0)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_router_runs_and_matches_the_reference():
    """bf16 hidden and router weight (a bf16 model on the GPU): numpy's issubdtype does not know
    bfloat16 as floating point; the output check must."""
    routing = RoutingSpec(6, 2, renormalize=True)
    impl = moe_lab.jax.router(family_routing_in_jax(routing), name="jax:test_bf16")
    hidden, weight, _ = _tensors(9, 8, 6, 1)
    hidden, weight = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    got, ref = impl.fn(hidden, weight, None, None, routing), route_reference(hidden, weight, None, None, routing)
    assert got.weights.dtype == ref.weights.dtype and torch.equal(got.ids, ref.ids)
    torch.testing.assert_close(got.weights, ref.weights, rtol=2e-2, atol=1e-2)


def test_deepseek_correction_bias_reaches_jax_as_a_buffer():
    routing = RoutingSpec(8, 2, score="sigmoid", renormalize=True, renormalize_eps=1e-20, n_group=2, topk_group=1,
                          has_correction_bias=True, scaling=2.5, logits_fp32=True, weights_in_logits_dtype=False)
    impl = moe_lab.jax.router(family_routing_in_jax(routing), name="jax:test_deepseek")
    hidden, weight, _ = _tensors(9, 6, 8, 3)
    correction = torch.randn(8) * 0.2
    got, ref = impl.fn(hidden, weight, None, correction, routing), route_reference(hidden, weight, None, correction, routing)
    assert torch.equal(got.ids, ref.ids)
    for a, b in zip(_grads(got[:2], [hidden, weight], 3), _grads(ref[:2], [hidden, weight], 3)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the two example routers: the torch stage equals JAX's own value and vjp --------------------------
@examples(ci=5)
@given(T=st.integers(1, 16), H=st.integers(1, 8), E=st.integers(1, 8), data=st.data(), seed=st.integers(0, 2**16),
       which=st.sampled_from(["expert_choice", "sparsemax"]))
def test_example_routers_equal_jax_vjp(T, H, E, data, seed, which):
    k = data.draw(st.integers(1, E))
    if which == "expert_choice":
        cap = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
        m = data.draw(st.one_of(st.none(), st.integers(1, E)))
        fn = expert_choice(k, capacity_factor=cap, max_experts=m)
    else:
        fn = sparsemax_topk(k, temperature=data.draw(st.sampled_from([0.1, 1.0, 5.0])))
    impl = moe_lab.jax.router(fn)
    hidden, weight, _ = _tensors(T, H, E, seed)
    got = impl.fn(hidden, weight, None, None, RoutingSpec(E, k))
    jp, jh = {"weight": jnp.asarray(weight.detach().numpy())}, jnp.asarray(hidden.detach().numpy())
    (w, ids, logits), pullback = jax.vjp(lambda p, h: fn(p, h), jp, jh)
    np.testing.assert_array_equal(got.ids.numpy(), np.asarray(ids))
    # the router runs jitted, the reference op by op: XLA's fusions round differently, and sparsemax's
    # threshold subtraction (at temperature 0.1: logits x 10) turns that into up to ~5e-7 on weights <= 1
    np.testing.assert_allclose(got.weights.detach().numpy(), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert (got.weights >= 0).all() and ((got.ids >= 0) & (got.ids < E)).all()
    if which == "expert_choice":  # each expert takes at most C tokens (without a per-token cap: exactly C)
        capacity = max(1, min(T, -(-int(cap * T * k) // E)))
        per_expert = torch.bincount(got.ids[got.weights > 0], minlength=E)
        assert (per_expert <= capacity).all() and (m is not None or (per_expert == capacity).all())
    else:  # sparsemax: the weights of a token sum to 1 (renormalised), zeros only after the support
        torch.testing.assert_close(got.weights.sum(-1), torch.ones(T), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(seed)
    cw, cl = torch.randn(T, got.weights.shape[1], generator=g), torch.randn(T, E, generator=g)
    d_hidden, d_weight = torch.autograd.grad((got.weights * cw).sum() + (got.logits * cl).sum(), [hidden, weight])
    jd_p, jd_h = pullback((jnp.asarray(cw.numpy()), np.zeros(ids.shape, jax.dtypes.float0), jnp.asarray(cl.numpy())))
    np.testing.assert_allclose(d_hidden.numpy(), np.asarray(jd_h), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_weight.numpy(), np.asarray(jd_p["weight"]), rtol=1e-5, atol=1e-6)


def test_sparsemax_is_a_projection_onto_the_simplex():
    z = jnp.asarray(np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)) * 3
    p = np.asarray(sparsemax(z))
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
    assert (p >= 0).all() and (p == 0).any()
    # the projection: p minimises |p - z|^2 over the simplex; the KKT form: p = max(z - tau, 0)
    tau = (np.asarray(z) - p)[p > 0]
    rows = np.nonzero(p > 0)[0]
    for r in np.unique(rows):
        assert np.ptp(tau[rows == r]) < 1e-5


# ---- zero-weight slots are exact in the downstream stages ---------------------------------------------
@examples(ci=5)
@given(T=st.integers(1, 10), E=st.integers(1, 6), data=st.data(), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["torch", "eager"]))
def test_zero_weight_slots_change_nothing(T, E, data, seed, backend):
    """A layer given extra (token, expert) slots of weight 0 returns the same output and gradients of
    hidden, weights and expert tensors, to rounding: combine adds 0 * y, exactly nothing, but an
    expert's GEMM over more rows may round its rows differently (the blocking depends on the count)."""
    k = data.draw(st.integers(1, E))
    pad = data.draw(st.integers(1, 3))
    H, I = 6, 5
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * 0.3).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) * 0.3).requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g).requires_grad_()
    pad_ids = torch.randint(0, E, (T, pad), generator=g)
    spec = moe_lab.ExpertsSpec(E)
    experts = torch.nn.Module()
    experts.__dict__.update(gate_up_proj=gate_up, down_proj=down, act_fn=torch.nn.SiLU())
    choice = resolve_backend(backend)
    out = run_routed_experts(hidden, ids, weights, experts, spec, choice, LocalDispatcher())
    padded_w = torch.cat([weights, torch.zeros(T, pad)], 1)
    padded = run_routed_experts(hidden, torch.cat([ids, pad_ids], 1), padded_w, experts, spec, choice, LocalDispatcher())
    torch.testing.assert_close(out, padded, rtol=1e-6, atol=1e-6)
    ct = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, [hidden, weights, gate_up, down], ct),
                    torch.autograd.grad(padded, [hidden, weights, gate_up, down], ct)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- in a model: registration, plan, training, checkpoint ---------------------------------------------
def _qwen3(E=4, k=2):
    return tiny_config("qwen3_moe", num_experts=E, top_k=k, layers=2)


def test_model_with_family_routing_in_jax_equals_torch_backend():
    config = _qwen3()
    routing = moe_lab.FAMILIES["qwen3_moe"].routing(config)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config)
    model = moe_lab.patch_model(copy.deepcopy(ref), moe_backend={"router": moe_lab.jax.router(family_routing_in_jax(routing))})
    moe_lab.patch_model(ref, moe_backend="torch")
    ids = torch.randint(0, config.vocab_size, (2, 9))
    out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward(), out_ref.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_plan_capabilities_training_and_checkpoint():
    impl = moe_lab.jax.router(expert_choice(2))
    assert impl.stage == "router" and impl.name.startswith("jax:expert_choice")
    caps = impl.caps
    assert "cpu" in caps.devices and not caps.exact and not caps.graph_safe and not caps.expert_parallel
    assert torch.bfloat16 in caps.dtypes["cpu"] and torch.float64 not in caps.dtypes["cpu"]
    assert moe_lab.jax.router(impl.fn.fn) is impl  # the same function: the same registration
    torch.manual_seed(0)
    model = moe_lab.AutoModelForCausalLM.from_config(_qwen3(), moe_backend={"router": impl})
    plan = dict(model.moe_lab_plan)
    assert len(plan) == 2 and all(p["router"] == impl.name for p in plan.values())
    assert not resolve_backend({"router": impl}).graph_safe
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = model.model.layers[0].mlp.gate
    before = gate.weight.detach().clone()
    ids = torch.randint(0, 61, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, gate.weight)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        vanilla = transformers.AutoModelForCausalLM.from_pretrained(d)
        assert set(vanilla.state_dict()) == set(model.state_dict())
        assert torch.equal(vanilla.model.layers[0].mlp.gate.weight, gate.weight)
    # a float64 layer is refused in the user's terms (the declared dtypes)
    needs = LayerNeeds("qwen3_moe", frozenset({"softmax"}), "glu:silu", "cpu", torch.float64)
    with pytest.raises(StageRefusedError, match="router 'jax:expert_choice.*float64"):
        plan_layer(resolve_backend({"router": impl}), needs, substitute=False)


def test_copy_and_pickle_keep_the_router():
    import pickle

    impl = moe_lab.jax.router(sparsemax_topk(2))
    assert copy.deepcopy(impl.fn) is impl.fn
    torch.manual_seed(0)
    model = moe_lab.AutoModelForCausalLM.from_config(_qwen3(), moe_backend={"router": impl})
    ids = torch.randint(0, 61, (1, 5))
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    try:
        pickle.dumps(impl.fn)
    except (pickle.PicklingError, AttributeError):  # a closure: not picklable, like any local function
        pass


# ---- errors in the user's terms -----------------------------------------------------------------------
@pytest.mark.parametrize("fn, match", [
    (lambda p, h: h @ p["weight"].T, "must return \\(weights \\[T, k\\], ids \\[T, k\\]\\)"),
    (lambda p, h: (jnp.ones((h.shape[0] + 1, 2)), jnp.zeros((h.shape[0] + 1, 2), jnp.int32)), "weights must be \\[T, k\\] = \\[5, k >= 1\\]"),
    (lambda p, h: (jnp.ones((h.shape[0], 2)), jnp.zeros((h.shape[0], 3), jnp.int32)), "ids must have the weights' shape"),
    (lambda p, h: (jnp.ones((h.shape[0], 2)), jnp.zeros((h.shape[0], 2))), "ids must be integers"),
    (lambda p, h: (jnp.ones((h.shape[0], 2), jnp.int32), jnp.zeros((h.shape[0], 2), jnp.int32)), "weights must be floating"),
    (lambda p, h: (jnp.ones((h.shape[0], 2)), jnp.zeros((h.shape[0], 2), jnp.int32), jnp.ones((h.shape[0], 3))), "logits .* must be \\[T, E\\] = \\[5, 4\\]"),
    (lambda p, h: (jnp.ones((h.shape[0], 2)), jnp.full((h.shape[0], 2), 4, jnp.int32)), "expert ids outside \\[0, 4\\).*from 4 to 4"),
    (lambda p, h: (jnp.ones((h.shape[0], 2)), -jnp.ones((h.shape[0], 2), jnp.int32)), "expert ids outside \\[0, 4\\).*from -1 to -1"),
    (lambda p, h: (p["nonexistent"], p["weight"]), "the JAX function fails on params \\{'weight': \\(4, 3\\)"),
])
def test_wrong_outputs_are_refused_in_the_users_terms(fn, match):
    impl = moe_lab.jax.router(fn, name="jax:bad")
    hidden, weight, _ = _tensors(5, 3, 4, 0)
    with pytest.raises(JaxRouterError if "outside" not in match else ValueError, match=f"moe_lab.jax.router\\(jax:bad[#0-9]*\\) on a layer of 4 experts.*{match}"):
        impl.fn(hidden, weight, None, None, RoutingSpec(4, 2))


def test_a_router_that_is_not_registered_for_the_stage_is_refused():
    impl = moe_lab.jax.router(expert_choice(1))
    with pytest.raises(ValueError, match="not registered for the experts stage"):
        resolve_backend({"experts": impl})
    with pytest.raises(TypeError, match="takes a JAX function"):
        moe_lab.jax.router("softmax")
