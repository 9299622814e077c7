"""On a CUDA GPU: every family through moe_lab's fast backends in bf16 against v5's grouped_mm in
bf16 (same weights, so the same routing): loss, logits and every gradient by relative norm error;
and the loss against v5's eager experts in float32.

Run on the GPU machine: `python -m pytest -q -m gpu tests/test_gpu_parity.py`.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import moe_lab
from tiny_models import FAMILIES, tiny_config

pytestmark = pytest.mark.gpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_backend_against_fp32_v5(family, backend):
    config = tiny_config(family, num_experts=8, top_k=2, hidden_size=128, intermediate_size=256,
                         **({"moe_intermediate_size": 64} if family in ("qwen3_moe", "deepseek_v3") else {}))
    torch.manual_seed(0)
    with torch.device("cuda"):
        fp32 = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
        reference = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm",
                                                                  dtype=torch.bfloat16)
        ours = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=backend, dtype=torch.bfloat16)
    bf16_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fp32.state_dict().items()}
    reference.load_state_dict(bf16_state)
    ours.load_state_dict(bf16_state)
    ids = torch.randint(0, config.vocab_size, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref = reference(ids, labels=ids)
    got = ours(ids, labels=ids)
    ref.loss.backward()
    got.loss.backward()
    assert abs(got.loss.item() - fp32(ids, labels=ids).loss.item()) < 2e-2
    assert abs(got.loss.item() - ref.loss.item()) < 5e-3
    assert rel_err(got.logits, ref.logits) < 1e-2
    grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        expected = grads[name].grad
        if expected is None or expected.norm() == 0:
            continue
        assert param.grad is not None, name
        assert rel_err(param.grad, expected) < 3e-2, name
