"""The JAX reference against every torch backend of moe_lab (forward and gradients), and the DLPack bridge.

Expert ids are chosen once by the torch router and fed to both sides; the router alone is compared in
float32 on random weights, and on logits with ties, NaN and inf: both references break ties the same
way (select_experts' rule), so their ids agree in order.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import moe_lab  # noqa: E402
from moe_lab.jax import reference as jr  # noqa: E402
from moe_lab.jax.dlpack import jax_to_torch, shares_memory, torch_to_jax, x64_enabled  # noqa: E402
from moe_lab.families import FAMILIES as FAMILY_SPECS, experts_spec_of  # noqa: E402
from moe_lab.layer import run_routed_experts  # noqa: E402
from moe_lab.stages.router import RoutingSpec, route_reference  # noqa: E402
from tiny_models import FAMILIES, tiny_config  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5)


def _close(got, ref, err_msg=""):
    """float32 agreement, the absolute tolerance scaled by the reference's magnitude (sums over tokens)."""
    got, ref = np.asarray(got, np.float32), _np(ref)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5 * max(1.0, float(np.abs(ref).max(initial=0))), err_msg=err_msg)


def _np(x):
    return np.asarray(x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)


def _block(family: str, seed: int = 0, **overrides):
    """(v5 MoE block of a tiny model, its RoutingSpec, its ExpertsSpec, router module) with random router weights."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    block = model.model.layers[-1].mlp
    family_spec = FAMILY_SPECS[config.model_type]
    router = getattr(block, family_spec.router_attr)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        if getattr(router, "bias", None) is not None:
            router.bias.normal_(0, 0.1)
        if getattr(router, "e_score_correction_bias", None) is not None:
            router.e_score_correction_bias.normal_(0, 0.1)
    return block, family_spec.routing(config), experts_spec_of(block.experts, config.model_type), router


def _router_tensors(router):
    return {n: t for n in ("weight", "bias", "e_score_correction_bias") if (t := getattr(router, n, None)) is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_router_matches_torch_fp32(family):
    _, routing, _, router = _block(family, seed=1)
    hidden = torch.randn(13, 32, generator=torch.Generator().manual_seed(0))
    ref = route_reference(hidden, router.weight, getattr(router, "bias", None), getattr(router, "e_score_correction_bias", None), routing)
    params = jr.params_from_torch(router)
    got = jr.route(torch_to_jax(hidden), params, routing)
    np.testing.assert_allclose(np.asarray(got.logits), _np(ref.logits), **TOL)
    np.testing.assert_array_equal(np.asarray(got.ids), ref.ids.numpy())
    np.testing.assert_allclose(np.asarray(got.weights, np.float32), _np(ref.weights), **TOL)
    # the weights of given ids are the same function
    np.testing.assert_allclose(np.asarray(jr.weights_for_ids(got.logits, got.ids, routing)), np.asarray(got.weights), **TOL)


@pytest.mark.parametrize("logits_kind", ["random", "ties_and_nonfinite"])
@pytest.mark.parametrize("kind", ["softmax", "softmax_renorm", "gpt_oss", "sigmoid_groups"])
def test_routing_variants_match_torch(kind, logits_kind):
    """Routing variants on raw logits, including group-limited choice with several kept groups; with
    "ties_and_nonfinite", logits of few distinct values (and -0.0) with NaN, +inf and -inf: the same
    ids in the same order (ties to the lower expert, NaN first, all-NaN softmax rows experts 0..k-1)."""
    specs = {
        "softmax": RoutingSpec(8, 3),
        "softmax_renorm": RoutingSpec(8, 3, renormalize=True, renormalize_eps=1e-6, scaling=1.5, weights_in_logits_dtype=False),
        "gpt_oss": RoutingSpec(8, 3, topk_before_softmax=True),
        "sigmoid_groups": RoutingSpec(16, 4, score="sigmoid", renormalize=True, renormalize_eps=1e-20, n_group=4,
                                      topk_group=2, has_correction_bias=True, scaling=2.5, logits_fp32=True,
                                      weights_in_logits_dtype=False),
    }
    spec = specs[kind]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, spec.num_experts, generator=g)
    bias = torch.randn(spec.num_experts, generator=g) * 0.2 if spec.has_correction_bias else None
    if logits_kind == "ties_and_nonfinite":
        logits = (logits * 2).round()
        bias = None if bias is None else (bias * 10).round() / 2
        u = torch.rand(logits.shape, generator=g)
        for lo, hi, value in ((0.0, 0.03, float("nan")), (0.03, 0.05, float("inf")), (0.05, 0.07, -float("inf")),
                              (0.07, 0.15, -0.0)):
            logits[(u >= lo) & (u < hi)] = value
    from moe_lab.stages.router import select_experts

    w_ref, i_ref = select_experts(logits, spec, bias)
    w_got, i_got = jr.select_experts(torch_to_jax(logits), spec, None if bias is None else torch_to_jax(bias))
    np.testing.assert_array_equal(np.asarray(i_got), i_ref.numpy())
    np.testing.assert_allclose(np.asarray(w_got, np.float32), _np(w_ref), **TOL)


def _backends():
    names = moe_lab.available_backends()
    assert {"eager", "torch"} <= set(names)
    return names


def _layer_case(family: str) -> dict:
    """A deterministic layer case: block, specs, hidden [T, H] (requires grad), torch-routed ids, cotangent."""
    block, routing, spec, router = _block(family, seed=2)
    g = torch.Generator().manual_seed(5)
    scale = 8.0 if family == "gpt_oss" else 1.0  # reach GPT-OSS's clamp (limit 7) on some rows
    hidden = (torch.randn(11, 32, generator=g) * scale).requires_grad_()
    with torch.no_grad():
        for p in block.experts.parameters():
            p.mul_(scale)
    rt = _router_tensors(router)
    logits, weights, ids = route_reference(hidden, rt["weight"], rt.get("bias"), rt.get("e_score_correction_bias"), routing)
    return dict(block=block, routing=routing, spec=spec, router=router, rt=rt, hidden=hidden, weights=weights, ids=ids,
                cotangent=torch.randn(11, 32, generator=g),
                expert_names=[n for n, _ in block.experts.named_parameters()],
                router_names=[n for n, t in rt.items() if t.requires_grad])


@functools.lru_cache(maxsize=None)
def _jax_layer(family: str):
    """The JAX reference's output and gradients of `_layer_case(family)` (computed once per family)."""
    case = _layer_case(family)
    routing, spec = case["routing"], case["spec"]
    e_params = jr.params_from_torch(case["block"].experts, case["expert_names"])
    r_params = jr.params_from_torch(case["router"])
    ids = torch_to_jax(case["ids"], x64="narrow")
    cotangent = torch_to_jax(case["cotangent"])

    def loss(h, ep, rp):
        y, _ = jr.moe_layer(h, {**r_params, **rp}, ep, routing, spec, ids=ids)
        return (y * cotangent).sum(), y

    hidden = torch_to_jax(case["hidden"].detach().clone())
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        hidden, e_params, {n: r_params[n] for n in case["router_names"]})
    if family == "gpt_oss":  # the clamp is exercised
        perm = jr.permute(ids, spec.num_experts)
        h = jax.lax.ragged_dot(hidden[perm.token_of_row], e_params["gate_up_proj"], perm.counts)
        assert float(jnp.abs(h).max()) > 2 * spec.limit
    return y, grads


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_forward_and_gradients_match_jax(family, backend):
    """run_routed_experts of every backend == the JAX reference, forward and all gradients (fp32, same ids)."""
    try:
        choice = moe_lab.resolve_backend(backend)
    except RuntimeError as exc:  # a registered backend this machine cannot run
        pytest.skip(str(exc))
    case = _layer_case(family)
    block, rt = case["block"], case["rt"]
    out = run_routed_experts(case["hidden"], case["ids"], case["weights"], block.experts, case["spec"], choice, choice.dispatch())
    inputs = [case["hidden"]] + [getattr(block.experts, n) for n in case["expert_names"]] + [rt[n] for n in case["router_names"]]
    torch_grads = torch.autograd.grad(out, inputs, case["cotangent"], allow_unused=True)
    torch_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(torch_grads, inputs)]

    y, (g_hidden, g_experts, g_router) = _jax_layer(family)
    where = f"{family}/{backend}"
    _close(y, out, f"{where}: forward")
    _close(g_hidden, torch_grads[0], f"{where}: d hidden")
    for i, name in enumerate(case["expert_names"]):
        _close(g_experts[name], torch_grads[1 + i], f"{where}: d {name}")
    for i, name in enumerate(case["router_names"]):
        _close(g_router[name], torch_grads[1 + len(case["expert_names"]) + i], f"{where}: d router {name}")


def test_ragged_dot_experts_match_loop_and_jit():
    """Empty experts, jit, and the GPT-OSS layout (transposed, interleaved, biases) against the plain loop."""
    block, routing, spec, router = _block("gpt_oss", seed=4)
    params = jr.params_from_torch(block.experts)
    ids = jnp.array([[0, 1], [1, 2], [0, 2], [1, 0], [2, 1]], dtype=jnp.int32)  # experts 3.. get no rows
    hidden = jax.random.normal(jax.random.PRNGKey(0), (5, 32))
    perm = jr.permute(ids, spec.num_experts)
    rows = hidden[perm.token_of_row]
    fast = jax.jit(lambda x, c: jr.experts(x, c, params, spec))(rows, perm.counts)
    counts = [int(c) for c in perm.counts]
    loop = jax.jit(lambda x: jr.experts_loop(x, counts, params, spec))(rows)  # one compile, not one per op
    np.testing.assert_allclose(np.asarray(fast), np.asarray(loop), **TOL)
    assert [int(c) for c in perm.counts] == [3, 4, 3] + [0] * (spec.num_experts - 3)


# ---- the DLPack bridge ----------------------------------------------------------------------------
def test_dlpack_zero_copy_both_ways_and_dtypes():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = torch_to_jax(t)
    assert shares_memory(t, a) and a.shape == (3, 4)
    back = jax_to_torch(a)
    assert back.data_ptr() == t.data_ptr()
    for dtype in (torch.bfloat16, torch.float16, torch.int32, torch.bool, torch.uint8):
        x = (torch.arange(6) % 2).to(dtype)
        y = torch_to_jax(x)
        assert str(y.dtype) == str(dtype).replace("torch.", "") and shares_memory(x, y)
        assert torch.equal(jax_to_torch(y), x)
    copied = torch_to_jax(torch.ones(4, dtype=torch.bfloat16), copy=True)
    assert str(copied.dtype) == "bfloat16" and float(copied.sum()) == 4.0


def test_dlpack_int64_needs_x64_or_explicit_narrowing():
    ids = torch.tensor([[0, 5], [3, 1]])
    assert not x64_enabled()
    with pytest.raises(TypeError, match="jax_enable_x64"):
        torch_to_jax(ids)
    narrow = torch_to_jax(ids, x64="narrow")
    assert str(narrow.dtype) == "int32" and np.array_equal(np.asarray(narrow), ids.numpy())
    with pytest.raises(OverflowError):
        torch_to_jax(torch.tensor([2**40]), x64="narrow")
    with jax.enable_x64(True):
        wide = torch_to_jax(ids)
        assert str(wide.dtype) == "int64" and shares_memory(ids, wide)


def test_dlpack_strided_requires_grad_and_aliasing():
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    strided = base[:, ::2]
    np.testing.assert_array_equal(np.asarray(torch_to_jax(strided)), strided.numpy())
    leaf = torch.ones(3, requires_grad=True)
    assert float(torch_to_jax(leaf).sum()) == 3.0
    shared = torch.zeros(16)
    view = torch_to_jax(shared)
    shared.add_(1)  # the documented caveat: JAX sees in-place torch writes to a shared buffer
    assert float(view.sum()) == 16.0
    independent = torch_to_jax(shared, copy=True)
    shared.add_(1)
    assert float(independent.sum()) == 16.0
