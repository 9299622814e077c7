"""The fused rotary embedding (Triton, interpreter here) equals v5's ``apply_rotary_pos_emb``, forward
and gradients, on strided q/k views and broadcast cos/sin, and a model with ``fused_rope=True`` trains
like v5. float32 pins the math (the kernel rounds where v5 rounds, which only bf16 on a GPU shows:
tests/test_step_kernels_gpu.py checks that bit for bit)."""
from __future__ import annotations

import importlib

import pytest
import torch
import transformers

from markers import needs_interpreter
from moe_lab.training.fused_rope import computes_rotate_half_rope, enable_fused_rope, rope_reference
from tiny_models import assert_same_grads, tiny_config, v5_and_moe_lab
from triton_kernels.rope import check_rope_args, rope

ROPE_FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"]


def _modeling(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


@needs_interpreter
@pytest.mark.parametrize("cos_batch", [1, 3])
def test_kernel_matches_reference_on_a_transposed_view(cos_batch):
    torch.manual_seed(0)
    base = torch.randn(3, 7, 4, 16, requires_grad=True)  # [B, S, H, D] as the projections write it
    x = base.transpose(1, 2)  # [B, H, S, D] strided view, as v5 passes q and k
    cos, sin = torch.randn(cos_batch, 7, 16), torch.randn(cos_batch, 7, 16)
    grad = torch.randn(3, 4, 7, 16)
    got = rope(x, cos, sin)
    assert got.stride() == x.stride(), "the output keeps the input's layout"
    (got_dx,) = torch.autograd.grad(got, base, grad)
    want = rope_reference(x, cos.expand(3, 7, 16), sin.expand(3, 7, 16))
    (want_dx,) = torch.autograd.grad(want, base, grad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_dx, want_dx, rtol=0, atol=1e-6)


def test_bad_arguments_are_refused_in_the_users_terms():
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="even, contiguous head_dim"):
        check_rope_args(torch.randn(1, 2, 5, 7), torch.randn(1, 5, 7), torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match=r"cos must be \[batch or 1, 5, 8\]"):
        check_rope_args(x, torch.randn(1, 4, 8), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="sin is torch.float64"):
        check_rope_args(x, torch.randn(1, 5, 8), torch.randn(1, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="must not require gradients"):
        rope(x, torch.randn(1, 5, 8, requires_grad=True), torch.randn(1, 5, 8))


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_each_family_is_found_to_rotate_half(family):
    assert computes_rotate_half_rope(_modeling(family).apply_rotary_pos_emb)


def test_a_model_that_rotates_otherwise_is_refused_unchanged():
    """GPT-OSS rotates with half-width cos/sin: refused before any module or function changes."""
    config = tiny_config("gpt_oss")
    model = transformers.AutoModelForCausalLM.from_config(config)
    file = _modeling("gpt_oss")
    before = (file.apply_rotary_pos_emb, [m.forward for m in model.modules()])
    with pytest.raises(ValueError, match="leave fused_rope off"):
        enable_fused_rope(model)
    assert before == (file.apply_rotary_pos_emb, [m.forward for m in model.modules()])


@needs_interpreter
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_model_with_fused_rope_trains_like_v5_and_leaves_other_models_alone(family, monkeypatch):
    import triton_kernels.rope as rope_module

    calls = []
    launch = rope_module._launch
    monkeypatch.setattr(rope_module, "_launch", lambda *a, **k: calls.append(k["backward"]) or launch(*a, **k))
    config = tiny_config(family)
    reference, ours = v5_and_moe_lab(config, moe_backend="torch", fused_rope=True)
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    want = reference(ids, labels=ids)
    assert calls == [], "a model without the option keeps v5's rotary embedding"
    got = ours(ids, labels=ids)
    layers = config.num_hidden_layers
    assert calls == [False] * 2 * layers, "q and k of every layer through the kernel"
    want.loss.backward()
    got.loss.backward()
    assert calls.count(True) == 2 * layers
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(ours, reference, rtol=1e-4, atol=1e-5)


@needs_interpreter
def test_bf16_equals_v5_bit_for_bit():
    """The kernel rounds each product and the sum to bf16 (nearest-even, on the bits) exactly where
    v5's separate kernels round, so bf16 outputs and gradients are bit-equal to v5's, here under the
    interpreter as on the GPU (tests/test_step_kernels_gpu.py)."""
    file = _modeling("qwen3_moe")
    torch.manual_seed(0)
    base_q = torch.randn(1, 64, 4, 128, dtype=torch.bfloat16, requires_grad=True)
    base_k = torch.randn(1, 64, 2, 128, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (torch.randn(1, 64, 128).to(torch.bfloat16) for _ in range(2))
    grads = [torch.randn(1, h, 64, 128, dtype=torch.bfloat16) for h in (4, 2)]
    want = file.apply_rotary_pos_emb(base_q.transpose(1, 2), base_k.transpose(1, 2), cos, sin)
    got = (rope(base_q.transpose(1, 2), cos, sin), rope(base_k.transpose(1, 2), cos, sin))
    want_grads = torch.autograd.grad(want, [base_q, base_k], grads)
    got_grads = torch.autograd.grad(got, [base_q, base_k], grads)
    for name, a, b in zip(("q", "k", "dq", "dk"), (*got, *got_grads), (*want, *want_grads)):
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} elements differ"


def test_configs_that_rotate_otherwise_are_refused():
    """DeepSeek-V3 rotates interleaved pairs by default (apply_rotary_pos_emb_interleave, which the
    option would never reach: a -fusedrope row would have measured v5's rotation); partial rotary
    factors rotate part of each head."""
    with pytest.raises(ValueError, match="rope_interleave"):
        enable_fused_rope(transformers.AutoModelForCausalLM.from_config(tiny_config("deepseek_v3")))
    config = tiny_config("qwen3_moe")
    config.partial_rotary_factor = 0.5
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        enable_fused_rope(transformers.AutoModelForCausalLM.from_config(config))


@needs_interpreter
def test_deepseek_without_interleave_runs_the_kernel(monkeypatch):
    import triton_kernels.rope as rope_module

    calls = []
    launch = rope_module._launch
    monkeypatch.setattr(rope_module, "_launch", lambda *a, **k: calls.append(k["backward"]) or launch(*a, **k))
    config = tiny_config("deepseek_v3")
    config.rope_interleave = False
    reference, ours = v5_and_moe_lab(config, moe_backend="torch", fused_rope=True)
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert calls.count(False) == 2 * config.num_hidden_layers


def test_an_opted_in_call_the_kernel_cannot_take_runs_v5_with_a_warning(caplog):
    from moe_lab.training import fused_rope

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    enable_fused_rope(model)
    dispatcher = _modeling("qwen3_moe").apply_rotary_pos_emb
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(1, 5, 8, dtype=torch.float64)
    fused_rope._warned.clear()  # warnings are once per reason and process
    fused_rope._state.depth = 1  # as inside an opted-in attention forward
    try:
        with caplog.at_level("WARNING", logger="moe_lab.training.fused_rope"):
            got_q, got_k = dispatcher(q, k, cos, sin)
    finally:
        fused_rope._state.depth = 0
    torch.testing.assert_close(got_q, rope_reference(q, cos, sin))
    assert "v5's rotary embedding runs instead" in caplog.text and "cos is torch.float64" in caplog.text
