"""The trainer systems (experiments/trainer_script.py, experiments/trainer_cell.py): an unmodified
transformers.Trainer script on vanilla v5 (v5-trainer), with moe_lab's import (trainer) and with
moe_lab.fastest(trainer) (trainer-max), run as harness cells on the CPU with a tiny model; their names,
their refusals, their rows in the report and the sweep preset h100x1-trainer."""
import json

import pytest

from experiments import cell, grid, report, systems, trainer_cell

TINY = {"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "device": "cpu", "dtype": "fp32", "warmup": 1, "steps": 2}


def _run_cell(tmp_path, **spec) -> tuple[int, dict]:
    out = tmp_path / f"{spec['system']}.json"
    code = cell.main(["--spec", json.dumps({**TINY, **spec}), "--out", str(out)])
    return code, json.loads(out.read_text())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The v5-trainer and trainer cells of TINY, run once for this module."""
    tmp = tmp_path_factory.mktemp("trainer")
    return {system: _run_cell(tmp, system=system) for system in ("v5-trainer", "trainer")}


# ---- the script runs, unmodified, and is measured ----------------------------------------------
@pytest.mark.parametrize("system,auto_model", [("v5-trainer", "transformers."), ("trainer", "moe_lab.")])
def test_the_unmodified_trainer_script_runs_and_records_the_harness_metrics(records, system, auto_model):
    code, rec = records[system]
    assert code == 0 and rec["status"] == "ok", rec.get("error")
    m = rec["metrics"]
    assert [s["warmup"] for s in rec["samples"]] == [True, False, False]  # warmup 1 + steps 2, as asked
    assert all(s["step_ms"] > 0 for s in rec["samples"]) and m["step_ms"] > 0
    assert m["loss_finite"] and all(isinstance(s["loss"], float) for s in rec["samples"])
    assert m["tokens_per_gpu_per_step"] == 16 and m["tokens_per_s_per_gpu"] > 0 and m["tflops_per_gpu"] > 0
    assert m["peak_gib"] is None and m["mfu"] is None  # the CPU: no device memory counter, no peak FLOP/s
    assert m["static_gib"]["optimizer"] > 0  # the Trainer's optimizer state, counted from its tensors
    t = rec["trainer"]
    assert t["auto_model"].startswith(auto_model) and t["global_step"] == 3 and t["max_steps"] == 3
    assert t["optim"] == trainer_cell.trainer_default_optimizer() and t["max_grad_norm"] == 1.0  # the defaults
    assert m["train_runtime_s"] > 0 and m["gap_ms"] is not None
    assert rec["system_spec"]["loop"] == "trainer" and rec["system_spec"]["name"] == system
    assert rec["system_kind"] == ("v5-trainer" if system == "v5-trainer" else "moe_lab-trainer")


def test_the_changed_import_trains_the_same_model_on_the_same_data(records):
    v5, ours = records["v5-trainer"][1], records["trainer"][1]
    assert ours["options_changed"] == {} and v5["options"] is None  # the key is .../trainer: no A/B switch
    assert isinstance(ours["trainer"]["options_changed"], dict)  # what moe_lab decided for the model, recorded
    assert ours["moe_lab_stages"]["backend"]  # moe_lab patched the MoE blocks
    for a, b in zip(v5["samples"], ours["samples"]):  # same seed: same weights, same batches
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_trainer_rows_sit_beside_the_others_in_the_report(records):
    rows = [report.to_row(dict(records[s][1]), "r", {}) for s in ("v5-trainer", "trainer")]
    report.add_speedups(rows)
    assert [r["key"] for r in rows] == ["cpux1/tiny-qwen3-moe-L1/v5-trainer", "cpux1/tiny-qwen3-moe-L1/trainer"]
    assert rows[1]["speedup_vs_v5-trainer"] > 0
    text = report.group_tables(rows)
    assert "vs v5-trainer" in text and report.TRAINER_NOTE in text
    assert report._ref_loss(rows, rows[1]) == rows[0]["first_loss"]  # Δ1st loss against v5-trainer's


def test_trainer_max_calls_moe_lab_fastest_or_is_not_implemented(tmp_path, monkeypatch):
    import moe_lab

    if not callable(getattr(moe_lab, "fastest", None)):
        code, rec = _run_cell(tmp_path, system="trainer-max")
        assert code == 3 and rec["status"] == "not_implemented" and "moe_lab.fastest" in rec["error"]
        assert rec["system_spec"]["fastest"] is True
        # the line itself, with moe_lab.training.fastest where it exists (else a stand-in): it gets
        # the Trainer, built and not yet trained
        try:
            from moe_lab.training import fastest as implementation
        except ImportError:
            implementation = None
        seen = []

        def fastest(trainer):
            seen.append(trainer.state.global_step)
            if implementation is not None:
                implementation(trainer)

        monkeypatch.setattr(moe_lab, "fastest", fastest, raising=False)
    else:
        seen, implementation = None, moe_lab.fastest
    spec = cell.normalise({**TINY, "system": "trainer-max", "steps": 1})
    rec = cell.run(spec)
    assert rec["status"] == "ok" and rec["metrics"]["loss_finite"] and rec["trainer"]["fastest"] is True
    assert rec["options_changed"] == {}  # what fastest chose is the system's: the key stays .../trainer-max
    if seen is not None:
        assert seen == [0]
    if implementation is not None:  # moe_lab's decisions, recorded
        assert isinstance(rec["trainer"]["fastest_decisions"], dict)


def test_a_routing_regime_reaches_the_trainers_routers():
    spec = cell.normalise({**TINY, "system": "trainer", "routing": "balanced", "warmup": 0, "steps": 1})
    rec = cell.run(spec)
    assert rec["status"] == "ok" and rec["metrics"]["loss_finite"]


# ---- what the script does not do is refused with the reason ------------------------------------
@pytest.mark.parametrize("spec,reason", [
    ({"system": "trainer", "nproc": 2}, "runs the unmodified Trainer script in one process"),
    ({"system": "v5-trainer", "optimizer": "sgd"}, "the Trainer's default optimizer"),
    ({"system": "trainer", "dtype": "fp16"}, "dtype must be bf16 or fp32"),
    ({"system": "trainer", "trace": "t.safetensors"}, "routing traces are the harness loop's"),
])
def test_what_the_script_does_not_do_is_a_failed_cell_with_the_reason(tmp_path, spec, reason):
    code, rec = _run_cell(tmp_path, **spec)
    assert code == 3 and rec["status"] == "failed" and reason in rec["error"]


def test_a_sweep_file_refuses_a_trainer_system_on_two_processes():
    conf = {"name": "t", "defaults": TINY, "cells": [{"system": "trainer", "nproc": 2}]}
    with pytest.raises(grid.SweepFileError, match="one process, the cell has nproc=2"):
        grid.validate(conf)


# ---- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,mapping,library,fastest", [
    ("v5-trainer", {"library": "v5", "loop": "trainer"}, "v5", False),
    ("trainer", {"loop": "trainer"}, "moe_lab", False),
    ("trainer-max", {"loop": "trainer", "fastest": True}, "moe_lab", True),
])
def test_the_three_names_round_trip(name, mapping, library, fastest):
    spec = systems.check_known(name)
    assert (spec.library, spec.loop, spec.fastest, spec.name) == (library, "trainer", fastest, name)
    assert spec.backend is None and spec.experts_implementation is None and spec.moe_lab_options == ()
    assert systems.parse(mapping) == spec and systems.parse(spec.as_mapping()) == spec
    assert systems.canonical_name(mapping) == name and systems.parse(spec.to_dict()["name"]) == spec
    assert cell.normalise({**TINY, "system": mapping})["system"] == name
    assert not spec.distributed and not spec.optimizer_in_backward and not spec.cuda_graphs


def test_the_harness_names_keep_their_loop():
    for name in ("v5-grouped_mm", "torch", "triton-fusedce-optstream", "ep2-all2all-triton-fsdp"):
        spec = systems.parse(name)
        assert (spec.loop, spec.fastest, spec.name) == ("harness", False, name) and "loop" not in spec.as_mapping()


@pytest.mark.parametrize("system,match", [
    ({"loop": "trainer", "backend": "triton"}, "takes library, loop and fastest only"),
    ({"library": "v5", "loop": "trainer", "fastest": True}, "a moe_lab system"),
    ({"backend": "triton", "fastest": True}, "loop: trainer"),
    ({"loop": "hf"}, "loop must be one of harness, trainer"),
    ({"loop": "trainer", "fastest": "yes"}, "fastest must be true or false"),
])
def test_malformed_trainer_mappings_are_refused(system, match):
    with pytest.raises(ValueError, match=match):
        systems.parse(system)


def test_a_trainer_system_builds_its_model_in_its_script():
    with pytest.raises(ValueError, match="built by its script"):
        systems.build_model("trainer", None, dtype=None, attn="sdpa", device="cpu", world=1)


# ---- the preset --------------------------------------------------------------------------------
def test_the_trainer_preset():
    specs = grid.expand(grid.load("h100x1-trainer"))
    assert [(s["model"], s["layers"]) for s in specs[::3]] == [
        ("qwen3-30b-a3b", 8), ("gpt-oss-20b", 4), ("mixtral-8x7b", 2), ("moonlight-16b-a3b", 4), ("nemotron-3-nano", 4)]
    assert [s["system"] for s in specs] == ["v5-trainer", "trainer", "trainer-max"] * 5
    assert all((s["batch"], s["seq"], s["dtype"], s["warmup"], s["steps"], s["nproc"], s["device"],
                s["transformers_version"], s["optimizer"]) == (1, 4096, "bf16", 3, 10, 1, "cuda", "5.17.0", "adamw_fused")
               for s in specs)
