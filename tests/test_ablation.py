"""experiments.ablation and experiments.text_data: the data split, the sweep file, a tiny sweep that
records what it must, survives a failing and a crashing cell, resumes, and reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import ablation, store, text_data

TINY = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "head_dim": 8, "num_experts": 4, "top_k": 2,
        "expert_width": 16, "batch": 2, "seq": 16, "steps": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1,
        "device": "cpu", "backend": "torch", "max_train_bytes": 20000, "max_heldout_bytes": 4000}


def test_split_is_by_file_and_deterministic(tmp_path):
    for i in range(60):
        (tmp_path / ("pkg" if i % 2 else "") / f"m{i}.py").parent.mkdir(exist_ok=True)
        (tmp_path / ("pkg" if i % 2 else "") / f"m{i}.py").write_text(f"x = {i}\n" * 50)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third.py").write_text("no")
    files = text_data.list_files(tmp_path)
    assert len(files) == 60 and not any("site-packages" in f for f in files)
    train, held = text_data.split_files(files, 0.2)
    assert set(train) | set(held) == set(files) and not set(train) & set(held) and held
    # a file's side depends on its path alone: removing other files changes nothing
    train2, held2 = text_data.split_files(files[:30], 0.2)
    assert set(held2) == set(held) & set(files[:30])
    c1 = text_data.load_corpus(3000, 1000, 0.2, root=tmp_path)
    c2 = text_data.load_corpus(3000, 1000, 0.2, root=tmp_path)
    assert c1.train == c2.train and c1.describe() == c2.describe() and len(c1.train) == 3000
    assert c1.heldout.startswith((tmp_path / held[0]).read_bytes()) and c1.train.startswith((tmp_path / train[0]).read_bytes())
    b1, b2 = text_data.Batches(c1, 3, 16, seed=5), text_data.Batches(c1, 3, 16, seed=5)
    assert torch.equal(b1.train_batch(7), b2.train_batch(7)) and not torch.equal(b1.train_batch(7), b1.train_batch(8))
    assert b1.train_batch(0).shape == (3, 16) and int(b1.train_batch(0).max()) < 256
    assert [torch.equal(a, b) for a, b in zip(b1.heldout_batches(2), b2.heldout_batches(2))] == [True, True]


def test_stdlib_corpus_has_heldout_files():
    c = text_data.load_corpus(50_000, 10_000)
    info = c.describe()
    assert info["heldout_files"] > 0 and info["train_files"] > 5 * info["heldout_files"]
    assert info["train_bytes"] == 50_000 and len(info["digest"]) == 16


def test_sweep_file_is_checked(tmp_path):
    conf = {"name": "t", "defaults": dict(TINY), "settings": [{"name": "a"}, {"name": "b", "balancing": "aux_free"}],
            "seeds": [0, 1]}
    ablation.check(conf)
    specs = ablation.expand(conf)
    assert [s["name"] for s in specs] == ["a", "a", "b", "b"] and [s["seed"] for s in specs] == [0, 1, 0, 1]
    assert len({ablation.cell_id(s) for s in specs}) == 4
    for bad, msg in [({"settings": [{"name": "a", "balancing": "magic"}]}, "balancing"),
                     ({"settings": [{"name": "a", "topk": 2}]}, "unknown cell key"),
                     ({"settings": [{"name": "a"}, {"name": "a"}]}, "twice"),
                     ({"settings": [{"name": "a", "shared_experts": 1}]}, "shared experts"),
                     ({"settings": [{"balancing": "none"}]}, "name"),
                     ({"colour": "red"}, "unknown key")]:
        with pytest.raises(ValueError, match=msg):
            ablation.check({**conf, **bad})
    for preset in ablation.presets():
        c = ablation.load(preset)
        names = {s["name"] for s in ablation.expand(c)}
        assert len(ablation.expand(c)) == len(names) * len(c["seeds"]) >= 4


def test_sweep_records_fails_resumes_and_reports(tmp_path, monkeypatch):
    conf = {"name": "tiny", "defaults": {**TINY, "trace_steps": [0, 3]},
            "settings": [{"name": "aux-cf1", "balancing": "aux_loss", "capacity_factor": 1.0},
                         {"name": "broken", "fail_at": "step"},
                         {"name": "sigmoid-free", "score": "sigmoid", "balancing": "aux_free", "bias_update_rate": 0.05}],
            "seeds": [0]}
    run = tmp_path / "run"
    recs = ablation.run_sweep(conf, run, isolate=False, progress=False)
    assert [r["status"] for r in recs] == ["ok", "failed", "ok"]
    assert "injected failure at step 1" in recs[1]["error"]
    ok = recs[0]
    cols = ok["samples"]
    for key in ("loss", "tokens_per_s", "max_over_mean", "cv", "dropped_frac", "entropy", "aux_loss"):
        assert len(cols[key]) == 4, key
    assert len(cols["max_over_mean"][0]) == 1  # one value per MoE layer
    assert any(d > 0 for row in cols["dropped_frac"] for d in row) and all(a > 0 for a in cols["aux_loss"])
    assert [e["step"] for e in ok["evals"]] == [2, 4] and ok["final"]["heldout_loss"] == ok["evals"][-1]["heldout_loss"]
    assert recs[2]["samples"]["bias_absmax"][-1][0] > 0 and all(d == [0.0] for d in recs[2]["samples"]["dropped_frac"])
    from moe_lab.analysis.trace import load_trace

    trace = load_trace(run / ok["trace"])
    assert trace.steps == [0, 3] and trace.has_logits
    manifest = store.read_json(run / "manifest.json")
    assert manifest["state"] == "finished" and [c["status"] for c in manifest["cells"]] == ["ok", "failed", "ok"]
    # the same seed: the same data and the same initial weights, whatever the routing
    assert recs[0]["samples"]["loss"][0] == pytest.approx(recs[2]["samples"]["loss"][0], rel=0.02)

    # resume: nothing reruns; --retry-failed reruns only the failed cell
    calls = []
    real = ablation.run_cell_safely
    monkeypatch.setattr(ablation, "run_cell_safely", lambda spec, *a, **k: calls.append(spec["name"]) or real(spec, *a, **k))
    again = ablation.run_sweep(conf, run, isolate=False, progress=False)
    assert calls == [] and [r["status"] for r in again] == ["ok", "failed", "ok"]
    ablation.run_sweep(conf, run, isolate=False, progress=False, retry_failed=True)
    assert calls == ["broken"]
    assert "previous_invocations" in store.read_json(run / "manifest.json")

    paths = ablation.write_report(run, tmp_path / "report")
    text = paths[0].read_text()
    assert "| aux-cf1 |" in text and "0 / 1 (failed)" in text and "CPU run" in text
    assert paths[1].stat().st_size > 1000


def test_isolated_cell_that_dies_is_recorded(tmp_path):
    conf = {"name": "iso", "defaults": dict(TINY), "settings": [{"name": "crash", "fail_at": "crash"}], "seeds": [0]}
    (rec,) = ablation.run_sweep(conf, tmp_path / "iso", isolate=True, progress=False)
    assert rec["status"] == "failed" and "exited with 17" in rec["error"]
    saved = json.loads((tmp_path / "iso" / "cells" / f"{rec['cell_id']}.json").read_text())
    assert saved["launcher"]["returncode"] == 17


def test_cells_run_side_by_side_in_file_order(tmp_path):
    conf = {"name": "two", "defaults": dict(TINY),
            "settings": [{"name": "ok"}, {"name": "crash", "fail_at": "crash"}, {"name": "free", "balancing": "aux_free"}],
            "seeds": [0]}
    recs = ablation.run_sweep(conf, tmp_path / "two", isolate=True, progress=False, jobs=2)
    assert [r["setting"] for r in recs] == ["ok", "crash", "free"]
    assert [r["status"] for r in recs] == ["ok", "failed", "ok"]
    assert {r["launcher"]["cells_at_once"] for r in recs} == {2}
    manifest = store.read_json(tmp_path / "two" / "manifest.json")
    assert [c["status"] for c in manifest["cells"]] == ["ok", "failed", "ok"] and manifest["state"] == "finished"
    assert "2 cells at once" in ablation.report_markdown(manifest, recs, "two")


def test_an_interrupted_cell_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path, monkeypatch):
    spec = ablation.normalise({**TINY, "name": "free", "balancing": "aux_free", "bias_update_rate": 0.05,
                               "steps": 6, "checkpoint_every": 2, "trace_steps": [0, 5]})
    assert ablation.cell_id(spec) == ablation.cell_id({**spec, "checkpoint_every": 0})  # not part of the id
    whole = ablation.run_cell(spec, tmp_path / "whole")
    real_lr = ablation._lr_at

    def stop_at_5(s, step):
        if step == 5:
            raise KeyboardInterrupt("the machine's time ran out")
        return real_lr(s, step)

    monkeypatch.setattr(ablation, "_lr_at", stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_cell(spec, tmp_path / "cut")
    state = ablation.state_path_of(tmp_path / "cut", ablation.cell_id(spec))
    assert state.exists()  # saved after steps 2 and 4
    monkeypatch.setattr(ablation, "_lr_at", real_lr)
    resumed = ablation.run_cell(spec, tmp_path / "cut")
    assert resumed["resumed_from_step"] == 4 and whole["resumed_from_step"] is None and not state.exists()
    for key in ("loss", "aux_loss", "grad_norm", "bias_absmax", "max_over_mean"):
        assert resumed["samples"][key] == whole["samples"][key], key
    assert resumed["evals"] == whole["evals"] and resumed["final"]["heldout_loss"] == whole["final"]["heldout_loss"]
    from moe_lab.analysis.trace import load_trace

    assert load_trace(tmp_path / "cut" / resumed["trace"]).steps == [0, 5]


def test_oom_is_told_apart():
    assert ablation._status_of(RuntimeError("CUDA out of memory. Tried to allocate")) == "oom"
    assert ablation._status_of(ValueError("bad")) == "failed"


def test_the_step_log_reads_steps_back_together_and_names_a_non_finite_step():
    """Steps stay on the device until a flush; the flush fills every column in order, and a non-finite
    loss fails with the step it happened at, not the flush's."""
    import math

    import torch

    log = ablation._StepLog(torch.device("cpu"), tokens_per_step=64)
    routed = {"layers": ["l0"], "counts": torch.tensor([[3, 1]]), "kept": torch.tensor([[3, 1]]),
              "dropped": torch.tensor([0]), "tokens": [2], "entropy": torch.tensor([1.0], dtype=torch.float64),
              "bias_absmax": torch.tensor([0.5])}
    cols = {k: [] for k in ("step", "loss", "aux_loss", "lr", "step_s", "tokens_per_s", "grad_norm",
                            "max_over_mean", "cv", "dropped_frac", "entropy", "bias_absmax")}
    for step, loss in enumerate([2.0, 1.5]):
        log.add(step, log.start(), torch.tensor(loss), 0.0, 1e-3, torch.tensor(0.25), routed)
    log.flush_into(cols, top_k=2)
    assert cols["step"] == [0, 1] and cols["loss"] == [2.0, 1.5] and cols["entropy"] == [[0.5], [0.5]]
    assert cols["max_over_mean"] == [[1.5], [1.5]] and not log.pending
    log.add(2, log.start(), torch.tensor(1.0), 0.0, 1e-3, torch.tensor(0.25), routed)
    log.add(3, log.start(), torch.tensor(math.nan), 0.0, 1e-3, torch.tensor(0.25), routed)
    with pytest.raises(FloatingPointError, match="at step 3"):
        log.flush_into(cols, top_k=2)
