"""transformers' `set_experts_implementation` on a model moe_lab took: the switch is real (the experts
run transformers' code for the named implementation, the plan says so, the outputs are v5's), and
set_experts_implementation("moe_lab") returns the layers to moe_lab's stages (a patched model's config says "moe_lab")."""
from __future__ import annotations

import pytest
import torch

import moe_lab.layer as layer_module
from tiny_models import tiny_config, v5_and_moe_lab


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "olmoe"])  # MoELayer, biases, the generic path
def test_set_experts_implementation_switches_and_back(family, monkeypatch):
    reference, ours = v5_and_moe_lab(tiny_config(family, num_experts=4))
    original = reference.config._experts_implementation
    assert ours.config._experts_implementation == "moe_lab"  # the config says what runs
    calls = []
    real = layer_module.run_routed_experts
    monkeypatch.setattr(layer_module, "run_routed_experts", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    layer = next(iter(ours.moe_lab_plan))

    ours(ids)
    assert len(calls) == 2 and "set_experts_implementation" not in ours.moe_lab_plan[layer]["experts"]
    for name in ("eager", original):  # v5's other implementation, and the one the model was built with
        ours.set_experts_implementation(name)
        reference.set_experts_implementation(name)
        calls.clear()
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)
        assert calls == []  # moe_lab's experts did not run
        assert f"transformers' {name!r} experts implementation" in ours.moe_lab_plan[layer]["experts"]

    ours.set_experts_implementation("moe_lab")
    ours(ids)
    assert len(calls) == 2 and "set_experts_implementation" not in ours.moe_lab_plan[layer]["experts"]
    assert "_experts_implementation" not in ours.config.to_dict()  # checkpoints keep v5's config
