"""The chunked linear + cross-entropy loss equals v5's causal-LM loss, forward and every gradient."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

import moe_lab
from moe_lab.training.fused_ce import enable_fused_cross_entropy, linear_cross_entropy
from markers import needs_interpreter
from tiny_models import tiny_config, v5_and_moe_lab

TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("rows,chunk_rows", [(37, 5), (8, 8), (16, 100)])
def test_linear_cross_entropy_matches_torch(rows, chunk_rows, impl):
    torch.manual_seed(rows)
    hidden = torch.randn(rows, 12, requires_grad=True)
    weight = torch.randn(29, 12, requires_grad=True)
    labels = torch.randint(0, 29, (rows,))
    labels[::3] = -100
    ours = linear_cross_entropy(hidden, weight, labels, chunk_bytes=chunk_rows * 29 * 4, impl=impl)
    theirs = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    torch.testing.assert_close(ours, theirs, **TOL)
    g_ours = torch.autograd.grad(ours * 1.7, [hidden, weight])
    g_theirs = torch.autograd.grad(theirs * 1.7, [hidden, weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("items", [None, 9])
def test_model_loss_and_gradients_match_v5(family, items):
    config = tiny_config(family, router_aux_loss_coef=0.02) if family != "deepseek_v3" else tiny_config(family)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    ours = moe_lab.patch_model(copy.deepcopy(reference), "torch")
    enable_fused_cross_entropy(ours, chunk_bytes=7 * config.vocab_size * 4)  # several chunks
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    kwargs = dict(labels=labels, output_router_logits=family != "deepseek_v3")
    if items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(items)
    ref, got = reference(ids, **kwargs), ours(ids, logits_to_keep=1, **kwargs)  # logits_to_keep is moot here
    torch.testing.assert_close(got.loss, ref.loss, **TOL)
    assert got.logits.shape[1] == 0, "fused cross-entropy returns no logits"
    ref.loss.backward()
    got.loss.backward()
    grads = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        expected = grads[name].grad
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p),
                                   expected if expected is not None else torch.zeros_like(p), **TOL,
                                   msg=lambda m: f"{name}: {m}")


def test_inference_and_generate_unchanged():
    reference, ours = v5_and_moe_lab(tiny_config("qwen3_moe"), fused_cross_entropy=True)
    config = ours.config
    ids = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, **TOL)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), reference.generate(ids, **kw))


@pytest.mark.parametrize("bad", [-1, 29])
def test_out_of_range_labels_are_refused(bad):
    hidden, weight = torch.randn(4, 8), torch.randn(29, 8)
    labels = torch.tensor([0, 3, bad, -100])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 29\)"):
        linear_cross_entropy(hidden, weight, labels)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_no_labelled_token_gives_nan_loss_and_zero_gradients_as_v5(impl):
    """A fully padded batch: v5's mean cross-entropy is NaN with zero gradients; NaN gradients would
    poison every weight under OptimizerInBackward (no step to skip)."""
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(29, 8, requires_grad=True)
    labels = torch.full((6,), -100)
    ours = linear_cross_entropy(hidden, weight, labels, impl=impl)
    theirs = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    assert torch.isnan(ours) and torch.isnan(theirs)
    for a, b in zip(torch.autograd.grad(ours, [hidden, weight]), torch.autograd.grad(theirs, [hidden, weight])):
        assert torch.equal(a, b) and not a.any()


def test_host_checks_can_be_asked_for(monkeypatch):
    from moe_lab._checks import check_on_host

    assert check_on_host(torch.zeros(1))  # the CPU always checks on the host
    meta = torch.zeros(1, device="meta")
    assert not check_on_host(meta)
    from moe_lab import options

    monkeypatch.setattr(options, "_applied", {**options.Options(host_checks=True).process_settings()})
    assert check_on_host(meta)


@needs_interpreter
def test_triton_row_kernels_match_torch_on_bf16_logits():
    """The two row kernels on bf16 logits with a vocabulary that is not a multiple of their block,
    ignored labels and a slice that starts mid-vocabulary."""
    from triton_kernels.cross_entropy import logsumexp_and_target, softmax_grad_

    torch.manual_seed(0)
    logits = (torch.randn(6, 301) * 4).to(torch.bfloat16)
    labels = torch.tensor([0, 300, 150, -100, 7, 299])
    lse, target = logsumexp_and_target(logits, labels)
    exact = logits.float()
    torch.testing.assert_close(lse, torch.logsumexp(exact, -1), rtol=1e-5, atol=1e-5)
    want_target = torch.where(labels >= 0, exact.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(target, want_target)
    scale = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    got = softmax_grad_(logits[:, 100:250].clone(), lse, labels, scale, 100)
    probs = torch.softmax(exact, -1)
    probs[torch.arange(6)[labels >= 0], labels[labels >= 0]] -= 1.0
    want = (probs * scale[:, None])[:, 100:250]
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)  # bf16 output (truncated under the interpreter)
    with pytest.raises(ValueError, match="labels must be"):
        logsumexp_and_target(logits, labels[:3])
    with pytest.raises(ValueError, match="labels must be"):
        logsumexp_and_target(logits[:3], labels[::2])
    with pytest.raises(ValueError, match="row_scale must be"):
        softmax_grad_(logits.clone(), lse, labels, scale[:1], 0)


@needs_interpreter
def test_log_sum_exp_kernel_with_minus_inf_logits():
    """-inf logits (masked vocabulary) add nothing, as in torch.logsumexp, and never make NaN."""
    from triton_kernels.cross_entropy import logsumexp_and_target

    logits = torch.randn(3, 300)
    logits[0, 0] = float("-inf")  # first lane of the first block
    logits[1, 150:] = float("-inf")  # half a row
    logits[2, 5] = float("-inf")
    lse, target = logsumexp_and_target(logits, torch.tensor([3, 20, 5]))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    assert torch.isfinite(target[:2]).all() and target[2] == float("-inf")


def test_chunks_are_multiples_of_128_from_128_up():
    """Vocabulary slices of odd width make cuBLAS take slow paths (misaligned row strides)."""
    from moe_lab.training.fused_ce import DEFAULT_CHUNK_BYTES, _chunk_len

    for tokens in (4096, 6 * 4096, 12 * 4096, 16 * 4096):
        width = _chunk_len(tokens, DEFAULT_CHUNK_BYTES, element_size=2)
        assert width % 128 == 0 and 0 < width * tokens * 2 <= DEFAULT_CHUNK_BYTES
    assert _chunk_len(151936, DEFAULT_CHUNK_BYTES, 2) == 768  # 883 rows of bf16 logits -> 768
    assert _chunk_len(29, 100 * 29 * 4) == 96  # below 128: a multiple of 8
    assert _chunk_len(29, 5 * 29 * 4) == 5  # below 8: as asked
