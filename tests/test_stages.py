"""Stage-level parity: every backend's permute -> experts -> combine against the eager reference,
over shapes hypothesis picks (zero tokens, k = E, E not a power of two, odd sizes, one expert taking
every token), forward and gradients, for the standard and the GPT-OSS expert layouts; and Nemotron-H's
non-gated relu2 experts through every backend against v5's own experts forward."""
from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import moe_lab
from moe_lab.families import experts_spec_of
from moe_lab.layer import run_routed_experts
from moe_lab.stages.experts import ExpertsSpec

def _runs_here(word: str) -> bool:
    try:
        moe_lab.resolve_backend(word)
        return True
    except moe_lab.registry.BackendUnavailableError:  # e.g. te without TransformerEngine
        return False


RUNNABLE = [b for b in moe_lab.available_backends() if _runs_here(b)]
FAST = [b for b in RUNNABLE if b != "eager"]


def make_experts(layout: str, num_experts: int, hidden: int, inter: int, seed: int):
    torch.manual_seed(seed)
    if layout == "gpt_oss":
        config = transformers.GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                                           num_experts_per_tok=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8)
        module = GptOssExperts(config)
    else:
        config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts,
                                             num_experts_per_tok=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8)
        module = Qwen3MoeExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module, experts_spec_of(module, layout)


def routed(backend, module, spec, hidden, ids, weights):
    choice = moe_lab.resolve_backend(backend)
    return run_routed_experts(hidden, ids, weights, module, spec, choice, choice.dispatch())


@settings(max_examples=25, deadline=None)
@given(
    backend=st.sampled_from(FAST),
    layout=st.sampled_from(["standard", "gpt_oss"]),
    num_experts=st.sampled_from([1, 3, 5, 8]),
    k=st.integers(1, 8),
    tokens=st.integers(0, 24),
    hidden=st.sampled_from([8, 13, 32]),
    inter=st.sampled_from([4, 7, 16]),
    one_expert=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backend_matches_eager(backend, layout, num_experts, k, tokens, hidden, inter, one_expert, seed):
    k = min(k, num_experts)
    module, spec = make_experts(layout, num_experts, hidden, inter, seed)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(tokens):
        if one_expert:  # expert 0 in every token's choice; the other slots spread over the rest
            rows.append(torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(num_experts - 1, generator=g)[: k - 1] + 1]))
        else:
            rows.append(torch.randperm(num_experts, generator=g)[:k])
    ids = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    hidden_states = torch.randn(tokens, hidden, generator=g)
    weights = torch.rand(tokens, k, generator=g)

    outs, grads = {}, {}
    for name in ("eager", backend):
        x = hidden_states.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        out = routed(name, module, spec, x, ids, w)
        assert out.shape == (tokens, hidden)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        params = list(module.parameters())
        got = torch.autograd.grad(out, [x, w, *params], upstream, allow_unused=True) if tokens else []
        outs[name] = out.detach()
        grads[name] = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(got, [x, w, *params])]
        module.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[backend], outs["eager"], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[backend], grads["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_zero_tokens(backend):
    module, spec = make_experts("standard", 4, 8, 4, 0)
    out = routed(backend, module, spec, torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 8)


# Nemotron-H's experts as moe_lab's families describe them: up_proj [E, I, H] (no gate), relu2, down_proj
NEMOTRON_SPEC = dict(gated=False, activation="plain", act_name="relu2")


@pytest.mark.parametrize("tokens", [0, 11])
@pytest.mark.parametrize("backend", FAST)
def test_nemotron_h_relu2_experts_match_v5(backend, tokens):
    """v5's NemotronHExperts (non-gated, relu2) run by each backend (triton and triton_gather: the
    fused kernels' relu2 path) equal v5's own forward, and the gradients of the hidden states, the
    routing weights, up_proj and down_proj equal v5's; expert 4 gets no row, sizes are odd."""
    E, H, I, k = 5, 13, 7, 2
    config = transformers.NemotronHConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                          num_experts_per_tok=k, mlp_hidden_act="relu2")
    torch.manual_seed(3)
    module = NemotronHExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    spec = ExpertsSpec(num_experts=E, **NEMOTRON_SPEC)
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.long)
    hidden_states = torch.randn(tokens, H, generator=g)
    weights = torch.rand(tokens, k, generator=g)
    upstream = torch.randn(tokens, H, generator=g)
    params = [module.up_proj, module.down_proj]

    def run(fn):
        x, w = hidden_states.clone().requires_grad_(), weights.clone().requires_grad_()
        out = fn(x, w)
        assert out.shape == (tokens, H)
        leaves = [x, w, *params]
        # no token: v5 returns a fresh zero tensor, outside the graph
        grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True) if out.requires_grad else [None] * 4
        return out.detach(), [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves)]

    want, want_grads = run(lambda x, w: module(x, ids, w))  # v5's own experts forward
    got, got_grads = run(lambda x, w: routed(backend, module, spec, x, ids, w))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("hidden", "weights", "up_proj", "down_proj"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} d{name}: {m}")


def test_grouped_mm_experts_take_a_float32_activation_under_autocast():
    """On CUDA, autocast runs some activations in float32 (relu2's square is on its float32 list);
    grouped_mm is not autocast-aware, so the experts cast the activation to the weights' dtype, as
    v5's grouped_mm experts do (a Trainer with bf16=True failed on Nemotron before)."""
    from moe_lab.stages.experts import grouped_mm

    w = torch.randn(3, 16, 8, dtype=torch.bfloat16)
    x = torch.randn(10, 16)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    out = grouped_mm(x, w, offsets)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, grouped_mm(x.to(torch.bfloat16), w, offsets), rtol=0, atol=0)
