"""The notebooks in notebooks/ execute top to bottom on the CPU, and are committed without outputs."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
BUDGET_S = 90  # per notebook, on a 2-core CPU machine beside the other xdist worker (a guard on CI time, not a benchmark;
# jax_router took 14 s alone and 70-125 s beside the multi-process EP tests)


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert "01_routing_statistics_cpu.ipynb" in names and "02_read_gpu_trace.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    monkeypatch.delenv("MOE_LAB_TRACE", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3, "the figures must render"
    if path.name.startswith("02_"):
        gpu = (path.parents[1] / "results/traces/h200x1-qwen3-30b-a3b.safetensors").exists()
        assert ("SMALL CPU TRACE" in text) != gpu, "the notebook must say which trace it shows"
    if elapsed > 2 * BUDGET_S and not os.environ.get("CI_SLOW_OK"):
        pytest.fail(f"{path.name} took {elapsed:.0f} s (budget about {BUDGET_S} s)")
