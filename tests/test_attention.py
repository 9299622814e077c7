"""moe_lab's cuDNN attention implementation (``attn_implementation="moe_lab_cudnn"``) and the
optimizer-in-backward on a side stream: what holds on the CPU (registration, the fallback to v5's
sdpa, identical models), and on a CUDA GPU the cuDNN path against v5's sdpa in bf16 (forward and
gradients) and the side-stream optimizer against the inline one (bit-equal parameters)."""
from __future__ import annotations

import types

import pytest
import torch
import transformers

import moe_lab
from moe_lab import attention
from moe_lab.optim import OptimizerInBackward, TritonAdamW

from tiny_models import tiny_config

def gpu(test):
    """Marks a test that needs a CUDA GPU (skipped elsewhere)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def test_registered_with_v5_attention_and_mask_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    assert AttentionInterface._global_mapping[attention.ATTENTION_NAME] is attention.cudnn_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[attention.ATTENTION_NAME] is sdpa_mask


def test_repeat_heads_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(attention._repeat_heads(x, 4), x.repeat_interleave(4, dim=1), rtol=0, atol=0)


def test_cpu_calls_fall_back_to_v5_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2)
    attention.dispatch_counts.clear()
    ours, _ = attention.cudnn_attention_forward(module, q, k, v, None)
    ref, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert attention.dispatch_counts == {"sdpa": 1}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_model_with_moe_lab_cudnn_equals_sdpa_model(family):
    config = tiny_config(family)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ours = moe_lab.AutoModelForCausalLM.from_config(config, attn_implementation=attention.ATTENTION_NAME, moe_backend="torch")
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == attention.ATTENTION_NAME
    ids = torch.randint(0, config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: a mask tensor, which the fast path leaves to v5's sdpa
    for kw in ({}, {"attention_mask": mask}):
        torch.testing.assert_close(ours(ids, **kw).logits, ref(ids, **kw).logits, rtol=1e-5, atol=1e-5)


def test_side_stream_needs_cuda_parameters():
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        OptimizerInBackward([torch.nn.Parameter(torch.ones(2))], side_stream=True)


@gpu
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("batch", [1, 2])
def test_cudnn_path_matches_sdpa_on_gpu(groups, batch):
    torch.manual_seed(0)
    heads, seq, dim = 32, 2048, 128
    q = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, heads // groups, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=groups)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    results = []
    for fn in (attention.cudnn_attention_forward, sdpa_attention_forward):
        attention.dispatch_counts.clear()
        for t in (q, k, v):
            t.grad = None
        out, _ = fn(module, q, k, v, None)
        out.backward(grad)
        results.append([out.float(), *(t.grad.float() for t in (q, k, v))])
        if fn is attention.cudnn_attention_forward:
            assert set(attention.dispatch_counts) <= {"cudnn", "cudnn-repeat-kv"}, attention.dispatch_counts
    # two bf16 kernels of different accumulation order: compare the error against the values' scale
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        rel = float((a - b).norm() / b.norm())
        assert rel < 2e-2, f"{name}: relative difference {rel:.2e}"



@gpu
@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, TritonAdamW])
def test_side_stream_updates_equal_inline_updates_on_gpu(optimizer_class):
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    models = [moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch").cuda().to(torch.bfloat16)
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [OptimizerInBackward(m.parameters(), optimizer_class, lr=1e-2, side_stream=side)
                  for m, side in zip(models, (False, True))]
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
        for m, opt in zip(models, optimizers):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name

