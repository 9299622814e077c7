"""Whole-model parity: vanilla Transformers v5 (eager experts) against moe_lab, every family and backend.

Logits and every parameter's gradient must agree in float32 to a tight tolerance. NemotronH (the
Nemotron 3 Nano family: Mamba-2, attention and MoE blocks, relu2 experts) is tested with random
correction biases, group-limited choice, norm_topk_prob both ways and its latent projection.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

import moe_lab
from moe_lab.registry import StageRefusedError, capabilities
from tiny_models import FAMILIES, GENERIC, NEMOTRON_H, family_config, randomize_correction_bias, tiny_config

# "triton" runs under Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1).
BACKENDS = ["eager", "torch", "triton", "triton_gather"]
TOL = dict(rtol=1e-4, atol=1e-5)
MODEL_FAMILIES = FAMILIES + [NEMOTRON_H]  # the families moe_lab runs as MoELayers
# the Triton router (with the Triton permutation and combine) around the torch experts
TRITON_ROUTER = {"router": "triton"}
TRITON_AROUND_TORCH_EXPERTS = {"router": "triton", "permutation": "triton", "combine": "triton"}


def refused_activation(family: str, backend) -> str | None:
    """The expert activation `backend`'s experts stage does not compute for `family` (then moe_lab
    refuses the model with that named), or None. NemotronH's experts are relu2 MLPs ("plain:relu2")."""
    if family != NEMOTRON_H or not isinstance(backend, str) or backend in ("eager", "torch"):
        return None
    activations = capabilities("experts", backend).activations
    return None if activations is None or "plain:relu2" in activations else "plain:relu2"


def build_pair(family: str, backend, seed: int = 0, correction_bias: bool = False, **config_overrides):
    """A vanilla v5 model (eager experts) and a moe_lab model with identical weights; with
    `correction_bias`, the routers' e_score_correction_bias buffers are random (v5 starts them at 0)."""
    config = family_config(family, **config_overrides)
    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    if correction_bias:
        randomize_correction_bias(reference, seed)
    ours = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=backend)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return out, grads


def assert_same_training_step(reference, ours, input_ids):
    ref_out, ref_grads = loss_and_grads(reference, input_ids)
    our_out, our_grads = loss_and_grads(ours, input_ids)
    torch.testing.assert_close(our_out.logits, ref_out.logits, **TOL)
    torch.testing.assert_close(our_out.loss, ref_out.loss, **TOL)
    assert our_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", MODEL_FAMILIES + GENERIC)
def test_logits_and_gradients_match_v5(family, backend):
    if refused_activation(family, backend):
        with pytest.raises(StageRefusedError, match=refused_activation(family, backend)):
            build_pair(family, backend)
        return
    reference, ours = build_pair(family, backend, seed=1, correction_bias=family == NEMOTRON_H)
    input_ids = torch.randint(0, reference.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    assert_same_training_step(reference, ours, input_ids)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_known_families_get_moe_layers(family):
    _, ours = build_pair(family, "torch")
    layers = [m for m in ours.modules() if isinstance(m, moe_lab.MoELayer)]
    assert len(layers) == 2
    assert isinstance(ours, transformers.PreTrainedModel)
    assert type(ours).__name__ == type(transformers.AutoModelForCausalLM.from_config(family_config(family))).__name__


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    backend=st.sampled_from(BACKENDS),
    num_experts=st.sampled_from([3, 4, 6, 8]),
    top_k=st.integers(1, 4),
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),  # labels need two positions for a defined loss
    seed=st.integers(0, 2**16),
)
def test_parity_over_shapes(family, backend, num_experts, top_k, batch, seq, seed):
    top_k = min(top_k, num_experts)
    overrides = {}
    if family == "deepseek_v3":
        overrides = dict(n_group=1, topk_group=1)
    reference, ours = build_pair(family, backend, seed=seed, num_experts=num_experts, top_k=top_k, **overrides)
    input_ids = torch.randint(0, reference.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    assert_same_training_step(reference, ours, input_ids)


def _skewed_block_pair(family, backend, num_experts, top_k, winner):
    """One v5 MoE block and its moe_lab layer, with a router that sends every token to `winner`
    (the other experts share the remaining choices, some get none)."""
    grouped = {"n_group": 1, "topk_group": 1} if family in ("deepseek_v3", NEMOTRON_H) else {}
    config = family_config(family, num_experts=num_experts, top_k=top_k, **grouped)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    last = model.model.layers[-1]
    block = last.mixer if family == NEMOTRON_H else last.mlp
    router = block.router if family == "gpt_oss" else block.gate
    with torch.no_grad():
        router.weight.copy_(-router.weight.abs())
        router.weight[winner] = 5.0
        if family == "gpt_oss":
            router.bias.zero_()
    ours = copy.deepcopy(model)
    moe_lab.patch_model(ours, backend)
    last = ours.model.layers[-1]
    return block, last.mixer if family == NEMOTRON_H else last.mlp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", MODEL_FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_one_expert_takes_all_and_empty_experts(family, backend, top_k):
    num_experts = 6
    if refused_activation(family, backend):
        with pytest.raises(StageRefusedError, match=refused_activation(family, backend)):
            _skewed_block_pair(family, backend, num_experts, top_k, winner=4)
        return
    block, layer = _skewed_block_pair(family, backend, num_experts, top_k, winner=4)
    hidden = torch.rand(2, 7, 32) + 0.1  # positive: every token prefers expert 4
    hidden_ours = hidden.clone().requires_grad_()
    hidden.requires_grad_()
    ref_out, our_out = block(hidden), layer(hidden_ours)
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    our_out = our_out[0] if isinstance(our_out, tuple) else our_out
    _, _, ids = layer.router_module(hidden.detach().reshape(-1, 32))
    assert bool((ids == 4).any(dim=-1).all()), "every token must route to expert 4"
    assert torch.bincount(ids.flatten(), minlength=num_experts).eq(0).any(), "some expert must receive no token"
    torch.testing.assert_close(our_out, ref_out, **TOL)
    grad = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad(ref_out, [hidden, *block.parameters()], grad)
    our_grads = torch.autograd.grad(our_out, [hidden_ours, *layer.parameters()], grad, allow_unused=True)
    for r, o in zip(ref_grads, our_grads):
        torch.testing.assert_close(o if o is not None else torch.zeros_like(r), r, **TOL)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_router_logits_and_aux_loss_match_v5(family):
    reference, ours = build_pair(family, "torch", router_aux_loss_coef=0.01)
    input_ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = reference(input_ids, labels=input_ids, output_router_logits=True)
    got = ours(input_ids, labels=input_ids, output_router_logits=True)
    assert len(got.router_logits) == len(ref.router_logits) == 2
    for a, b in zip(got.router_logits, ref.router_logits):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(got.aux_loss, ref.aux_loss, **TOL)
    torch.testing.assert_close(got.loss, ref.loss, **TOL)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_generate_matches_v5(family):
    reference, ours = build_pair(family, "torch")
    prompt = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


@pytest.mark.parametrize("family", MODEL_FAMILIES + GENERIC)
def test_v5_experts_registry_switch(family):
    """A vanilla user writes experts_implementation="moe_lab" and gets the same model output."""
    config = family_config(family)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    for name in ("moe_lab", "moe_lab_eager"):
        vanilla = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=name)
        vanilla.load_state_dict(reference.state_dict())
        assert_same_training_step(reference, vanilla, torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1)))


# ---- NemotronH (Nemotron 3 Nano): its routing, relu2 experts, shared expert and latent projection ------
# and the Triton experts where they compute relu2 (test_logits_and_gradients_match_v5 checks the refusal otherwise)
NEMOTRON_BACKENDS = ["eager", "torch", TRITON_ROUTER, TRITON_AROUND_TORCH_EXPERTS] + [
    b for b in ("triton", "triton_gather") if not refused_activation(NEMOTRON_H, b)]
NEMOTRON_ROUTING = {  # config overrides: experts, top-k, groups, renormalisation, latent projection
    "groups_renormalised": dict(num_experts=6, top_k=2, n_group=2, topk_group=1, norm_topk_prob=True),
    "no_groups_not_renormalised": dict(num_experts=6, top_k=3, n_group=1, topk_group=1, norm_topk_prob=False),
    "three_groups_keep_two": dict(num_experts=6, top_k=3, n_group=3, topk_group=2, norm_topk_prob=False),
    "nano_like_top6": dict(num_experts=8, top_k=6, n_group=1, topk_group=1, norm_topk_prob=True),
    "latent_projection": dict(num_experts=6, top_k=2, n_group=2, topk_group=1, norm_topk_prob=True,
                              moe_latent_size=16, mlp_bias=True),
}


@pytest.mark.parametrize("backend", NEMOTRON_BACKENDS, ids=str)
@pytest.mark.parametrize("routing", sorted(NEMOTRON_ROUTING))
def test_nemotron_h_routing_matches_v5(routing, backend):
    """Random correction biases (selection only), group-limited choice, norm_topk_prob both ways,
    routed_scaling_factor 2.5, and fc1/fc2 latent projections around the routed experts: logits, loss
    and every gradient equal v5's."""
    reference, ours = build_pair(NEMOTRON_H, backend, seed=5, correction_bias=True, **NEMOTRON_ROUTING[routing])
    input_ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(6))
    assert_same_training_step(reference, ours, input_ids)


def test_nemotron_h_correction_bias_changes_the_choice():
    """The random correction bias of these tests changes which experts v5 chooses, so a router that
    ignored it (or weighted by the biased scores) would fail the parity tests above."""
    reference, ours = build_pair(NEMOTRON_H, "torch", correction_bias=True)
    hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    router = reference.model.layers[1].mixer.gate
    _, weights, ids = router(hidden)
    with torch.no_grad():
        bias = router.e_score_correction_bias.clone()
        router.e_score_correction_bias.zero_()
        _, _, unbiased_ids = router(hidden)
        router.e_score_correction_bias.copy_(bias)
    assert not torch.equal(ids.sort(-1).values, unbiased_ids.sort(-1).values)
    _, our_weights, our_ids = ours.model.layers[1].mixer.gate(hidden)
    assert torch.equal(our_ids.sort(-1).values, ids.sort(-1).values)
    assert our_weights.dtype == weights.dtype == torch.float32  # the weights reach the experts in float32
    torch.testing.assert_close(our_weights.gather(1, our_ids.argsort(-1)), weights.gather(1, ids.argsort(-1)), **TOL)


@settings(max_examples=12, deadline=None)
@given(
    backend=st.sampled_from(NEMOTRON_BACKENDS),
    num_experts=st.sampled_from([4, 6, 8]),
    top_k=st.integers(1, 6),
    groups=st.data(),
    norm_topk_prob=st.booleans(),
    latent=st.sampled_from([None, 8, 16]),
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),
    seed=st.integers(0, 2**16),
)
def test_nemotron_h_parity_over_shapes(backend, num_experts, top_k, groups, norm_topk_prob, latent, batch, seq, seed):
    n_group = groups.draw(st.sampled_from([g for g in (1, 2, 4) if num_experts % g == 0 and num_experts // g >= 2]))
    per_group = num_experts // n_group
    topk_group = groups.draw(st.integers(1, n_group))
    top_k = min(top_k, topk_group * per_group)  # v5 chooses among the kept groups' experts only
    reference, ours = build_pair(NEMOTRON_H, backend, seed=seed, correction_bias=True, num_experts=num_experts,
                                 top_k=top_k, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                                 moe_latent_size=latent)
    input_ids = torch.randint(0, 61, (batch, seq), generator=torch.Generator().manual_seed(seed))
    assert_same_training_step(reference, ours, input_ids)


def test_nemotron_h_runs_as_its_family_not_the_generic_path():
    _, ours = build_pair(NEMOTRON_H, "torch", moe_latent_size=16)
    assert sorted(ours.moe_lab_plan) == ["model.layers.1.mixer", "model.layers.3.mixer"]  # blocks, not experts
    for name in ours.moe_lab_plan:
        layer = ours.get_submodule(name)
        assert isinstance(layer, moe_lab.MoELayer) and layer.family.model_type == NEMOTRON_H
        assert "family=nemotron_h" in repr(layer)
        assert type(layer.gate).__name__ == "MoeLabNemotronHTopkRouter"
        assert layer.experts_spec.activation_key == "plain:relu2"  # mlp_hidden_act, not the default silu
        assert layer.routing == moe_lab.FAMILIES[NEMOTRON_H].routing(ours.config)
        assert layer.routing.features() == {"sigmoid", "renormalize", "group_limited", "correction_bias",
                                             "scaling", "logits_fp32"}
        assert type(layer.fc1_latent_proj) is torch.nn.Linear and type(layer.fc2_latent_proj) is torch.nn.Linear
    assert not hasattr(ours.model.layers[1].mixer.experts, "moe_lab_planner")  # no generic adaptation


def test_nemotron_h_router_logits_match_v5():
    reference, ours = build_pair(NEMOTRON_H, TRITON_ROUTER, correction_bias=True)
    input_ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = reference(input_ids, labels=input_ids, output_router_logits=True)
    if not hasattr(ref, "router_logits"):
        pytest.skip("this transformers' NemotronH returns no router logits (5.17)")
    got = ours(input_ids, labels=input_ids, output_router_logits=True)
    assert len(got.router_logits) == len(ref.router_logits) == 2
    for a, b in zip(got.router_logits, ref.router_logits):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("latent", [None, 16])
def test_nemotron_h_checkpoint_keys_are_v5_keys(latent, tmp_path):
    """save_pretrained of the moe_lab model writes exactly v5's keys and tensors, and v5 reads it back."""
    from safetensors.torch import load_file

    reference, ours = build_pair(NEMOTRON_H, "torch", correction_bias=True, moe_latent_size=latent)
    reference.save_pretrained(tmp_path / "v5")
    ours.save_pretrained(tmp_path / "ours")
    theirs, mine = (load_file(tmp_path / d / "model.safetensors") for d in ("v5", "ours"))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    assert any(k.endswith("e_score_correction_bias") for k in mine)
    loaded = moe_lab.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", moe_backend="torch")
    input_ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(input_ids).logits, reference(input_ids).logits, **TOL)
