"""experiments.ep_model: the arithmetic on a hand-computed input, the extraction from the committed
runs, and the check mode (CPU, a few seconds)."""
import copy
import json
from pathlib import Path

import pytest
import yaml

from experiments import ep_model

ROOT = ep_model.ROOT


def tiny_inputs() -> dict:
    """1 layer, H 1000, 4 experts, top-2, 1000 tokens; bandwidths in GB/s chosen so bytes / 1e6 = ms."""
    one = {"fwd": dict.fromkeys(ep_model.STAGES, 0.0), "bwd": dict.fromkeys(ep_model.STAGES, 0.0)}
    one["fwd"]["experts"] = one["bwd"]["experts"] = 1.0
    return {
        "geometry": {"value": dict(hidden=1000, experts=4, top_k=2, expert_width=10, heads=1, kv_heads=1, head_dim=10,
                                   vocab=100, tied_embeddings=False, seq=1000, bytes_per_element=2)},
        "baselines": {"b": dict(layers=1, non_moe_fwd_ms=1.0, non_moe_bwd_ms=2.0, moe_fwd_ms=1.0, moe_bwd_ms=2.0,
                                head_loss_fwd_ms=0.5, head_loss_bwd_ms=0.5, optimizer_ms=10.0, other_ms=0.0)},
        "moe_stage_shares": {"value": one},
        "routing": {"uniform": {"by_ep": ep_model.routing_stats(None, 4, 2, (2,))},
                    "hot": {"by_ep": {2: {"imbalance": 1.5, "ranks_per_token": 1.0}}}},
        "bandwidth_GBps": dict(all2all=1.0, deepep_dispatch=1.0, deepep_combine=2.0, collective=1.0, copy=1000.0),
        "gpus": {"h200": {"compute_factor": 1.0, "memory_factor": 1.0}},
        "published": {"tokens_per_s_per_gpu": [1, 2], "source": "test"},
        "scenarios": [],
    }


def test_param_counts_by_hand():
    pc = ep_model.param_counts(tiny_inputs()["geometry"]["value"])
    assert pc == {"expert": 120000, "layer_non_expert": 46020, "head_embed": 201000}


def test_uniform_remote_ranks():
    # 4 experts, 2 per rank, top-2: the other rank is missed only when both picks are local: C(2,2)/C(4,2) = 1/6
    assert ep_model.routing_stats(None, 4, 2, (2,))[2] == {"imbalance": 1.0, "ranks_per_token": pytest.approx(5 / 6)}


def test_arithmetic_all2all_ep2_by_hand():
    r = ep_model.predict_one(tiny_inputs(), dict(name="t", baseline="b", ep=2))
    # a2a: 1000 tokens x 1 row (k (EP-1)/EP) x 2000 B = 2e6 B; dispatch + combine at 1 GB/s = 4 ms each direction
    assert r["a2a_bytes_per_rank_layer_direction"] == 2e6
    reorder = 4 * 2 * 1000 * 2 * 2000 / 1e12 * 1e3 / 2     # 0.016 ms each direction
    ar_layer, ar_head = 46020 * 2 / 1e6, 201000 * 2 / 1e6  # all-reduce 2(n-1)/n = 1 x bytes at 1 GB/s
    opt = 10.0 * (120000 / 2 + 46020 + 201000) / (120000 + 46020 + 201000)
    serial = (2 + reorder + 4) + (4 + reorder + 4 + ar_layer) + 0.5 + (0.5 + ar_head) + opt
    overlap = max(2 + reorder, 4) + max(4 + reorder, 4 + ar_layer) + 0.5 + max(0.5, ar_head) + opt
    assert r["optimizer_ms"] == pytest.approx(opt)
    assert r["step_ms_serial"] == pytest.approx(serial)
    assert r["step_ms_overlap"] == pytest.approx(overlap)
    assert r["tokens_per_s_per_gpu_serial"] == pytest.approx(1000 / serial * 1e3)
    assert r["comm_ms"] == pytest.approx(8 + ar_layer + ar_head)


def test_arithmetic_deepep_imbalance_fsdp_and_accumulation():
    inp = tiny_inputs()
    r = ep_model.predict_one(inp, dict(name="t", baseline="b", ep=2, dispatcher="deepep"))
    a2a = (5 / 6) * 2000 * 1000 / 1e6 * (1 + 0.5)  # dispatch at 1 GB/s + combine at 2 GB/s; no reorder
    opt = 10.0 * (60000 + 46020 + 201000) / 367020
    assert r["step_ms_serial"] == pytest.approx((2 + a2a) + (4 + a2a + 46020 * 2 / 1e6) + 0.5 + 0.5 + 201000 * 2 / 1e6 + opt)
    # the busiest rank: 1.5x rows -> experts stage and bytes x 1.5; FSDP 2: all-gather fwd, all-gather +
    # reduce-scatter bwd ((n-1)/n = 1/2 of the bytes); 2 micro-batches of 2 sequences
    r = ep_model.predict_one(inp, dict(name="t", baseline="b", ep=2, dispatcher="deepep", routing="hot", fsdp=2,
                                       micro_batch=2, grad_accum=2))
    a2a = 1.0 * 2000 * 2000 * 1.5 / 1e6 * 1.5
    layer_f, layer_b = 2 * 1 + 2 * 1 * 1.5, 2 * 2 + 2 * 2 * 1.5
    fs_l, fs_h = 46020 * 2 / 2 / 1e6, 201000 * 2 / 2 / 1e6
    micro = (layer_f + a2a + fs_l) + (layer_b + a2a + 2 * fs_l) + (1.0 + fs_h) + (1.0 + 2 * fs_h)
    opt = 10.0 * (60000 + 46020 / 2 + 201000 / 2) / 367020
    assert r["step_ms_serial"] == pytest.approx(2 * micro + opt)
    assert r["tokens_per_s_per_gpu_serial"] == pytest.approx(4000 / (2 * micro + opt) * 1e3)


def test_ep1_has_no_communication():
    r = ep_model.predict_one(tiny_inputs(), dict(name="t", baseline="b", ep=1))
    assert r["comm_ms"] == 0 and r["step_ms_serial"] == r["step_ms_overlap"] == pytest.approx(1 + 2 + 1 + 2 + 1 + 10)


def test_extraction_reproduces_the_committed_inputs():
    committed = yaml.safe_load((ROOT / "results/ep-model/inputs.yaml").read_text())
    fresh = yaml.safe_load(yaml.safe_dump(ep_model.extract(), sort_keys=False, width=200))
    assert fresh == committed
    b = fresh["baselines"]["triton"]  # the breakdown's triton row (a93c99d): fwd_moe 12.2 ms over 8 layers
    assert ep_model.v(b["moe_fwd_ms"]) == pytest.approx(12.2 / 8, abs=0.01)
    assert b["moe_fwd_ms"]["source"].startswith("results/runs/h200x1-breakdown/breakdown.json")
    shares = ep_model.v(fresh["moe_stage_shares"])
    assert all(sum(s.values()) == pytest.approx(1.0) for s in shares.values())
    assert shares["bwd"]["experts"] > 0.8  # the grouped GEMMs dominate the block
    for entry in [*fresh["bandwidth_GBps"].values(), *b.values()]:
        assert not isinstance(entry, dict) or entry["source"]  # every number says where it came from


def test_check_mode_on_the_committed_ep2_run():
    inp = yaml.safe_load((ROOT / "results/ep-model/inputs.yaml").read_text())
    rows = ep_model.check(inp, ROOT / "results/runs/h200x2-3")
    assert {(r["system"], r["routing"]) for r in rows} == {
        ("ep2-all2all-triton", "real"), ("ep2-all2all-triton", "skewed"),
        ("ep2-deepep-triton", "real"), ("ep2-deepep-triton", "skewed")}
    a2a = next(r for r in rows if r["system"] == "ep2-all2all-triton" and r["routing"] == "real")
    assert a2a["measured_tokens_per_s_per_gpu"] == pytest.approx(31281.6, abs=1)
    assert a2a["ratio"] == pytest.approx(a2a["predicted_tokens_per_s_per_gpu"] / a2a["measured_tokens_per_s_per_gpu"])


def test_check_mode_fails_outside_tolerance(tmp_path):
    inp = tiny_inputs()
    predicted = ep_model.predict_one(inp, dict(name="t", baseline="b", ep=2))["tokens_per_s_per_gpu_serial"]
    (tmp_path / "run" / "cells").mkdir(parents=True)
    inputs = tmp_path / "inputs.yaml"
    inputs.write_text(yaml.safe_dump(inp))

    def cell(name, measured):
        (tmp_path / "run" / "cells" / f"{name}.json").write_text(json.dumps({
            "status": "ok", "git": {"commit": "0" * 40}, "metrics": {"tokens_per_s_per_gpu": measured, "step_ms": 1.0},
            "spec": {"system": "ep2-all2all-triton", "layers": 1, "batch": 1, "routing": "uniform"}}))

    cell("a", predicted * 1.1)  # within 15%
    args = ["--inputs", str(inputs), "--out", str(tmp_path / "out"), "--check", str(tmp_path / "run")]
    assert ep_model.main(args) == 0
    cell("b", predicted / 1.2)  # predicted 20% high: outside
    assert ep_model.main(args) == 1
    out = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert [c["within"] for c in out["check"]] == [True, False]
    assert "1 of 2 cells within 15%" in (tmp_path / "out" / "table.md").read_text()


def test_check_mode_refuses_a_run_without_ep_cells(tmp_path):
    (tmp_path / "cells").mkdir()
    with pytest.raises(SystemExit, match="no ok cell"):
        ep_model.check(tiny_inputs(), tmp_path)
