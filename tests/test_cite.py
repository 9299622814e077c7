"""experiments.cite: every committed table has a stable key and its provenance; keys do not move; CITATION.cff."""
from __future__ import annotations

import configparser
import json

import yaml

from experiments import cite, provenance


def test_every_committed_table_has_a_unique_key_and_raw_runs():
    tables = cite.tables()
    keys = [t.key for t in tables]
    assert len(tables) > 50 and len(keys) == len(set(keys))
    for t in tables:
        assert t.sources, f"{t.key}: no raw run under results/runs/ for heading {t.heading!r}"
        prov = cite.provenance_of(t)
        assert prov["commit"] and prov["command"], t.key
    assert "results/h200x1/qwen3-30b-a3b-L8-b1s4096-bf16-adamw_fused" in keys
    assert "moe_block/h200x1-block-4" in keys and "kernels/h200x1-triton-kernels/run1" in keys


def _report(root, headings_and_runs):
    (root / "results" / "report").mkdir(parents=True, exist_ok=True)
    text = "# A report\n\n"
    for heading, run in headings_and_runs:
        text += f"## {heading}\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        run_dir = root / "results" / "runs" / run
        (run_dir / "cells").mkdir(parents=True, exist_ok=True)
        manifest = {"provenance": {"git": {"commit": "abc123def4567890", "dirty": False},
                                   "hardware": {"gpu_count": 1, "gpu_name": "NVIDIA H100 80GB HBM3", "cpu_count": 16},
                                   "versions": {"torch": "2.11.0", "transformers": "5.17.0"},
                                   "command": ["/x/experiments/ablation.py", "--preset", "h100x1-ablation"]}}
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
        (run_dir / "cells" / "c1.json").write_text("{}")
    (root / "results" / "report" / "ablation-x.md").write_text(text)


def test_keys_are_stable_and_the_entry_names_its_provenance(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cite.provenance, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(cite, "RUNS_DIR", tmp_path / "results" / "runs")
    report = tmp_path / "results" / "report"
    _report(tmp_path, [("run-b: routing ablation", "run-b")])
    before = [t.key for t in cite.tables(report)]
    assert before == ["ablation/run-b"]
    # a table added above it (another run) and a second table under the same heading: the first key stays
    _report(tmp_path, [("run-a: other", "run-a"), ("run-b: routing ablation", "run-b")])
    path = report / "ablation-x.md"
    path.write_text(path.read_text() + "| c |\n|---|\n| 3 |\n")
    keys = [t.key for t in cite.tables(report)]
    assert keys == ["ablation/run-a", "ablation/run-b", "ablation/run-b#2"]

    assert cite.main(["ablation/run-b", "--report-dir", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("@misc{moe_lab:ablation:run-b,")
    assert "author = {{moe_lab contributors}}" in out and "version = {abc123def456}" in out
    assert "| GPU | 1x NVIDIA H100 80GB HBM3 |" in out
    assert "| command | `python -m experiments.ablation --preset h100x1-ablation` |" in out
    assert "`results/runs/run-b/` (1 cell records)" in out and "| 1 | 2 |" in out
    assert "transformers 5.17.0" in out
    assert cite.main(["ablation/run-c", "--report-dir", str(report)]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert cite.main(["--list", "--report-dir", str(report)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("ablation/run-a\t")


def test_citation_cff():
    cff = yaml.safe_load((provenance.REPO_ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "moe_lab"
    assert cff["authors"] == [{"name": "moe_lab contributors"}]
    setup = configparser.ConfigParser()
    setup.read(provenance.REPO_ROOT / "setup.cfg")
    assert cff["license"] == setup["metadata"]["license"]
    assert cff["version"] == setup["metadata"]["version"]
