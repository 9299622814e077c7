"""The optimizer inside backward: the same parameters as an ordinary AdamW step after each backward,
no gradient left behind, and the harness variant that uses it."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import moe_lab
from moe_lab.optim import OptimizerInBackward
from tiny_models import tiny_config


@pytest.mark.parametrize("fused", [False, True])
def test_same_parameters_as_a_plain_adamw(fused):
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    reference = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch")
    ours = copy.deepcopy(reference)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False, fused=fused)
    in_backward = OptimizerInBackward(ours.parameters(), lr=1e-2, weight_decay=0.1, foreach=False, fused=fused)
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(step))
        reference(ids, labels=ids).loss.backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        ours(ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in ours.parameters()), "gradients must be freed in backward"
        in_backward.step()
        in_backward.zero_grad()
    for (name, expected), got in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert len(in_backward.state) == len(list(ours.parameters()))
    in_backward.remove()


def test_refuses_a_model_with_nothing_to_train():
    layer = torch.nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        OptimizerInBackward(layer.parameters())


def test_harness_variant(tmp_path):
    from experiments import cell, systems

    assert systems.parse("triton-optbwd").optimizer_in_backward
    spec = cell.normalise({"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "system": "torch-optbwd",
                           "device": "cpu", "warmup": 1, "steps": 2, "dtype": "fp32", "optimizer": "adamw"})
    record = cell.run(spec)
    assert record["status"] == "ok" and record["metrics"]["loss_finite"]
    assert record["metrics"]["static_gib"]["optimizer"] > 0
    with pytest.raises(ValueError, match="one process"):
        cell._optimizer({**spec, "nproc": 2}, torch.nn.Linear(2, 2), torch.device("cpu"), in_backward=True)
