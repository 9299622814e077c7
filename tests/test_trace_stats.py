"""Routing traces (moe_lab.analysis.trace) and routing statistics (moe_lab.analysis.stats)."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

import moe_lab
from moe_lab import stats
from moe_lab.stages.router import select_experts
from moe_lab.analysis.trace import RoutingTrace, find_routers, load_trace, merge_rank_traces, rank_path, trace_routing
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _model(family: str, patched: str | None = None, seed: int = 0, **overrides):
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    with torch.no_grad():  # DeepSeek's router starts at zero: give every family real preferences
        for _, router in find_routers(model):
            router.weight.normal_(0, 0.5)
            if getattr(router, "e_score_correction_bias", None) is not None:
                router.e_score_correction_bias.normal_(0, 0.1)
    return moe_lab.patch_model(model, patched) if patched else model


def _ids(seed: int = 0, shape=(2, 7)):
    return torch.randint(0, 61, shape, generator=torch.Generator().manual_seed(seed))


# ---- recording --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_trace_is_what_the_router_chose_vanilla_and_moe_lab(family):
    """The recorded ids/weights are the routing of the recorded logits, and vanilla v5 and moe_lab agree."""
    traces = []
    for patched in (None, "torch"):
        model = _model(family, patched)
        with trace_routing(model, logits=True) as tracer:
            model(_ids())
        traces.append(tracer.trace)
    vanilla, ours = traces
    assert vanilla.num_layers == 2 and vanilla.steps == [0] and vanilla.top_k == 2 and vanilla.num_experts == 6
    assert ours.meta["backend"] == "torch" and vanilla.meta["backend"] == "transformers"
    config = tiny_config(family)
    routing = moe_lab.FAMILIES[config.model_type].routing(config)
    assert vanilla.meta["router_score"] == ours.meta["router_score"] == routing.score
    model = _model(family)
    for layer, (_, router) in enumerate(find_routers(model)):
        rec = vanilla.record(layer, 0)
        assert rec["ids"].shape == (14, 2) and rec["logits"].shape == (14, 6)
        assert rec["counts"].sum() == 28
        bias = getattr(router, "e_score_correction_bias", None)
        weights, ids = select_experts(torch.from_numpy(rec["logits"]), routing, bias)
        np.testing.assert_array_equal(np.sort(rec["ids"], -1), np.sort(ids.numpy(), -1))
        np.testing.assert_allclose(np.sort(rec["weights"], -1), np.sort(weights.float().numpy(), -1), rtol=1e-5)
        for name in ("ids", "weights", "logits", "counts"):
            np.testing.assert_allclose(ours.record(layer, 0)[name], rec[name], rtol=1e-5, atol=1e-6)
    if family == "deepseek_v3":  # the dense first layer is not an MoE layer: numbers follow the decoder
        assert vanilla.meta["layer_numbers"] == [1, 2]


def test_logits_match_v5_output_router_logits():
    model = _model("qwen3_moe", "torch")
    with trace_routing(model, logits=True) as tracer:
        out = model(_ids(), output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):
        np.testing.assert_array_equal(tracer.trace.logits(layer, 0), logits.detach().numpy())


def test_hooks_only_inside_the_context_and_steps():
    model = _model("qwen3_moe", "eager")
    routers = find_routers(model)
    tracer = trace_routing(model, auto_step=False, every=2)
    with tracer:
        assert all(len(r._forward_hooks) == 1 for _, r in routers)
        for step in range(4):
            for micro in range(2):  # gradient accumulation: two forwards make one step
                model(_ids(step * 2 + micro, (1, 5)))
            tracer.next_step()
    assert all(len(r._forward_hooks) == 0 for _, r in routers) and not model._forward_pre_hooks
    model(_ids())  # not recorded
    trace = tracer.trace
    assert trace.steps == [0, 2] and trace.meta["batch_shapes"]["0"] == [[1, 5], [1, 5]]
    assert trace.ids(0, 2).shape == (10, 2) and not trace.has_logits
    with trace_routing(model) as auto:  # auto_step: each forward is a step
        model(_ids(0, (1, 3)))
        model(_ids(1, (1, 3)), attention_mask=torch.tensor([[0, 1, 1]]))
    assert auto.trace.steps == [0, 1] and auto.trace.token_mask(0) is None
    np.testing.assert_array_equal(auto.trace.token_mask(1), [0, 1, 1])


def test_checkpoint_recompute_is_not_recorded_twice():
    model = _model("mixtral", "torch")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with trace_routing(model) as tracer:
        ids = _ids()
        model(ids, labels=ids).loss.backward()
    assert tracer.trace.ids(0, 0).shape == (14, 2)


def test_save_load_roundtrip_safetensors_and_npz(tmp_path):
    model = _model("gpt_oss", "torch")
    with trace_routing(model, logits=True, logits_dtype="float16") as tracer:
        model(_ids(0), attention_mask=torch.ones(2, 7, dtype=torch.long))
        model(_ids(1))
    for name in ("t.safetensors", "t.npz"):
        path = tracer.save(tmp_path / name)
        back = load_trace(path)
        assert back.meta == json.loads(json.dumps(tracer.trace.meta))
        assert back.records.keys() == tracer.trace.records.keys()
        for key, rec in tracer.trace.records.items():
            for field, value in rec.items():
                assert back.records[key][field].dtype == value.dtype
                np.testing.assert_array_equal(back.records[key][field], value)
        np.testing.assert_array_equal(back.token_mask(0), np.ones(14))
        assert back.logits(0, 1).dtype == np.float16 and back.meta["logits_dtype"] == "float32"
        assert back.meta["dtype"] == "float32" and back.meta["model_type"] == "gpt_oss"


def test_bf16_model_trace_dtypes():
    model = _model("qwen3_moe", "torch").to(torch.bfloat16)
    with trace_routing(model, logits=True) as tracer:
        model(_ids())
    rec, meta = tracer.trace.record(0, 0), tracer.trace.meta
    assert meta["dtype"] == "bfloat16" and meta["logits_dtype"] == "bfloat16" and meta["device"] == "cpu"
    assert rec["weights"].dtype == np.float32 and rec["logits"].dtype == np.float32 and rec["ids"].dtype == np.int16


def test_trace_reads_without_torch(tmp_path):
    """A trace file is read by NumPy (and safetensors) alone: torch is made unimportable."""
    model = _model("qwen3_moe")
    with trace_routing(model, logits=True) as tracer:
        model(_ids())
    path = tracer.save(tmp_path / "t.safetensors")
    code = f"""
import sys, importlib.util
sys.modules["torch"] = None  # any import of torch now fails
def load(name):
    spec = importlib.util.spec_from_file_location(name, {str(ROOT / 'moe_lab' / 'analysis')!r} + f"/{{name}}.py")
    module = importlib.util.module_from_spec(spec); sys.modules[name] = module; spec.loader.exec_module(module); return module
trace_mod, stats_mod = load("trace"), load("stats")
t = trace_mod.load_trace({str(path)!r})
s = stats_mod.summarize(t)
print(t.num_layers, s["entropy"].shape, int(t.counts(0, 0).sum()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "(1,", "2)", "28"]


def test_per_rank_files_and_merge(tmp_path):
    """Expert parallelism on one process: per-rank naming, and load_trace merging the rank files."""
    assert rank_path("runs/t.safetensors", 1, 4).name == "t.rank00001-of-00004.safetensors"
    model = _model("qwen3_moe", "torch")
    traces = []
    for rank in range(2):
        with trace_routing(model, rank=rank, world_size=2, gather="per_rank") as tracer:
            model(_ids(rank))
        written = tracer.save(tmp_path / "t.safetensors")
        assert written == tmp_path / f"t.rank{rank:05d}-of-00002.safetensors"
        traces.append(tracer.trace)
    merged = load_trace(tmp_path / "t.safetensors")
    assert merged.meta["world_size"] == 2 and merged.meta["gather"] == "merged"
    assert merged.meta["tokens_per_rank"]["0.0"] == [14, 14]
    np.testing.assert_array_equal(merged.counts(1, 0), traces[0].counts(1, 0) + traces[1].counts(1, 0))
    np.testing.assert_array_equal(merged.ids(1, 0), np.concatenate([traces[0].ids(1, 0), traces[1].ids(1, 0)]))
    assert merge_rank_traces(traces[::-1]).records.keys() == merged.records.keys()
    with trace_routing(model, rank=0, world_size=2, gather="rank0") as tracer:
        model(_ids())
    with pytest.raises(RuntimeError, match="per_rank"):
        tracer.save(tmp_path / "x.safetensors")


_GATHER_WORKER = """
import importlib.util, sys
import torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("moe_lab_trace", {trace_py!r})
trace = importlib.util.module_from_spec(spec); sys.modules["moe_lab_trace"] = trace; spec.loader.exec_module(trace)

class Router(torch.nn.Module):  # v5-style: x [T, H] -> (logits [T, E], weights [T, k], ids [T, k])
    def __init__(self):
        super().__init__(); self.weight = torch.nn.Parameter(torch.randn(4, 3))
    def forward(self, x):
        logits = x @ self.weight.T; weights, ids = logits.softmax(-1).topk(2); return logits, weights, ids

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
        for layer in self.layers: layer.gate = Router()
    def forward(self, x):
        for layer in self.layers: layer.gate(x)

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method={init!r}, rank=rank, world_size=2)
torch.manual_seed(0); model = Model()
with trace.trace_routing(model) as tracer:  # rank and world size come from torch.distributed
    model(torch.randn(rank + 2, 3))
tracer.save({out!r})
dist.destroy_process_group()
"""


def test_gather_to_rank0_over_gloo(tmp_path):
    """gather="rank0" under torch.distributed: two gloo processes, rank 0 writes the merged trace."""
    out = tmp_path / "gathered.safetensors"
    code = _GATHER_WORKER.format(trace_py=str(ROOT / "moe_lab" / "analysis" / "trace.py"), init=f"file://{tmp_path / 'rendezvous'}", out=str(out))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    trace = load_trace(out)
    assert trace.meta["world_size"] == 2 and trace.meta["gather"] == "merged"
    assert trace.meta["tokens_per_rank"]["1.0"] == [2, 3] and trace.ids(1, 0).shape == (5, 2)
    assert trace.counts(0, 0).sum() == 10 and trace.layer_names == ["layers.0.gate", "layers.1.gate"]


# ---- statistics against brute force -----------------------------------------------------------------
@st.composite
def routings(draw):
    """(ids [T, k] distinct per token, weights [T, k], logits [T, E], E) with small odd sizes."""
    num_experts = draw(st.integers(1, 7))
    k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(0, 9))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, num_experts)).astype(np.float32)
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    if draw(st.booleans()) and tokens:  # one expert takes everything it can
        ids = np.stack([np.roll(np.arange(num_experts), -0)[:k] for _ in range(tokens)])
    weights = rng.random(size=(tokens, k)).astype(np.float32)
    return ids, weights, logits, num_experts


@settings(max_examples=40, deadline=None)
@given(routings(), st.sampled_from([0.5, 1.0, 1.25, 2.0]), st.sampled_from(["token", "slot", "weight"]))
def test_counts_cooccurrence_and_drops_match_brute_force(case, capacity_factor, priority):
    ids, weights, logits, num_experts = case
    tokens, k = ids.shape
    counts = np.zeros(num_experts, np.int64)
    pairs = np.zeros((num_experts, num_experts), np.int64)
    for row in ids:
        for e in row:
            counts[e] += 1
        for a, b in itertools.product(row, row):
            pairs[a, b] += 1
    np.testing.assert_array_equal(stats.expert_counts(ids, num_experts), counts)
    np.testing.assert_array_equal(stats.cooccurrence(ids, num_experts), pairs)
    # drops: walk the slots in priority order, filling each expert up to capacity
    cap = math.ceil(capacity_factor * tokens * k / num_experts)
    slots = [(t, j) for t in range(tokens) for j in range(k)]
    if priority == "slot":
        slots = sorted(slots, key=lambda s: (s[1], s[0]))
    elif priority == "weight":
        slots = sorted(slots, key=lambda s: -weights[s])
    used, dropped = np.zeros(num_experts, int), np.zeros((tokens, k), bool)
    for t, j in slots:
        e = ids[t, j]
        dropped[t, j] = used[e] >= cap
        used[e] += 1
    summary = stats.dropped_tokens(ids, num_experts, capacity_factor, weights, priority)
    assert summary["capacity"] == cap
    np.testing.assert_array_equal(summary["dropped_slots"], dropped)
    np.testing.assert_array_equal(summary["overflow"], np.maximum(counts - cap, 0))
    if tokens:
        np.testing.assert_allclose(stats.topk_overlap(ids, ids, num_experts), 1.0)
        load = stats.load_fractions(counts)
        assert math.isclose(load.sum(), 1.0)
        imb = stats.imbalance(counts)
        np.testing.assert_allclose(imb["max_over_mean"], counts.max() / counts.mean(), rtol=1e-6)
        np.testing.assert_allclose(imb["cv"], counts.std() / counts.mean(), rtol=1e-5, atol=1e-7)


def test_entropy_and_losses_on_known_cases():
    uniform = np.zeros((8, 4), np.float32)
    np.testing.assert_allclose(stats.router_entropy(uniform), np.log(4), rtol=1e-6)
    np.testing.assert_allclose(stats.router_entropy(uniform, normalize=True), 1.0, rtol=1e-6)
    assert stats.router_entropy(np.array([[100.0, 0, 0, 0]]))[0] < 1e-6
    # perfectly balanced routing with uniform probabilities: Switch = k, per slot = 1, DeepSeek = 1
    ids = np.array([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert math.isclose(float(stats.switch_aux_loss(uniform[:4], ids, 4)), 2.0, rel_tol=1e-6)
    assert math.isclose(float(stats.switch_aux_loss(uniform[:4], ids, 4, per_slot=True)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(stats.deepseek_seq_aux_loss(uniform[:4], ids, 4, seq_len=2)), 1.0, rel_tol=1e-6)
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(stats.z_loss(logits), (torch.logsumexp(torch.from_numpy(logits), -1) ** 2).mean().item(), rtol=1e-6)
    fr = stats.load_fractions(np.array([[1, 1, 0], [0, 1, 1], [1, 1, 0]]))
    np.testing.assert_allclose(stats.load_drift(fr), [0.5, 0.5])
    np.testing.assert_allclose(stats.load_drift(fr, "first", "js")[0], 0.0, atol=1e-7)
    hist, edges = stats.topk_weight_histogram(np.array([[0.7, 0.3], [0.6, 0.4]]), bins=10)
    assert hist.shape == (2, 10) and hist.sum() == 4 and len(edges) == 11
    assert set(stats.aux_losses(logits, ids[:3].repeat(2, 0)[:6], 5, seq_len=3)) == {"switch", "switch_per_slot", "z_loss", "deepseek_seq"}


@pytest.mark.parametrize("masked", [False, True])
def test_v5_load_balancing_loss_matches_transformers(masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(12, 6, generator=g) for _ in range(3))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]) if masked else None
    ref = load_balancing_loss_func(layers, 6, 2, mask)
    got = stats.v5_load_balancing_loss([x.numpy() for x in layers], 6, 2, None if mask is None else mask.numpy())
    assert math.isclose(float(got), float(ref), rel_tol=1e-5)
    if not masked:  # one layer: the v5 loss is the Switch/Mixtral loss of that layer
        one = load_balancing_loss_func(layers[:1], 6, 2)
        ids = torch.topk(layers[0], 2).indices.numpy()
        assert math.isclose(float(stats.switch_aux_loss(layers[0].numpy(), ids, 6)), float(one), rel_tol=1e-5)


def test_stats_run_on_jax_arrays_and_differentiate():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 6)).astype(np.float32)
    ids = np.argsort(-logits, -1)[:, :2]
    for fn in (lambda l, i: stats.expert_counts(i, 6), lambda l, i: stats.cooccurrence(i, 6),
               lambda l, i: stats.router_entropy(l), lambda l, i: stats.switch_aux_loss(l, i, 6),
               lambda l, i: stats.deepseek_seq_aux_loss(l, i, 6, 5), lambda l, i: stats.z_loss(l),
               lambda l, i: stats.dropped_slots(i, 6, 1.0), lambda l, i: stats.cooccurrence_lift(i, 6)):
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(logits), jnp.asarray(ids))), fn(logits, ids), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda l: stats.switch_aux_loss(l, jnp.asarray(ids), 6) + 1e-3 * stats.z_loss(l))(jnp.asarray(logits))
    assert grad.shape == (10, 6) and bool(jnp.isfinite(grad).all())


def test_summarize_a_trace():
    model = _model("deepseek_v3", "torch")
    with trace_routing(model, logits=True) as tracer:
        for step in range(3):
            model(_ids(step))
    s = stats.summarize(tracer.trace)
    assert s["load"].shape == (3, 2, 6) and s["entropy"].shape == (3, 2)
    assert np.isfinite(s["entropy"]).all() and (s["max_over_mean"] >= 1).all()
    np.testing.assert_allclose(s["load"].sum(-1), 1.0)
    assert stats.load_matrix(tracer.trace).shape == (2, 6)
    assert isinstance(tracer.trace, RoutingTrace) and "deepseek" in repr(tracer.trace)
