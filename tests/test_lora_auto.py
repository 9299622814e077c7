"""`auto` on a model with LoRA on its experts (issue 25) times what the layer runs: the LoRA
counterpart of each candidate with the factors taking gradients and the frozen base taking none,
decided apart from the base layer, said in the plan. Measured on the CPU here (`auto.MEASURED_DEVICES`),
among two torch candidates (no Triton interpreter in the trials)."""
import copy

import pytest
import torch

import moe_lab
from moe_lab import auto, layer
from moe_lab.lora import ExpertsLoRA
from tiny_models import tiny_config

peft = pytest.importorskip("peft")

CANDIDATES = (("torch", "torch"),
              ("torch_eager_permutation", {"router": "torch", "permutation": "eager", "experts": "torch",
                                           "combine": "torch"}))


def test_auto_times_the_lora_layer(monkeypatch):
    monkeypatch.setattr(auto, "MEASURED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(auto, "CANDIDATES", CANDIDATES)
    monkeypatch.setattr(auto, "WARMUP", 0)
    monkeypatch.setattr(auto, "REPEATS", 1)
    trials = []
    run = layer.run_routed_experts

    def spy(hidden, ids, weights, experts, spec, choice, dispatcher):
        trials.append((experts, choice.names["experts"]))
        return run(hidden, ids, weights, experts, spec, choice, dispatcher)

    monkeypatch.setattr(layer, "run_routed_experts", spy)
    config = tiny_config("qwen3_moe", layers=1)
    torch.manual_seed(0)
    base = moe_lab.AutoModelForCausalLM.from_config(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(0)
    model = peft.get_peft_model(moe_lab.AutoModelForCausalLM.from_config(config), copy.deepcopy(lora))
    tokens = torch.randint(0, config.vocab_size, (1, 6))
    auto.forget_decisions()
    try:
        model(tokens, labels=tokens).loss.backward()
        (plan,) = model.base_model.model.moe_lab_plan.values()
        # the trials (all but the last call: the layer's own forward) ran each candidate's LoRA experts
        assert [name for _, name in trials[:-1]] == ["torch+lora", "torch+lora"]
        for experts, _ in trials[:-1]:
            assert isinstance(experts, ExpertsLoRA)
            assert not experts.gate_up_proj.requires_grad and not experts.down_proj.requires_grad
            assert all(f.a.requires_grad and f.b.requires_grad for f in experts.lora.values())
        assert "measured, forward+backward with LoRA (down_proj r4, gate_up_proj r4) of 6 tokens" in plan["auto"], plan
        assert plan["lora"].startswith("torch+lora")

        # the base model's layer of the same shape decides apart (measured again, without LoRA)
        trials.clear()
        base(tokens, labels=tokens).loss.backward()
        (base_plan,) = base.moe_lab_plan.values()
        assert "measured, forward+backward of 6 tokens" in base_plan["auto"], base_plan
        assert not any(isinstance(experts, ExpertsLoRA) for experts, _ in trials)
    finally:
        auto.forget_decisions()

    # measuring left the step as the chosen backend computes it
    chosen = dict(CANDIDATES)[plan["auto"].split(" ")[0]]
    torch.manual_seed(0)
    reference = peft.get_peft_model(moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=chosen), lora)
    reference.load_state_dict(model.state_dict())
    reference(tokens, labels=tokens).loss.backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=name)
