"""Sweep files against their schema (experiments/grid.py): every committed preset passes; typos,
unknown names, impossible devices and bad values fail before anything runs, naming the file, the
entry and its line; ``--list`` fails on the same errors; a CUDA sweep on a machine without CUDA is
refused when it would run, not recorded cell by cell."""
import textwrap

import pytest

from experiments import cell, grid, sweep

GOOD = """\
name: t
defaults:
  model: tiny-qwen3-moe
  layers: 1
  seq: 32
  dtype: fp32
  optimizer: adamw
  device: cpu
grid:
  system: [v5-eager, torch]
  routing: [real, skewed]
overrides:
  - match: {system: v5-eager}
    set: {steps: 2}
"""


def _write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _problems(path) -> list[tuple[int, str, str]]:
    with pytest.raises(grid.SweepFileError) as e:
        grid.load(path=str(path))
    assert str(path) in str(e.value)
    return e.value.problems


@pytest.mark.parametrize("preset", grid.presets())
def test_every_committed_preset_follows_the_schema(preset):
    conf = grid.load(preset)
    sweep_file = grid.validate(conf, conf["_path"])
    assert isinstance(sweep_file, grid.SweepFile) and sweep_file.name == preset
    specs = grid.expand(conf)
    assert specs and len({cell.cell_id(s) for s in specs}) == len(specs)


def test_a_good_file_expands_with_its_override(tmp_path):
    specs = grid.expand(grid.load(path=str(_write(tmp_path, GOOD))))
    assert [(s["system"], s["routing"], s["steps"]) for s in specs] == [
        ("v5-eager", "real", 2), ("v5-eager", "skewed", 2), ("torch", "real", 10), ("torch", "skewed", 10)]


@pytest.mark.parametrize("old,new,line,where,message", [
    ("  - match: {system: v5-eager}", "  - mach: {system: v5-eager}", 13, "overrides[0].mach",
     "unknown override key 'mach' (did you mean 'match'?)"),
    ("name: t", "name: t\nbogus: 1", 2, "bogus", "unknown key 'bogus'"),
    ("  device: cpu", "  devise: cpu", 8, "defaults.devise", "unknown cell key 'devise' (did you mean 'device'?)"),
    ("  routing: [real, skewed]", "  routng: [real, skewed]", 11, "grid.routng", "unknown cell key 'routng'"),
    ("    set: {steps: 2}", "    set: {stesp: 2}", 14, "overrides[0].set.stesp", "unknown cell key 'stesp'"),
    ("  - match: {system: v5-eager}", "  - match: {sytem: v5-eager}", 13, "overrides[0].match.sytem", "unknown cell key"),
    ("  device: cpu", "  device: gpu", 8, "defaults.device", "must be one of auto, cuda, cpu, got 'gpu'"),
    ("  system: [v5-eager, torch]", "  system: [v5-eager, trition]", 10, "grid.system[1]", "moe_lab has no backend 'trition'"),
    ("  system: [v5-eager, torch]", "  system: [v5-eagre, torch]", 10, "grid.system[0]", "v5 has no experts implementation 'eagre'"),
    ("  system: [v5-eager, torch]", "  system: [v5-eager, ep0-all2all-torch]", 10, "grid.system[1]", "must be >= 1"),
    ("  system: [v5-eager, torch]", "  system: [v5-eager, ep2-nccl-torch]", 10, "grid.system[1]", "no dispatcher 'nccl'"),
    ("  model: tiny-qwen3-moe", "  model: tiny-qwen4", 3, "defaults.model", "unknown model 'tiny-qwen4'"),
    ("  layers: 1", "  layers: 0", 4, "defaults.layers", "must be an integer >= 1, got 0"),
    ("    set: {steps: 2}", "    set: {steps: -3}", 14, "overrides[0].set.steps", "must be an integer >= 1, got -3"),
    ("  seq: 32", "  seq: 32\n  nproc: 0", 6, "defaults.nproc", "must be an integer >= 1, got 0"),
    ("  seq: 32", "  seq: 32\n  warmup: -1", 6, "defaults.warmup", ">= 0, got -1"),
    ("  seq: 32", "  seq: 32\n  lr: 1e-4", 6, "defaults.lr", "write 1.0e-4"),
    ("  seq: 32", "  seq: thirty-two", 5, "defaults.seq", "must be an integer"),
    ("  seq: 32", "  seq: true", 5, "defaults.seq", "must be an integer"),
    ("  dtype: fp32", "  dtype: fp64", 6, "defaults.dtype", "must be one of"),
    ("  routing: [real, skewed]", "  routing: [real, skewd]", 11, "grid.routing[1]", "unknown routing regime"),
    ("  - match: {system: v5-eager}", "  - match: {system: v5-grouped_mm}", 13, "overrides[0].match",
     "this override matches no cell"),
    ("  layers: 1", "  layers: 99", 9, "grid cell {system: v5-eager, routing: real}", "has 2 layers, got 99"),
    ("  seq: 32", "  seq: 32\n  nproc: 2", 10, "grid cell {system: v5-eager, routing: real}", "runs one process"),
    ("  routing: [real, skewed]", "  routing: [real, skewed]\ncells:\n  - {system: triton-graphs, routing: skewed}", 13,
     "cells[0]", "CUDA graphs"),
    ("name: t", "name: t\nenv: {OMP_NUM_THREADS: [1]}", 2, "env.OMP_NUM_THREADS", "must be a string or number"),
    ("name: t", "name: t\ncell_timeout_s: 0", 2, "cell_timeout_s", "positive number"),
    ("name: t", "name: t\ngrid: {}", 10, "grid", "duplicate key 'grid' (first on line 2)"),
])
def test_a_bad_entry_fails_naming_file_entry_and_line(tmp_path, old, new, line, where, message):
    assert old in GOOD
    problems = _problems(_write(tmp_path, GOOD.replace(old, new, 1)))
    assert any(p == (line, where, p[2]) and message in p[2] for p in problems), problems


def test_every_problem_is_listed_at_once(tmp_path):
    text = GOOD.replace("device: cpu", "device: gpu").replace("  - match:", "  - mach:").replace("torch]", "trition]")
    lines = {(p[0], p[1]) for p in _problems(_write(tmp_path, text))}
    assert {(8, "defaults.device"), (13, "overrides[0].mach"), (10, "grid.system[1]")} <= lines


def test_yaml_syntax_errors_and_empty_files_name_the_file(tmp_path):
    (line, where, _), = _problems(_write(tmp_path, "name: t\ngrid: [1,\n"))
    assert where == "YAML" and line == 3
    assert _problems(_write(tmp_path, "", "empty.yaml"))[0][2].startswith("no cells")
    assert "is a mapping" in _problems(_write(tmp_path, "- 1\n", "list.yaml"))[0][2]


def test_expand_validates_a_mapping_given_in_code():
    conf = {"name": "c", "defaults": {"device": "cpu"}, "cells": [{"system": "torch", "mach": 1}]}
    with pytest.raises(grid.SweepFileError, match=r"cells\[0\]\.mach: unknown cell key"):
        grid.expand(conf)


def test_list_fails_on_the_same_errors(tmp_path, capsys):
    good = _write(tmp_path, GOOD)
    assert sweep.main(["--config", str(good), "--list"]) == 0
    assert len(capsys.readouterr().out.split()) == 4
    bad = _write(tmp_path, GOOD.replace("  - match:", "  - mach:"), "bad.yaml")
    assert sweep.main(["--config", str(bad), "--list"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:13: overrides[0].mach: unknown override key 'mach'" in err


def test_a_cuda_sweep_without_cuda_is_refused_before_any_cell_runs(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _write(tmp_path, GOOD.replace("device: cpu", "device: cuda"))
    calls = []
    monkeypatch.setattr(sweep, "run_one", lambda *a, **k: calls.append(a))
    out = tmp_path / "out"
    assert sweep.main(["--config", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "4 of its 4 cells ask for device: cuda" in err and "torch.cuda.is_available() is False" in err
    assert str(path) in err and calls == [] and not out.exists()
    assert sweep.main(["--config", str(path), "--list"]) == 0  # listing needs no GPU


def test_more_gpus_than_the_machine_has_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    specs = [cell.normalise({"system": "ep4-all2all-torch", "nproc": 4, "device": "cuda"})]
    with pytest.raises(sweep.SweepError, match="ask for 4 GPUs .* has 2"):
        sweep.check_devices(specs, {"name": "x"})
    sweep.check_devices([dict(specs[0], nproc=2)], {"name": "x"})
