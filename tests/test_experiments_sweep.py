"""The sweep end to end on the CPU: cells in their own processes, failures recorded, resume, report.

One module-scoped sweep of four tiny cells (first an injected failure, then a crash without a
record, then two good cells on two systems) serves every test here.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from experiments import cell, report, store, sweep, systems


def moe_lab_deepep_usable() -> bool:
    from moe_lab.parallel.deepep import why_deepep_unavailable

    return why_deepep_unavailable() is None

TINY = {"model": "tiny-qwen3-moe", "layers": 1, "batch": 1, "seq": 32, "dtype": "fp32", "optimizer": "adamw",
        "warmup": 1, "steps": 2, "device": "cpu"}


def _conf(name="t"):
    return {"name": name, "defaults": TINY, "cell_timeout_s": 120, "env": {"OMP_NUM_THREADS": "1"},
            "cells": [{"system": "v5-grouped_mm", "fail_at": "step"},
                      {"system": "v5-grouped_mm", "fail_at": "crash"},
                      {"system": "v5-grouped_mm", "routing": "skewed"},
                      {"system": "torch", "routing": "skewed"}]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    run_dir = root / "runs" / "t"
    records = sweep.run_sweep(_conf(), run_dir, progress=False)
    return root, run_dir, records


def test_two_cells_end_to_end(swept):
    _, run_dir, records = swept
    ok = [r for r in records if r["status"] == "ok"]
    assert [r["spec"]["system"] for r in ok] == ["v5-grouped_mm", "torch"]
    for r in ok:
        m = r["metrics"]
        assert len(r["samples"]) == 3 and [s["warmup"] for s in r["samples"]] == [True, False, False]
        assert m["step_ms"] > 0 and m["tokens_per_s_per_gpu"] > 0 and m["tflops_per_gpu"] > 0
        assert m["loss_finite"] and r["versions"]["transformers"] and r["git"]["commit"]
        assert (run_dir / "cells" / f"{r['cell_id']}.json").exists()
        assert isinstance(r["env"], dict) and isinstance(r["autotune"], dict)  # the cell's switches and tiles
        assert r["system_spec"]["name"] == r["spec"]["system"]  # the resolved spec and the Options it used
    assert (ok[0]["options"], ok[0]["options_changed"]) == (None, None)  # v5 builds no moe_lab model
    assert ok[1]["options_changed"] == {"fused_norm": False, "fused_rope": False}  # no variant word: off
    assert ok[1]["options"]["autotune"] is True
    # same seed, same weights and routing: the same first-step loss on v5 and on moe_lab
    assert ok[0]["metrics"]["first_loss"] == pytest.approx(ok[1]["metrics"]["first_loss"], rel=1e-5)
    manifest = store.read_json(run_dir / "manifest.json")
    assert manifest["state"] == "finished" and len(manifest["cells"]) == 4
    assert manifest["provenance"]["git"]["commit"] and "torch" in manifest["provenance"]["versions"]
    assert manifest["seeds"] == [0]
    assert not list(run_dir.rglob("*.tmp"))


def test_failures_recorded_and_sweep_continues(swept):
    _, _, records = swept
    failed, crashed = records[0], records[1]
    assert failed["status"] == "failed" and "injected failure at step 1" in failed["error"]
    assert "Traceback" in failed["traceback"] and failed["launcher"]["returncode"] == 3
    assert crashed["status"] == "failed" and "exited with 17" in crashed["error"]
    assert records[2]["status"] == "ok" and records[3]["status"] == "ok"


def test_resume_skips_finished_cells(swept, monkeypatch):
    _, run_dir, records = swept
    calls = []
    monkeypatch.setattr(sweep, "run_one", lambda spec, *a, **k: calls.append(spec) or {"status": "ok", "cell_id": cell.cell_id(spec)})
    again = sweep.run_sweep(_conf(), run_dir, progress=False)
    assert calls == [] and [r["cell_id"] for r in again] == [r["cell_id"] for r in records]
    sweep.run_sweep(_conf(), run_dir, progress=False, retry_failed=True)
    assert [c["fail_at"] for c in calls] == ["step", "crash"]


def test_report_is_byte_identical_and_merges_summary(swept, tmp_path):
    _, run_dir, _ = swept
    summary = tmp_path / "summary.json"
    store.write_json(summary, {"h200x1/other/unrelated": {"step_ms": 1.0}})
    outs = []
    for i in range(2):
        out = tmp_path / f"report{i}"
        report.generate(run_dir.parent, out, summary)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] and "results.md" in outs[0] and "results.csv" in outs[0]
    data = json.loads(summary.read_text())
    assert data["h200x1/other/unrelated"] == {"step_ms": 1.0}
    key_v5, key_ml = "cpux1/tiny-qwen3-moe-L1/v5-grouped_mm@skewed", "cpux1/tiny-qwen3-moe-L1/torch@skewed"
    assert set(data) == {"h200x1/other/unrelated", key_v5, key_ml}
    assert set(data[key_ml]) == set(report.SUMMARY_FIELDS) and data[key_ml]["run"] == "t"
    md = outs[0]["results.md"].decode()
    assert "| torch | skewed | ok |" in md and "**failed**" in md
    assert summary.read_bytes() == store.dumps(data).encode()


def test_system_names():
    assert systems.parse("v5-grouped_mm").experts_impl == "grouped_mm"
    assert systems.parse("v5-fsdp2-grouped_mm").kind == "v5-fsdp2"
    s = systems.parse("ep2-all2all-torch")
    assert (s.kind, s.ep, s.dispatcher, s.moe_backend) == ("moe_lab-ep", 2, "all2all", "torch")
    sharded = systems.parse("ep2-all2all-triton-fsdp")
    assert (sharded.moe_backend, sharded.ep, dict(sharded.options)) == ("triton", 2, {"fsdp": True})
    fused = systems.parse("triton-fusedce")
    assert (fused.moe_backend, dict(fused.options)) == ("triton", {"fused_cross_entropy": True})


@pytest.mark.skipif(moe_lab_deepep_usable(), reason="DeepEP is usable here")
def test_dispatcher_that_cannot_run_here_is_recorded_unavailable():
    """deepep without DeepEP (or a GPU): its cells are recorded as unavailable, not as crashes."""
    from experiments import models

    s = systems.parse("ep2-deepep-torch")
    with pytest.raises(RuntimeError) as e:
        systems.build_model(s, models.build_config("tiny-qwen3-moe"), dtype=None, attn="sdpa", device="cpu", world=2)
    assert cell.classify(e.value) == "unavailable"
    assert "DeepEP" in str(e.value)


def test_presets_expand():
    from experiments import grid

    for name in grid.presets():
        specs = grid.expand(grid.load(name))
        assert specs and len({cell.cell_id(s) for s in specs}) == len(specs)
    h1 = grid.expand(grid.load("h200x1"))
    assert {s["system"] for s in h1} == {"v5-eager", "v5-grouped_mm", "torch", "triton", "triton_gather", "triton-fusedce",
                                               "triton_gather-optbwd", "triton_gather-fusedce-optbwd", "te", "te-cutlass"}
    assert {s["routing"] for s in h1} == {"real", "balanced", "skewed"}
    assert all(s["seq"] == 4096 and s["layers"] == 8 and s["dtype"] == "bf16" for s in h1)


def test_system_variants_combine():
    s = systems.parse("triton_gather-fusedce-optbwd")
    assert (s.moe_backend, dict(s.options), s.optimizer_in_backward) == (
        "triton_gather", {"fused_cross_entropy": True}, True)
    assert systems.parse("te-cutlass-optbwd").moe_backend == "te_cutlass"
    assert systems.parse("ep2-deepep-triton-fusedce-fsdp").options == (("fsdp", True), ("fused_cross_entropy", True))
    s = systems.parse("triton_gather-fusedce-optstream")
    assert (s.options, s.optimizer_in_backward, s.optimizer_side_stream) == ((("fused_cross_entropy", True),), True, True)
    assert dict(systems.parse("triton-fusedce-fusednorm-fusedrope-graphs-optstream").options) == {
        "fused_cross_entropy": True, "fused_norm": True, "fused_rope": True, "cuda_graphs": True}
    v5 = systems.parse("v5-grouped_mm-optstream")
    assert (v5.kind, v5.experts_impl, v5.optimizer_side_stream) == ("v5", "grouped_mm", True)


@pytest.mark.parametrize("name,match", [
    ("ep2-deepep-triton-fsdp-fusedce", "'ep2-deepep-triton-fusedce-fsdp'"),  # one name per configuration
    ("triton-cutlass", "TransformerEngine"),
    ("triton-fast", "unknown variant 'fast'"),
    ("ep2-all2all-triton-optbwd", "one-process only"),
    ("triton-fusedce-fusedce", "repeats"),
    ("v5-grouped_mm-fusedce", "v5 systems take only"),
    ("triton-optbwd-optstream", "exclude each other"),
    ("v5-fsdp2-grouped_mm-optstream", "take no variants"),
])
def test_bad_system_names_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        systems.parse(name)


def test_summary_takes_the_latest_measurement_not_the_last_run_name(monkeypatch):
    """Run names are not chronological ("h200x1-te" sorts after "h200x1-step-4"): the summary orders
    runs by the depth of the commit they measured, then by name."""
    from experiments import report

    depth = {"old": 10, "new": 20}
    monkeypatch.setattr(report, "commit_depth", lambda c: depth.get(c, -1))
    rows = [{"run": "h200x1-te", "commit": "old", "key": "k", "status": "ok", "ms": 3.5},
            {"run": "h200x1-block-4", "commit": "new", "key": "k", "status": "ok", "ms": 3.1}]
    assert report.block_summary_entries(rows)["k"]["ms"] == 3.1
    assert [r["run"] for r in report.latest_first_order(rows)] == ["h200x1-te", "h200x1-block-4"]
    rows[0]["commit"] = rows[1]["commit"] = None  # unknown commits: run-name order, as before
    assert report.block_summary_entries(rows)["k"]["ms"] == 3.5


def test_commit_depth_of_this_checkout():
    from experiments import report

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=report.REPO_ROOT).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert report.commit_depth(head) >= 1 and report.commit_depth("0" * 40) == -1


def test_attention_report_skips_empty_runs_and_escapes_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    store.write_json(tmp_path / "a" / "attention.json", {"kind": "attention", "rows": [], "provenance": {}})
    row = dict(model="m", tokens=8, heads=4, kv_heads=2, head_dim=16, flops=1.0)
    store.write_json(tmp_path / "b" / "attention.json", {"kind": "attention", "provenance": {}, "rows": [
        dict(row, batch=1, path="flash", status="ok", ms=1.0, ms_forward=0.5, tflops=1.0),
        dict(row, batch=1, path="cudnn", status="failed", error="RuntimeError: a|b")]})
    text = report.attention_markdown(tmp_path)
    assert "## a:" not in text and "a\\|b" in text
    assert "| 1 | flash | ok | 1.000 | 0.500 | 1.0 | - | - |" in text  # no sdpa row: no ratio, no differences


def test_activation_with_the_optimizer_in_backward_does_not_subtract_gradients():
    """Gradients freed one by one (-optbwd, -optstream) are not held between steps: activation is the
    peak less parameters and optimizer state, also for records that subtracted every gradient."""
    metrics = {"peak_gib": 36.9, "activation_gib": -4.9,
               "static_gib": {"params": 10.0, "grads": 10.0, "optimizer": 21.8}}
    assert report._activation_gib("triton-fusedce-optstream", metrics) == pytest.approx(5.1)
    assert report._activation_gib("triton-optbwd", metrics) == pytest.approx(5.1)
    assert report._activation_gib("triton-fusedce", metrics) == -4.9  # gradients persist: as recorded
    assert report._activation_gib("v5-grouped_mm-cudnnattn", metrics) == -4.9  # a removed variant's name


def test_static_bytes_counts_gradients_only_when_they_persist():
    import torch

    model = torch.nn.Linear(4, 3)  # 15 float32 parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert cell.static_bytes(model, optimizer) == {"params": 60, "grads": 60, "optimizer": 0}
    assert cell.static_bytes(model, optimizer, grads_persist=False)["grads"] == 0


def test_a_run_with_a_behaviour_flag_keeps_its_own_summary_key(swept, tmp_path):
    """A run made with MOE_LAB_HOST_CHECKS=1 (an A/B of the host syncs) must not stand for the system."""
    import shutil

    _, run_dir, _ = swept
    runs = {}
    for name, env in (("plain", {}), ("flagged", {"MOE_LAB_HOST_CHECKS": "1"})):
        runs[name] = tmp_path / name
        shutil.copytree(run_dir, runs[name])
        manifest = store.read_json(runs[name] / "manifest.json")
        manifest["provenance"]["env"] = dict(env)  # whatever this machine's environment held
        manifest["sweep"]["env"] = {}
        store.write_json(runs[name] / "manifest.json", manifest)
        for cell_file in (runs[name] / "cells").glob("*.json"):
            rec = store.read_json(cell_file)
            for own in ("env", "options", "options_changed", "system_spec"):
                rec.pop(own, None)  # as records before cells kept their own switches
            store.write_json(cell_file, rec)
    assert report.run_flags(runs["flagged"]) == {"MOE_LAB_HOST_CHECKS": "1"}
    assert report.run_flags(runs["plain"]) == {}
    keys = {r["run"]: r["key"] for r in report.collect_rows(list(runs.values())) if r["system"] == "torch"}
    assert keys["flagged"] == keys["plain"] + "+MOE_LAB_HOST_CHECKS=1"


def test_behaviour_flags_read_on_off_as_the_code_does_and_cells_keep_their_own():
    assert report.env_flags({"MOE_LAB_TRITON_TMA": ""}) == {}  # "" is off, the default
    assert report.env_flags({"MOE_LAB_TRITON_TMA": "true"}) == {"MOE_LAB_TRITON_TMA": "1"}
    assert report.env_flags({"MOE_LAB_TRITON_AUTOTUNE": "0", "CUDA_HOME": "/x"}) == {"MOE_LAB_TRITON_AUTOTUNE": "0"}
    rec = {"spec": {"system": "triton", "routing": "real"}, "metrics": {}, "env": {"MOE_LAB_TRITON_TMA": "1"}}
    row = report.to_row(rec, "r", report.env_flags(rec["env"]))
    assert row["key"].endswith("/triton+MOE_LAB_TRITON_TMA=1")


def test_graph_rows_show_the_reserved_peak_and_no_activation():
    rec = {"spec": {"system": "triton-fusedce-graphs", "routing": "real", "batch": 6},
           "metrics": {"peak_gib": 45.2, "peak_reserved_gib": 61.0, "activation_gib": 3.4,
                       "static_gib": {"params": 10.0, "grads": 10.0, "optimizer": 21.8}}}
    row = report.to_row(rec, "r")
    assert (row["peak_gib"], row["peak_reserved_gib"], row["activation_gib"]) == (None, 61.0, None)
    assert report._peak_cell(row) == "<= 61.00 (reserved)"
    del rec["metrics"]["peak_reserved_gib"]  # recorded before the reserved peak was kept
    assert report._peak_cell(report.to_row(rec, "r")) == "-"
    rec["spec"]["system"] = "triton-fusedce"
    assert report.to_row(rec, "r")["peak_gib"] == 45.2


def test_kernel_bench_files_become_a_table_with_their_samples(tmp_path):
    """``report.kernel_bench_markdown``: every ``*triton_kernels_bench.json`` under the runs, Triton
    against torch for the same op, the number of kept samples, the TMA switch in the heading."""
    rows = [{"group": "gemm", "op": "grouped_mm fwd", "shape": "S=8", "impl": impl, "ms": ms, "tflops": 400.0 if ms else None,
             "gbps": None, "note": "", "ms_samples": samples}
            for impl, ms, samples in (("triton", 0.4, [0.39, 0.4, 0.41]), ("torch", 0.5, [0.5, 0.5]),
                                      ("config BLOCK_M: 256", None, []))]  # a candidate that failed to build
    manifest = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0", "commit": "abc", "dirty": False,
                "tma": "1", "command": "python -m triton_kernels.bench", "timer": "do_bench"}
    for name in ("run-a/triton_kernels_bench.json", "run-b/run1-triton_kernels_bench.json"):
        store.write_json(tmp_path / name, {"manifest": manifest, "rows": rows})
    text = report.kernel_bench_markdown(tmp_path)
    assert text.count("MOE_LAB_TRITON_TMA=1") == 2 and "run-b/run1-triton_kernels_bench.json" in text
    assert "| gemm | grouped_mm fwd | S=8 | triton | 0.4000 | 3 | 400.0 | - | 1.25x |" in text
    assert "| gemm | grouped_mm fwd | S=8 | torch | 0.5000 | 2 | 400.0 | - | - |" in text
    assert "| gemm | grouped_mm fwd | S=8 | config BLOCK_M: 256 | - | - | - | - | - |" in text
    assert report.kernel_bench_markdown(tmp_path / "run-c") is None


# ---- where a user's runs and report go; resumes announced; --fresh ----------------------------------
USER_CONF = """\
name: u
defaults: {model: tiny-qwen3-moe, layers: 1, seq: 32, dtype: fp32, optimizer: adamw, device: cpu}
grid:
  system: [v5-grouped_mm, torch]
"""


@pytest.fixture
def fake_cells(monkeypatch):
    """run_one writing an ok record without starting a process; returns the specs it ran."""
    calls = []

    def run_one(spec, run_dir, *_, **__):
        rec = {"status": "ok", "cell_id": cell.cell_id(spec), "spec": spec}
        store.write_json(run_dir / "cells" / f"{rec['cell_id']}.json", rec)
        calls.append(spec)
        return rec

    monkeypatch.setattr(sweep, "run_one", run_one)
    return calls


def test_the_main_job_writes_under_runs_in_the_current_directory(tmp_path, monkeypatch, fake_cells, capsys):
    config = tmp_path / "u.yaml"
    config.write_text(USER_CONF)
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--config", str(config), "--no-progress"]) == 0
    manifest = store.read_json(tmp_path / "runs" / "u" / "manifest.json")
    assert manifest["state"] == "finished" and len(manifest["cells"]) == 2 and len(fake_cells) == 2
    assert not (sweep.REPO_ROOT / "results" / "runs" / "u").exists()
    assert "python -m experiments.report" in capsys.readouterr().err
    # a relative --out is the current directory's, not the repository's (where cells run)
    assert sweep.main(["--config", str(config), "--no-progress", "--out", "elsewhere/u2"]) == 0
    assert (tmp_path / "elsewhere" / "u2" / "manifest.json").exists()


def test_resumed_cells_are_announced_and_fresh_reruns_them(tmp_path, fake_cells, caplog):
    config = tmp_path / "u.yaml"
    config.write_text(USER_CONF)
    run_dir = tmp_path / "runs" / "u"
    argv = ["--config", str(config), "--no-progress", "--out", str(run_dir)]
    assert sweep.main(argv) == 0 and len(fake_cells) == 2
    caplog.clear()
    assert sweep.main(argv) == 0 and len(fake_cells) == 2  # nothing reran ...
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warned] == [f"2 of 2 cells already done in {run_dir}; --fresh to rerun them"]
    caplog.clear()
    assert sweep.main(argv + ["--fresh"]) == 0 and len(fake_cells) == 4  # ... until --fresh
    assert f"--fresh: rerunning 2 cells that already had a record in {run_dir}" in caplog.text
    # an interrupted cell is not done: the next invocation reruns it without being asked
    first = run_dir / "cells" / f"{cell.cell_id(fake_cells[0])}.json"
    store.write_json(first, dict(store.read_json(first), status="interrupted"))
    caplog.clear()
    assert sweep.main(argv) == 0 and len(fake_cells) == 5 and fake_cells[-1] == fake_cells[0]
    assert "1 of 2 cells already done" in caplog.text and "rerunning 1 cell interrupted earlier" in caplog.text


def test_report_defaults_to_the_user_folder(swept, tmp_path, monkeypatch, capsys):
    import shutil

    _, run_dir, _ = swept
    monkeypatch.chdir(tmp_path)
    assert report.main(["--no-plots"]) == 2  # no runs/ here yet
    assert "no runs under runs" in capsys.readouterr().err
    shutil.copytree(run_dir, tmp_path / "runs" / "t")
    assert report.main(["--no-plots"]) == 0
    md = (tmp_path / "runs" / "report" / "results.md").read_text()
    assert "from raw runs under `runs` (do not edit)" in md and "| torch | skewed | ok |" in md
    assert "cpux1/tiny-qwen3-moe-L1/torch@skewed" in store.read_json(tmp_path / "runs" / "summary.json")


def test_report_writes_the_committed_results_only_when_asked(capsys):
    committed = report.COMMITTED

    def paths(*argv):
        return report.resolve_paths(report.parse_args(list(argv)))

    assert paths() == (report.USER_RUNS, report.USER_RUNS / "report", report.USER_RUNS / "summary.json")
    assert paths("--results") == (committed / "runs", committed / "report", committed / "summary.json")
    assert paths("--write-committed", "--no-summary")[2] is None
    assert paths("--runs", "r", "--out", "o") == (Path("r"), Path("o"), report.USER_RUNS / "summary.json")
    for flag, target in (("--out", committed / "report"), ("--summary", committed / "summary.json")):
        assert report.main([flag, str(target), "--runs", str(committed / "runs")]) == 2
        assert "in the committed results/ folder: pass --results" in capsys.readouterr().err
