"""moe_lab's PyTorch layer called from JAX (moe_lab.jax.layer.moe_layer) equals the JAX reference in
value and gradient (hidden, router weight/bias, every expert tensor), through both transports, eagerly
and under jax.jit; CPU, hypothesis over shapes and routing/expert variants."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import moe_lab  # noqa: E402
from hypothesis_profiles import examples  # noqa: E402
from moe_lab.jax import reference as jr  # noqa: E402
from moe_lab.jax.layer import moe_layer  # noqa: E402

VARIANTS = {
    "qwen3": (dict(renormalize=True), dict()),
    "mixtral": (dict(renormalize=True, weights_in_logits_dtype=False), dict()),
    "gpt_oss": (dict(topk_before_softmax=True), dict(transposed=True, interleaved=True, has_bias=True, activation="gpt_oss")),
    "deepseek": (dict(score="sigmoid", renormalize=True, renormalize_eps=1e-20, has_correction_bias=True, scaling=2.5,
                      logits_fp32=True, weights_in_logits_dtype=False), dict()),
    "relu2": (dict(score="sigmoid"), dict(gated=False, activation="plain", act_name="relu")),
}


def _inputs(variant, T, H, I, E, k, seed, groups=1):
    r_kw, e_kw = VARIANTS[variant]
    if variant == "deepseek":
        r_kw = dict(r_kw, n_group=groups, topk_group=1)
    routing = moe_lab.RoutingSpec(E, k, **r_kw)
    spec = moe_lab.ExpertsSpec(E, **e_kw)
    keys = jax.random.split(jax.random.key(seed), 8)
    hidden = jax.random.normal(keys[0], (T, H))
    router = {"weight": jax.random.normal(keys[1], (E, H)) * 0.5}
    if variant == "gpt_oss":
        router["bias"] = jax.random.normal(keys[2], (E,)) * 0.1
    if variant == "deepseek":
        router["e_score_correction_bias"] = jax.random.normal(keys[2], (E,)) * 0.1
    first = "gate_up_proj" if spec.gated else "up_proj"
    width = 2 * I if spec.gated else I
    shape1, shape2 = ((E, H, width), (E, I, H)) if spec.transposed else ((E, width, H), (E, H, I))
    params = {first: jax.random.normal(keys[3], shape1) * 0.3, "down_proj": jax.random.normal(keys[4], shape2) * 0.3}
    if spec.has_bias:
        params[f"{first}_bias"] = jax.random.normal(keys[5], (E, width)) * 0.1
        params["down_proj_bias"] = jax.random.normal(keys[6], (E, H)) * 0.1
    return hidden, router, params, routing, spec, keys[7]


def _loss(layer, cts):
    """A scalar of every differentiable output: out, the routing weights and the logits."""
    def loss(hidden, router, params):
        out, r = layer(hidden, router, params)
        return (out * cts[0]).sum() + (r.weights * cts[1]).sum() + (r.logits * cts[2]).sum()
    return loss


def _close(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * max(1.0, float(np.abs(b).max(initial=0))))


@examples(ci=4)
@given(variant=st.sampled_from(sorted(VARIANTS)), T=st.integers(0, 9), H=st.integers(1, 7), I=st.integers(1, 5),
       E=st.integers(1, 6), data=st.data(), seed=st.integers(0, 2**16), transport=st.sampled_from(["buffer", "host"]))
def test_torch_layer_from_jax_equals_reference(variant, T, H, I, E, data, seed, transport):
    k = data.draw(st.integers(1, E))
    groups = data.draw(st.sampled_from([g for g in (1, 2) if E % g == 0])) if variant == "deepseek" else 1
    hidden, router, params, routing, spec, key = _inputs(variant, T, H, I, E, k, seed, groups)
    out, r = moe_layer(hidden, router, params, routing, spec, transport=transport)
    ref, rr = jax.jit(lambda h, rt, p: jr.moe_layer(h, rt, p, routing, spec))(hidden, router, params)  # jit: fast
    np.testing.assert_array_equal(np.asarray(r.ids), np.asarray(rr.ids))
    assert out.dtype == ref.dtype and r.weights.dtype == rr.weights.dtype and r.ids.dtype == rr.ids.dtype
    _close(out, ref), _close(r.weights, rr.weights), _close(r.logits, rr.logits)
    ks = jax.random.split(key, 3)
    cts = (jax.random.normal(ks[0], out.shape), jax.random.normal(ks[1], r.weights.shape), jax.random.normal(ks[2], r.logits.shape))
    got = jax.grad(_loss(lambda h, rt, p: moe_layer(h, rt, p, routing, spec, transport=transport), cts), argnums=(0, 1, 2))(
        hidden, router, params)
    want = jax.jit(jax.grad(_loss(lambda h, rt, p: jr.moe_layer(h, rt, p, routing, spec), cts), argnums=(0, 1, 2)))(
        hidden, router, params)
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        if "e_score_correction_bias" in jax.tree_util.keystr(path):
            assert not np.asarray(a).any()  # selection only: no gradient (the reference: none either)
            continue
        _close(a, b)


def test_under_jit_and_batched_leading_dims():
    hidden, router, params, routing, spec, key = _inputs("qwen3", 12, 6, 4, 5, 2, 1)
    hidden = hidden.reshape(3, 4, 6)
    cts = (jax.random.normal(key, hidden.shape), jnp.zeros((12, 2)), jnp.zeros((12, 5)))
    f = jax.jit(jax.value_and_grad(_loss(lambda h, rt, p: moe_layer(h, rt, p, routing, spec), cts), argnums=(0, 1, 2)))
    g = jax.jit(jax.value_and_grad(_loss(lambda h, rt, p: jr.moe_layer(h, rt, p, routing, spec), cts), argnums=(0, 1, 2)))
    (v1, g1), (v2, g2) = f(hidden, router, params), g(hidden, router, params)
    _close(v1, v2)
    jax.tree.map(_close, g1, g2)
    (v3, _) = f(hidden * 2, router, params)  # the compiled program runs the torch stages again on new values
    _close(v3, g(hidden * 2, router, params)[0])


def test_bfloat16_follows_the_reference():
    hidden, router, params, routing, spec, _ = _inputs("qwen3", 8, 8, 4, 4, 2, 2)
    cast = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)  # noqa: E731
    out, r = moe_layer(cast(hidden), cast(router), cast(params), routing, spec)
    ref, rr = jax.jit(lambda h, rt, p: jr.moe_layer(h, rt, p, routing, spec))(cast(hidden), cast(router), cast(params))
    assert out.dtype == jnp.bfloat16 and r.weights.dtype == rr.weights.dtype
    np.testing.assert_array_equal(np.asarray(r.ids), np.asarray(rr.ids))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_bad_backend_and_transport_are_refused():
    hidden, router, params, routing, spec, _ = _inputs("qwen3", 4, 4, 3, 4, 2, 0)
    with pytest.raises(ValueError, match="unknown moe_backend 'nope'"):
        moe_layer(hidden, router, params, routing, spec, backend="nope")
    with pytest.raises(ValueError, match="name a backend"):
        moe_layer(hidden, router, params, routing, spec, backend="auto")
    with pytest.raises(ValueError, match="transport must be one of"):
        moe_layer(hidden, router, params, routing, spec, transport="mail")
