"""Ctrl-C (SIGINT) or SIGTERM on a real ``python -m experiments.sweep`` process stops the sweep and
every process of its running cell (cells run in their own session, and torchrun starts each rank in
yet another one), leaving the manifest in state "interrupted" and the cell recorded as interrupted."""
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import store, sweep

CONF = """\
name: hang
defaults: {{model: tiny-qwen3-moe, layers: 1, seq: 16, dtype: fp32, optimizer: adamw, warmup: 1, steps: 1, device: cpu}}
cells:
  - {{system: {system}, nproc: {nproc}, fail_at: hang}}
  - {{system: v5-grouped_mm}}
cell_timeout_s: 600
env: {{OMP_NUM_THREADS: "1"}}
"""


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("sig,system,nproc", [(signal.SIGINT, "v5-fsdp2-grouped_mm", 2),
                                              (signal.SIGTERM, "v5-grouped_mm", 1)])
def test_a_signal_stops_the_sweep_and_kills_its_running_cell(tmp_path, sig, system, nproc):
    config = tmp_path / "hang.yaml"
    config.write_text(CONF.format(system=system, nproc=nproc))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--config", str(config), "--out", str(out),
                             "--no-progress"], cwd=sweep.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    children = []
    try:
        def hanging():  # every rank has reached the hang (logged by the cell)
            logs = list((out / "logs").glob("*.log")) if (out / "logs").is_dir() else []
            return logs and logs[0].read_text(errors="replace").count("fail_at=hang") >= nproc
        _wait_for(hanging, 180, f"{nproc} hanging cell process(es)")
        children = sweep.descendants(proc.pid)
        assert len(children) >= nproc + (nproc > 1), children  # torchrun and its ranks, or the one cell
        assert all(sweep.alive(p) for p in children)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert "interrupted" in err and f"{out}/manifest.json" in err
        survivors = [p for p in children if sweep.alive(p)]
        assert survivors == [], f"cell processes {survivors} outlived the sweep"
    finally:
        for p in children:  # leave nothing behind, whatever happened
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    manifest = store.read_json(out / "manifest.json")
    assert manifest["state"] == "interrupted" and manifest["interrupted_by"] == signal.Signals(sig).name
    hung, never = manifest["cells"]
    assert (hung["status"], never["status"]) == ("interrupted", "not_run")
    record = store.read_json(out / "cells" / f"{hung['cell_id']}.json")
    assert record["status"] == "interrupted" and signal.Signals(sig).name in record["error"]
    assert record["launcher"]["returncode"] is not None
    assert not (out / "cells" / f"{never['cell_id']}.json").exists()
