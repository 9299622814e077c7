"""Routing regimes: forced ids, determinism, hooks on v5 and moe_lab routers, gradients to the router."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from experiments import models, regimes


def test_balanced_ids_round_robin():
    ids = regimes.balanced_ids(10, 3, 8)
    assert ids[0].tolist() == [0, 1, 2] and ids[3].tolist() == [1, 2, 3]
    assert all(len(set(r.tolist())) == 3 for r in ids)
    load = torch.bincount(regimes.balanced_ids(16, 4, 8).flatten(), minlength=8)
    assert load.min() == load.max()


def test_skewed_ids_distinct_deterministic_and_skewed():
    a = regimes.skewed_ids(2048, 4, 16, alpha=1.2, seed=3)
    b = regimes.skewed_ids(2048, 4, 16, alpha=1.2, seed=3)
    assert torch.equal(a, b)
    assert all(len(set(r.tolist())) == 4 for r in a[:200])
    load = regimes.expert_load(a, 16)
    assert load.max() > 2.0 / 16  # far from the uniform 1/16
    flatter = regimes.expert_load(regimes.skewed_ids(2048, 4, 16, alpha=0.2, seed=3), 16)
    assert flatter.max() < load.max()


def test_parse():
    assert regimes.parse("skewed@2") == ("skewed", 2.0)
    assert regimes.parse("skewed") == ("skewed", regimes.DEFAULT_ZIPF_ALPHA)
    with pytest.raises(ValueError):
        regimes.parse("zipf")


def _model(name, backend=None):
    torch.manual_seed(0)
    cfg = models.build_config(name)
    attn = models.attn_implementation(name)
    if backend is None:
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    import moe_lab

    return moe_lab.AutoModelForCausalLM.from_config(cfg, moe_backend=backend, attn_implementation=attn)


@pytest.mark.parametrize("name,backend", [("tiny-qwen3-moe", None), ("tiny-deepseek-v3", None), ("tiny-gpt-oss", None),
                                          ("tiny-qwen3-moe", "torch"), ("tiny-deepseek-v3", "torch")])
def test_hook_forces_ids_and_keeps_router_gradient(name, backend):
    model = _model(name, backend)
    routers = regimes.find_routers(model)
    assert len(routers) >= 1
    handles = regimes.apply(model, "balanced")
    seen = []
    probe = routers[0][1].register_forward_hook(lambda m, a, o: seen.append(o[2].detach().clone()))
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    k = seen[0].shape[-1]
    E = routers[0][1].weight.shape[0]
    assert torch.equal(seen[0].cpu(), regimes.balanced_ids(32, k, E))
    assert routers[0][1].weight.grad is not None and routers[0][1].weight.grad.abs().sum() > 0
    for h in handles + [probe]:
        h.remove()
