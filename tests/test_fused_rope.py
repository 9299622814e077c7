"""The fused rotary embedding (Triton, interpreter here) equals v5's rotary functions, forward and
gradients, in each of the kernel's forms: ``apply_rotary_pos_emb`` (rotate-half, Qwen3-MoE and
Mixtral; GPT-OSS's halves with half-width cos/sin) and DeepSeek-V3's ``apply_rotary_pos_emb_interleave``,
on strided q/k views and broadcast cos/sin, and a model with ``fused_rope=True`` trains like v5.
float32 pins the math; bf16 is compared bit for bit (the kernel rounds where v5 rounds; on a GPU
tests/test_step_kernels_gpu.py checks that)."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import transformers

from markers import needs_interpreter
from moe_lab.training.fused_rope import (computes_rope, computes_rotate_half_rope, enable_fused_rope, rope_reference,
                                         rotary_form)
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


@pytest.mark.parametrize("family, name, form", [
    *[(family, "apply_rotary_pos_emb", "rotate_half") for family in ROPE_FAMILIES],
    ("gpt_oss", "apply_rotary_pos_emb", "half_width"),
    ("deepseek_v3", "apply_rotary_pos_emb", "rotate_half"),
    ("deepseek_v3", "apply_rotary_pos_emb_interleave", "interleaved")])
def test_each_rotary_function_is_classified_as_its_form_and_no_other(family, name, form):
    fn = _original(getattr(_modeling(family), name))
    assert rotary_form(fn, name) == form
    assert [f for f in ("rotate_half", "half_width", "interleaved") if computes_rope(fn, f)] == [form]


def _original(fn):
    """v5's function, also where an earlier test of this process enabled the option (a dispatcher)."""
    return getattr(fn, "_moe_lab_original", fn)


def _rotates_backwards(q, k, cos, sin, unsqueeze_dim=1):
    """A rotary function of no kernel form: the rotate-half embedding by the negated angles."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotate = _modeling("qwen3_moe").rotate_half
    return q * cos - rotate(q) * sin, k * cos - rotate(k) * sin


def test_a_model_that_rotates_otherwise_is_refused_unchanged(monkeypatch):
    """A modeling file whose rotary function computes none of the kernel's forms: refused, with the
    forms it was compared with, before any module or function changes."""
    file = _modeling("qwen3_moe")
    monkeypatch.setattr(file, "apply_rotary_pos_emb", _rotates_backwards)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    before = (file.apply_rotary_pos_emb, [m.forward for m in model.modules()])
    with pytest.raises(ValueError, match=r"is not x \* cos \+ rotate_half\(x\) \* sin or GPT-OSS's halves.*"
                                         "leave fused_rope off"):
        enable_fused_rope(model)
    assert before == (file.apply_rotary_pos_emb, [m.forward for m in model.modules()])


def _rotary_inputs(family: str, head_dim: int, dtype, seed: int):
    """Strided q [2, 3, 7, D] and k [2, 1, 7, D] views (the projections' [B, S, H, D] transposed), and
    cos/sin from the family's own rotary module at scattered positions (a different set per batch row)."""
    generator = torch.Generator().manual_seed(seed)
    if family == "gpt_oss":
        config = tiny_config("gpt_oss", head_dim=head_dim)
        rotary = _modeling("gpt_oss").GptOssRotaryEmbedding(config)
    else:
        config = tiny_config("deepseek_v3", qk_rope_head_dim=head_dim, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})
        rotary = _modeling("deepseek_v3").DeepseekV3RotaryEmbedding(config)
    base_q = torch.randn(2, 7, 3, head_dim, generator=generator).to(dtype).requires_grad_()
    base_k = torch.randn(2, 7, 1, head_dim, generator=generator).to(dtype).requires_grad_()
    positions = torch.stack([torch.randperm(60, generator=generator)[:7] for _ in range(2)])
    cos, sin = rotary(base_q, positions)
    return base_q, base_k, cos, sin


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [6, 14, 64])
@pytest.mark.parametrize("family, name, form", [("gpt_oss", "apply_rotary_pos_emb", "half_width"),
                                                ("deepseek_v3", "apply_rotary_pos_emb_interleave", "interleaved")])
def test_kernel_equals_v5s_function_bit_for_bit(family, name, form, head_dim, dtype):
    """GPT-OSS's and DeepSeek-V3's rotary functions (neither upcasts: cos/sin come in x's dtype) against
    the kernel on the same inputs: q, k and the gradients of both equal, bit for bit, in float32 and
    bf16 (head_dim 6 and 14: an odd number of pairs, masked lanes), cos/sin from the family's own
    rotary module (DeepSeek-V3's with YaRN scaling, as the real model), then laid out with positions
    contiguous (as GPT-OSS's rotary module of v5 5.17 returns them: a transposed matmul), and a third
    seed with random cos/sin of the form's width."""
    fn = _original(getattr(_modeling(family), name))
    for seed in (0, 1, 2):
        base_q, base_k, cos, sin = _rotary_inputs(family, head_dim, dtype, seed)
        assert cos.dtype == dtype and cos.shape[-1] == (head_dim // 2 if form == "half_width" else head_dim)
        if seed == 1:
            cos, sin = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (cos, sin))
            assert cos.stride(-1) == 7
        if seed == 2:
            generator = torch.Generator().manual_seed(seed)
            cos, sin = (torch.randn(cos.shape, generator=generator).to(dtype) for _ in range(2))
        q, k = base_q.transpose(1, 2), base_k.transpose(1, 2)
        want = fn(q, k, cos, sin)
        got = (rope(q, cos, sin, form), rope(k, cos, sin, form))
        grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + 2)).to(dtype) for t in want]
        want_grads = torch.autograd.grad(want, [base_q, base_k], grads)
        got_grads = torch.autograd.grad(got, [base_q, base_k], grads)
        for what, a, b in zip(("q", "k", "dq", "dk"), (*got, *got_grads), (*want, *want_grads)):
            assert a.shape == b.shape and torch.equal(a, b), f"seed {seed} {what}: {int((a != b).sum())} differ"
        torch.testing.assert_close(got[0], rope_reference(q, cos, sin, form), rtol=0, atol=0)


@pytest.mark.parametrize("family, name, form", [("gpt_oss", "apply_rotary_pos_emb", "half_width"),
                                                ("deepseek_v3", "apply_rotary_pos_emb_interleave", "interleaved")])
def test_odd_head_dims_v5_cannot_rotate_are_refused(family, name, form):
    """v5's functions fail on an odd head_dim (their halves or even/odd slices differ in width), so
    the kernel has nothing to match there and refuses it in the user's terms."""
    width = 4 if form == "half_width" else 8
    q, k = torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7)
    cos, sin = torch.randn(1, 3, width), torch.randn(1, 3, width)
    with pytest.raises(RuntimeError):
        _original(getattr(_modeling(family), name))(q, k, cos, sin)
    with pytest.raises(ValueError, match="even, contiguous head_dim"):
        check_rope_args(q, cos, sin, form)
    with pytest.raises(ValueError, match=r"cos must be \[batch or 1, 3, 4\].*half_width form"):
        check_rope_args(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8), "half_width")


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


def test_configs_that_rotate_otherwise_are_refused(monkeypatch):
    """Partial rotary factors rotate part of each head; rope_interleave with no attention module calling
    an interleaved function would leave v5's rotation running (a -fusedrope row measuring v5's)."""
    config = tiny_config("qwen3_moe")
    config.partial_rotary_factor = 0.5
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        enable_fused_rope(transformers.AutoModelForCausalLM.from_config(config))
    config = tiny_config("qwen3_moe")
    config.rope_interleave = True
    with pytest.raises(ValueError, match="rope_interleave=True.*apply_rotary_pos_emb_interleave"):
        enable_fused_rope(transformers.AutoModelForCausalLM.from_config(config))
    file = _modeling("deepseek_v3")
    monkeypatch.setattr(file, "apply_rotary_pos_emb_interleave", lambda q, k, cos, sin, *a, **kw: (q, k))
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    before = (file.apply_rotary_pos_emb, [m.forward for m in model.modules()])
    with pytest.raises(ValueError, match="apply_rotary_pos_emb_interleave is not DeepSeek-V3's interleaved pairs"):
        enable_fused_rope(model)
    assert before == (file.apply_rotary_pos_emb, [m.forward for m in model.modules()])


def _count_launches(monkeypatch) -> list:
    """(backward, form) of every kernel launch from now on."""
    import triton_kernels.rope as rope_module

    calls = []
    launch = rope_module._launch
    monkeypatch.setattr(rope_module, "_launch", lambda *a, **k: calls.append((k["backward"], k["form"]))
                        or launch(*a, **k))
    return calls


@needs_interpreter
@pytest.mark.parametrize("family, form", [("gpt_oss", "half_width"), ("deepseek_v3", "interleaved")])
def test_gpt_oss_and_deepseek_with_fused_rope_train_like_v5(family, form, monkeypatch):
    """Tiny v5 GPT-OSS (sliding and full attention, sinks, YaRN) and DeepSeek-V3 (MLA: only the
    qk_rope_head_dim part of each head rotates, interleaved by default) with fused_rope=True: logits,
    loss and every gradient are v5's (float32), and each layer's q and k go through the kernel in the
    family's form, forward and backward. The swap is recorded: v5's function on the dispatcher, the
    plain forward on each attention module."""
    calls = _count_launches(monkeypatch)
    config = tiny_config(family)
    reference, ours = v5_and_moe_lab(config, moe_backend="torch", fused_rope=True)
    name = "apply_rotary_pos_emb_interleave" if form == "interleaved" else "apply_rotary_pos_emb"
    dispatcher = getattr(_modeling(family), name)
    assert dispatcher._moe_lab_form == form and rotary_form(dispatcher._moe_lab_original, name) == form
    attentions = [m for m in ours.modules() if type(m).__name__.endswith("Attention")]
    assert len(attentions) == config.num_hidden_layers
    assert all(hasattr(m, "_moe_lab_rope_plain_forward") for m in attentions)
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    want = reference(ids, labels=ids)
    assert calls == [], "a model without the option keeps v5's rotary embedding"
    got = ours(ids, labels=ids)
    layers = config.num_hidden_layers
    assert calls == [(False, form)] * 2 * layers, "q and k of every layer through the kernel"
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    want.loss.backward()
    got.loss.backward()
    assert calls.count((True, form)) == 2 * layers
    assert_same_grads(ours, reference, rtol=1e-4, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_bf16_models_with_fused_rope_equal_the_same_model_without_it_bit_for_bit(family):
    """In bf16 the kernel rounds where v5's rotary functions round, so a moe_lab model with fused_rope
    gives the same loss and gradients, bit for bit, as the same model running v5's rotary (everything
    else is the same code on the CPU)."""
    config = tiny_config(family)
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16)
    import moe_lab

    models = []
    for fused in (False, True):
        model = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), moe_backend="torch",
                                                         fused_rope=fused, dtype=torch.bfloat16)
        model.load_state_dict(plain.state_dict())
        models.append(model)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    without, with_ = (m(ids, labels=ids).loss for m in models)
    assert torch.equal(with_, without)
    without.backward()
    with_.backward()
    for (name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


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


@needs_interpreter
def test_only_the_arguments_v5s_functions_default_to_are_fused():
    """Keyword arguments at v5's defaults (some versions' functions take an unused position_ids) are
    fused; other values, unknown names and positional extras (whose meaning differs between v5's
    functions) run v5's function."""
    from moe_lab.training.fused_rope import why_not_fusable

    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    assert why_not_fusable(q, k, cos, sin, (), {"unsqueeze_dim": 1, "position_ids": None}) is None
    assert why_not_fusable(q, k, cos, sin, (), {}, "interleaved", "apply_rotary_pos_emb_interleave") is None
    for args, kwargs in (((None,), {}), ((), {"unsqueeze_dim": 2}), ((), {"position_ids": torch.arange(5)}),
                         ((), {"scale": 1.0})):
        assert "other arguments" in why_not_fusable(q, k, cos, sin, args, kwargs)
    assert "[batch or 1, 5, 4]" in why_not_fusable(q, k, cos, sin, form="half_width")
