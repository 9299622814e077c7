"""Capabilities in the registry: a stage that cannot compute a layer is refused with the reason, or,
only where the user allowed it, substituted by the reference and recorded in model.moe_lab_plan."""
import logging

import pytest
import torch

import moe_lab
from moe_lab.registry import (
    Capabilities, LayerNeeds, StageRefusedError, _IMPLS, plan_layer, register_stage, resolve_backend,
)
from moe_lab.stages.router import route_reference
from tiny_models import tiny_config, v5_and_moe_lab


def _needs(**kw):
    base = dict(model_type="qwen3_moe", routing_features=frozenset({"softmax", "renormalize"}), activation="glu:silu",
                device_type="cpu", dtype=torch.float32)
    return LayerNeeds(**{**base, **kw})


def test_grouped_mm_refuses_float32_weights_on_cuda_and_substitutes_only_when_allowed():
    choice = resolve_backend("torch")
    planned, same = plan_layer(choice, _needs(), substitute=False)
    assert same is choice and str(planned["experts"]) == "torch"
    with pytest.raises(StageRefusedError, match=r"experts 'torch' takes bfloat16, float16 weights on cuda, not float32"):
        plan_layer(choice, _needs(device_type="cuda"), substitute=False)
    planned, substituted = plan_layer(choice, _needs(device_type="cuda"), substitute=True)
    assert substituted.names["experts"] == "eager" and substituted.names["router"] == "torch"
    assert str(planned["experts"]).startswith("eager (asked torch: takes bfloat16")


def test_a_router_without_the_familys_routing_features_is_refused():
    register_stage("router", "test_softmax_only", route_reference,
                   caps=Capabilities(routing=frozenset({"softmax", "renormalize", "topk_before_softmax"})))
    try:
        choice = resolve_backend({"router": "test_softmax_only"})
        deepseek = _needs(model_type="deepseek_v3",
                          routing_features=frozenset({"sigmoid", "group_limited", "correction_bias", "scaling"}))
        with pytest.raises(StageRefusedError, match="deepseek_v3's routing .*correction_bias, group_limited, scaling, sigmoid"):
            plan_layer(choice, deepseek, substitute=False)
        plan_layer(choice, _needs(), substitute=False)  # a softmax family is computed
    finally:
        del _IMPLS["router"]["test_softmax_only"]


def test_triton_experts_refuse_an_activation_they_do_not_fuse_and_substitute_when_allowed(caplog):
    """No silent grouped_mm: a GELU-gated layer asked of the triton experts is refused at construction;
    with substitute=True the eager experts run it, the plan says so, a warning is logged, and the
    output equals vanilla v5's."""
    config = tiny_config("qwen3_moe", hidden_act="gelu")
    with pytest.raises(StageRefusedError, match=r"experts 'triton' computes activations .* not 'glu:gelu'"):
        moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="triton")
    with caplog.at_level(logging.WARNING, logger="moe_lab.hf"):
        v5, ours = v5_and_moe_lab(config, moe_backend="triton", substitute=True)
    assert "experts: eager (asked triton" in caplog.text
    for stages in ours.moe_lab_plan.values():
        assert stages["router"] == "triton" and stages["experts"].startswith("eager (asked triton: computes activations")
    ids = torch.randint(0, config.vocab_size, (2, 5))
    torch.testing.assert_close(ours(ids).logits, v5(ids).logits, rtol=1e-5, atol=1e-5)


def test_triton_experts_fuse_non_gated_relu2_and_refuse_other_non_gated_activations():
    """Nemotron-H's experts (non-gated, relu2: "plain:relu2") are planned onto the fused kernels, and
    auto keeps them as candidates; another non-gated activation is still refused with the reason."""
    from moe_lab.auto import candidates_for

    nemotron = _needs(model_type="nemotron_h", activation="plain:relu2", device_type="cuda", dtype=torch.bfloat16)
    for word in ("triton", "triton_gather"):
        choice = resolve_backend(word)
        planned, same = plan_layer(choice, nemotron, substitute=False)
        assert same is choice and str(planned["experts"]) == word
        with pytest.raises(StageRefusedError, match=rf"experts '{word}' computes activations .* not 'plain:silu'"):
            plan_layer(choice, _needs(activation="plain:silu"), substitute=False)
    assert "plain:relu2" in _IMPLS["experts"]["triton"].caps.activations
    labels = [c.label for c in candidates_for(nemotron, None, graph_safe_only=False).candidates]
    assert {"triton", "triton_gather"} <= set(labels), labels


def test_a_model_moved_to_another_dtype_is_planned_again_at_its_next_forward():
    config = tiny_config("qwen3_moe")
    model = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch")
    layer = next(m for m in model.modules() if isinstance(m, moe_lab.MoELayer))
    assert layer.plan["experts"] == "torch"
    model.to(torch.bfloat16)
    model(torch.randint(0, config.vocab_size, (1, 4)))
    assert layer.plan["experts"] == "torch" and len(layer.planner._plans) == 2


def test_capabilities_are_declared_for_every_registered_implementation():
    for stage, impls in _IMPLS.items():
        for name, impl in impls.items():
            assert isinstance(impl.caps, Capabilities), (stage, name)
    assert _IMPLS["experts"]["triton_gather"].caps.fuses_with == "triton"
    assert _IMPLS["dispatch"]["deepep"].caps.token_level
    assert {n for n, i in _IMPLS["experts"].items() if i.caps.graph_safe} == {"triton", "triton_gather"}


def test_device_checks_wait_until_the_layer_is_placed():
    """A model built on the CPU or the meta device and moved later: the Triton stages (CUDA only
    outside the interpreter) are not refused before the layer runs anywhere."""
    from moe_lab.registry import StageChoice

    cuda_only = Capabilities(devices=frozenset({"cuda"}))
    register_stage("experts", "test_cuda_only", _IMPLS["experts"]["eager"].fn, caps=cuda_only)
    try:
        choice = resolve_backend({"experts": "test_cuda_only"})
        plan_layer(choice, _needs(device_type=None), substitute=False)  # not placed yet: nothing to refuse
        with pytest.raises(StageRefusedError, match="runs on cuda, not cpu"):
            plan_layer(choice, _needs(device_type="cpu"), substitute=False)
    finally:
        del _IMPLS["experts"]["test_cuda_only"]
    # under expert parallelism the dispatch reference is all2all, never local
    ep_choice = StageChoice({**choice.names, "dispatch": "deepep"},
                            {**choice.impls, "dispatch": _IMPLS["dispatch"]["deepep"]})
    planned, substituted = plan_layer(ep_choice, _needs(device_type="cuda", expert_parallel=True), substitute=True)
    assert substituted.names["dispatch"] == "all2all", planned["dispatch"]


def test_a_substitution_after_a_move_is_logged_and_the_model_plan_follows(caplog):
    import transformers

    config = tiny_config("qwen3_moe")
    model = moe_lab.patch_model(transformers.AutoModelForCausalLM.from_config(config))  # no backend named
    assert {stages["experts"] for stages in model.moe_lab_plan.values()} == {"torch"}
    model.double()  # grouped_mm has no float64 kernel: the eager experts run, said aloud
    with caplog.at_level(logging.WARNING, logger="moe_lab.layer"):
        model(torch.randint(0, config.vocab_size, (1, 4)))
    assert "eager (asked torch: takes" in caplog.text
    assert all(stages["experts"].startswith("eager (asked torch") for stages in model.moe_lab_plan.values())


def test_a_refused_model_is_left_unchanged():
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", hidden_act="gelu"))
    norm_forward = model.model.norm.forward
    with pytest.raises(StageRefusedError):
        moe_lab.patch_model(model, "triton", fused_norm=True)
    assert model.model.norm.forward == norm_forward
    assert not any(isinstance(m, moe_lab.MoELayer) for m in model.modules())
