"""Whole-model parity: vanilla Transformers v5 (eager experts) against moe_lab, every family and backend.

Logits and every parameter's gradient must agree in float32 to a tight tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

import moe_lab
from tiny_models import FAMILIES, GENERIC, tiny_config

# "triton" runs under Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1).
BACKENDS = ["eager", "torch", "triton", "triton_gather"]
TOL = dict(rtol=1e-4, atol=1e-5)


def build_pair(family: str, backend, seed: int = 0, **config_overrides):
    """A vanilla v5 model (eager experts) and a moe_lab model with identical weights."""
    config = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
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
@pytest.mark.parametrize("family", FAMILIES + GENERIC)
def test_logits_and_gradients_match_v5(family, backend):
    reference, ours = build_pair(family, backend, seed=1)
    input_ids = torch.randint(0, reference.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    assert_same_training_step(reference, ours, input_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_known_families_get_moe_layers(family):
    _, ours = build_pair(family, "torch")
    layers = [m for m in ours.modules() if isinstance(m, moe_lab.MoELayer)]
    assert len(layers) == 2
    assert isinstance(ours, transformers.PreTrainedModel)
    assert type(ours).__name__ == type(transformers.AutoModelForCausalLM.from_config(tiny_config(family))).__name__


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
    config = tiny_config(family, num_experts=num_experts, top_k=top_k, **({"n_group": 1, "topk_group": 1} if family == "deepseek_v3" else {}))
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    block = model.model.layers[-1].mlp
    router = block.router if family == "gpt_oss" else block.gate
    with torch.no_grad():
        router.weight.copy_(-router.weight.abs())
        router.weight[winner] = 5.0
        if family == "gpt_oss":
            router.bias.zero_()
    ours = copy.deepcopy(model)
    moe_lab.patch_model(ours, backend)
    return block, ours.model.layers[-1].mlp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_one_expert_takes_all_and_empty_experts(family, backend, top_k):
    num_experts = 6
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


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_v5(family):
    reference, ours = build_pair(family, "torch")
    prompt = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


@pytest.mark.parametrize("family", FAMILIES + GENERIC)
def test_v5_experts_registry_switch(family):
    """A vanilla user writes experts_implementation="moe_lab" and gets the same model output."""
    config = tiny_config(family)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    for name in ("moe_lab", "moe_lab_eager"):
        vanilla = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=name)
        vanilla.load_state_dict(reference.state_dict())
        assert_same_training_step(reference, vanilla, torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1)))
