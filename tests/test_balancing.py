"""moe_lab.stages.balancing: each balancing method against its plain reference, and in the routing statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

import moe_lab
from moe_lab.analysis import stats
from moe_lab.analysis.trace import trace_routing
from moe_lab.stages import balancing as B
from moe_lab.stages.router import RoutingSpec, select_experts

SPECS = {
    "softmax-renorm": RoutingSpec(8, 2, renormalize=True),
    "softmax": RoutingSpec(8, 3),
    "topk-softmax": RoutingSpec(8, 2, topk_before_softmax=True),
    "sigmoid": RoutingSpec(8, 2, score="sigmoid", renormalize=True, renormalize_eps=1e-20, has_correction_bias=True,
                           scaling=2.5, logits_fp32=True, weights_in_logits_dtype=False),
}


def _select_loop(logits, spec, bias):
    """Token by token: rank experts by (biased score, lower index first), weights from the unbiased scores."""
    ws, ids = [], []
    for row in logits.float():
        if spec.topk_before_softmax:
            scores, choice = row, row + bias
        elif spec.score == "softmax":
            scores = torch.softmax(row, -1)
            choice = scores + bias
        else:
            scores = torch.sigmoid(row)
            choice = scores + bias
        order = sorted(range(len(row)), key=lambda e: (-float(choice[e]), e))[:spec.top_k]
        w = torch.softmax(row[order], -1) if spec.topk_before_softmax else scores[order]
        if spec.renormalize and not spec.topk_before_softmax:
            w = w / (w.sum() + spec.renormalize_eps)
        ws.append(w * spec.scaling)
        ids.append(order)
    return torch.stack(ws), torch.tensor(ids)


@pytest.mark.parametrize("name", SPECS)
def test_select_with_bias_matches_the_token_loop(name):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 8, generator=gen)
    logits[3] = logits[4]  # equal rows, and ties inside a row
    logits[5, 2] = logits[5, 6]
    for bias in (torch.zeros(8), torch.randn(8, generator=gen) * 0.3):
        w, i = B.select_with_bias(logits, spec, bias)
        rw, ri = _select_loop(logits, spec, bias)
        assert torch.equal(i, ri), name
        torch.testing.assert_close(w.float(), rw, rtol=1e-6, atol=1e-7)
    # no bias: the family's own routing, bit for bit
    w0, i0 = B.select_with_bias(logits, spec, None)
    w1, i1 = select_experts(logits, spec)
    assert torch.equal(i0, i1) and torch.equal(w0, w1)


def test_score_override():
    spec = SPECS["softmax-renorm"]
    assert B.routing_with_score(spec, None) is spec and B.routing_with_score(spec, "softmax") is spec
    sig = B.routing_with_score(spec, "sigmoid")
    assert sig.score == "sigmoid" and sig.renormalize and sig.top_k == 2
    with pytest.raises(ValueError, match="n_group"):
        B.routing_with_score(RoutingSpec(8, 2, score="sigmoid", n_group=2, topk_group=1), "softmax")


def test_bias_update_is_exactly_the_reference():
    rng = np.random.default_rng(0)
    bias = torch.zeros(8)
    ref = [0.0] * 8
    for step in range(50):
        counts = torch.from_numpy(rng.integers(0, 40, size=8))
        counts[step % 8] = int(counts.double().mean().round())  # an expert at the mean, sometimes exactly
        B.bias_update(bias, counts, 1e-3)
        ref = B.bias_update_reference(ref, counts.tolist(), 1e-3)
        assert bias.tolist() == ref, step
    # the direction: an overloaded expert's bias goes down, an underloaded one's up, one at the mean stays
    b = torch.zeros(3)
    B.bias_update(b, torch.tensor([10, 2, 6]), 0.5)
    assert b.tolist() == [-0.5, 0.5, 0.0]


@pytest.mark.parametrize("priority", ["slot", "token"])
def test_capacity_drop_is_exactly_the_reference(priority):
    rng = np.random.default_rng(3)
    for trial in range(30):
        T, E, k = int(rng.integers(1, 40)), int(rng.integers(1, 9)), 1
        k = int(rng.integers(1, E + 1))
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if trial % 3 else np.zeros((T, k), int) + np.arange(k)
        cf = float(rng.choice([0.25, 0.5, 1.0, 1.25, 2.0]))
        cap = B.capacity(T, E, k, cf)
        assert cap == stats.expert_capacity(T, E, k, cf)
        got = B.capacity_drop(torch.from_numpy(ids), E, cap, priority).numpy()
        assert got.tolist() == B.capacity_drop_reference(ids.tolist(), E, cap, priority)
        assert (got == stats.dropped_slots(ids, E, cf, priority=priority)).all()
        kept = np.bincount(ids[~got], minlength=E)
        assert (kept <= cap).all() and (kept == np.minimum(np.bincount(ids.reshape(-1), minlength=E), cap)).all()


def test_v5_aux_loss_is_v5s_function():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(24, 8, generator=gen) for _ in range(3)]
    ours = B.v5_aux_loss(layers, 8, 2)
    theirs = load_balancing_loss_func(tuple(layers), 8, 2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    np.testing.assert_allclose(float(ours), float(stats.v5_load_balancing_loss([x.numpy() for x in layers], 8, 2)),
                               rtol=1e-5)


def _tiny_qwen(seed=0):
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=64, router_aux_loss_coef=0.02)
    torch.manual_seed(seed)
    return moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch")


def test_aux_loss_equals_the_models_own():
    model = _tiny_qwen()
    bal = B.Balancer(model, B.BalancingSpec(aux_loss_coef=0.02))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, output_router_logits=True)
    # equal up to float rounding: newer transformers sum the top-k counts per layer before dividing,
    # older ones average a one-hot per slot over the pooled rows (same value, other rounding)
    torch.testing.assert_close(bal.aux_loss(), 0.02 * out.aux_loss, rtol=1e-6, atol=0)
    bal.aux_loss().backward()  # it carries gradients to the routers
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_balancer_statistics_and_bias_against_the_trace():
    model = _tiny_qwen()
    spec = B.BalancingSpec(bias_update_rate=0.01, capacity_factor=1.0)
    bal = B.Balancer(model, spec)
    plan = model.moe_lab_plan["model.layers.0.mlp"]
    assert "aux-loss-free" in plan["balancing"] and "capacity factor 1" in plan["balancing"]
    gate = model.model.layers[0].mlp.gate
    assert B.BIAS_BUFFER not in model.state_dict() and not any(B.BIAS_BUFFER in k for k in model.state_dict())
    gen = torch.Generator().manual_seed(1)
    ref_bias = [[0.0] * 8 for _ in bal.layers]
    for step in range(3):
        micro = [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(2)]  # two micro-batches a step
        with trace_routing(model, logits=True, auto_step=False) as tracer:
            for ids in micro:
                model(ids, labels=ids).loss.backward()
        trace = tracer.trace
        out = bal.step()
        for layer in range(2):
            rec = trace.record(layer, 0)
            logits = torch.from_numpy(rec["logits"])
            # the choice is the biased one (bias before this step's update), dropped slots weigh 0
            counts = stats.expert_counts(rec["ids"], 8)
            assert out["counts"][layer] == counts.tolist()
            dropped = 0
            for part in np.split(np.arange(rec["ids"].shape[0]), 2):  # capacity is per router call
                d = stats.dropped_slots(rec["ids"][part], 8, 1.0, priority="slot")
                assert (rec["weights"][part][d] == 0).all() and (rec["weights"][part][~d] > 0).all()
                dropped += int(d.sum())
            assert out["dropped"][layer] == dropped and out["tokens"][layer] == 48
            assert math.isclose(out["entropy"][layer], float(stats.mean_router_entropy(rec["logits"])), rel_tol=1e-5)
            w, i = B.select_with_bias(logits, bal.layers[layer].routing, torch.tensor(ref_bias[layer]))
            assert torch.equal(i, torch.from_numpy(rec["ids"].astype(np.int64)))
            ref_bias[layer] = B.bias_update_reference(ref_bias[layer], counts.tolist(), 0.01)
            assert bal.layers[layer].bias.tolist() == ref_bias[layer]
    assert gate.moe_lab_balance_bias.abs().max() > 0
    model.eval()  # eval forwards: routed as in training, not counted
    model(torch.randint(0, 64, (1, 8)))
    assert bal.step()["tokens"] == [0, 0]
    bal.remove()
    assert "balancing" not in model.moe_lab_plan["model.layers.0.mlp"]


def test_deepseek_v3_updates_its_own_correction_bias():
    from experiments import ablation

    spec = ablation.normalise({"name": "d", "family": "deepseek_v3", "hidden": 32, "heads": 2, "head_dim": 8,
                               "expert_width": 16, "shared_experts": 1, "seq": 16})
    model = ablation.build_model(spec, torch.device("cpu"))
    bal = B.Balancer(model, B.BalancingSpec(bias_update_rate=0.1))
    gate = model.model.layers[0].mlp.gate
    assert bal.layers[0].bias is gate.e_score_correction_bias and not bal.layers[0].reselect
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    counts = bal.layers[0].counts.clone()
    bal.step()
    expected = B.bias_update_reference([0.0] * 8, counts.tolist(), 0.1)
    assert gate.e_score_correction_bias.tolist() == expected
    assert "model.layers.0.mlp.gate.e_score_correction_bias" in model.state_dict()


def test_spec_is_checked():
    for bad in ({"score": "relu"}, {"bias_update_rate": -1}, {"capacity_factor": 0}, {"capacity_priority": "random"}):
        with pytest.raises(ValueError):
            B.BalancingSpec(**bad)
    assert not B.BalancingSpec().active and B.BalancingSpec(aux_loss_coef=0.1).active
