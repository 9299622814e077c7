"""Sweep runner: every cell of a grid in its own process, resumable, failures recorded.

    python -m experiments.sweep                      # preset cpu-small, CPU, about two minutes
    python -m experiments.sweep --preset h200x1 --out results/runs/h200x1-<date>
    python -m experiments.sweep --config my.yaml --retry-failed

Raw results go under ``--out`` (default ``results/runs/<preset>``): ``manifest.json`` (command,
git commit and dirty flag, versions, hardware, environment flags, seeds, the sweep file, every
cell's id and status), ``cells/<cell_id>.json`` (one record per cell, per-step samples included)
and ``logs/<cell_id>.log`` (the cell's stdout/stderr). All JSON is written atomically. A cell whose
record exists is skipped (``--retry-failed`` reruns the ones that did not finish ok). A cell that
fails, runs out of memory or times out is recorded as such and the sweep goes on. Cells with
``nproc > 1`` run under ``python -m torch.distributed.run --standalone``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import cell, grid, provenance, report, store

log = logging.getLogger(__name__)

REPO_ROOT = provenance.REPO_ROOT
DEFAULT_PRESET = "cpu-small"


def cell_command(spec: dict, out_path: Path) -> list[str]:
    """The command line that runs one cell (torch.distributed.run for several processes)."""
    args = ["-m", "experiments.cell", "--spec", json.dumps(spec, sort_keys=True), "--out", str(out_path)]
    if spec["nproc"] > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={spec['nproc']}", *args]
    return [sys.executable, *args]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_one(spec: dict, run_dir: Path, timeout_s: float, env: dict) -> dict:
    """Run one cell in a child process; return its record (written by the cell, or by us when the
    process died without writing one)."""
    cid = cell.cell_id(spec)
    out_path = run_dir / "cells" / f"{cid}.json"
    log_path = run_dir / "logs" / f"{cid}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = cell_command(spec, out_path)
    t0 = time.perf_counter()
    status = None
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the cell's own process group (torchrun and its ranks)
            proc.wait()
            rc, status = None, "timeout"
    wall = time.perf_counter() - t0
    record = store.read_json(out_path) if out_path.exists() and status is None else None
    if record is None:
        tail = _tail(log_path)
        if status is None:
            status = "oom" if "out of memory" in tail.lower() else "failed"
        why = f"timed out after {timeout_s:.0f}s" if status == "timeout" else f"cell process exited with {rc}"
        record = cell.failure_record(spec, status, f"{why} without a record; log tail:\n{tail}")
        record.update(cell_id=cid, spec=spec)
    record["launcher"] = {"command": cmd, "returncode": rc, "wall_s": wall, "log": str(log_path.relative_to(run_dir))}
    store.write_json(out_path, record)
    return record


class _NoBar(list):
    def set_postfix_str(self, *_):
        pass

    def close(self):
        pass


def _cell_env(conf: dict) -> dict:
    env = dict(os.environ)
    for k, v in (conf.get("env") or {}).items():
        env.setdefault(k, str(v))
    return env


class SweepError(RuntimeError):
    """A sweep that cannot run here (refused before any cell runs)."""


def check_devices(specs: list[dict], conf: dict) -> None:
    """Refuse cells that ask for CUDA on a machine without it (or for more GPUs than it has),
    instead of recording every cell as unavailable."""
    cuda = [s for s in specs if s["device"] == "cuda"]
    if not cuda:
        return
    import torch

    where = f"sweep {conf['name']} ({conf.get('_path') or 'no file'})"
    if not torch.cuda.is_available():
        raise SweepError(f"{where}: {len(cuda)} of its {len(specs)} cells ask for device: cuda (e.g. "
                         f"{cell.cell_id(cuda[0])}), but torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}); run it where a GPU is visible, or set device: cpu (or auto)")
    need, have = max(s["nproc"] for s in cuda), torch.cuda.device_count()
    if need > have:
        raise SweepError(f"{where}: cells ask for {need} GPUs (nproc: {need}), this machine has {have}")


def run_sweep(conf: dict, run_dir: Path, *, retry_failed: bool = False, only: str | None = None,
              progress: bool = True) -> list[dict]:
    """Run (or resume) every cell of ``conf`` under ``run_dir``; returns the records in grid order.
    Raises ``SweepError`` (nothing run) when the machine lacks the devices the cells ask for."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety: run without a bar where tqdm is missing
        def tqdm(it, **_):
            return _NoBar(it)

    specs = grid.expand(conf)
    if only:
        specs = [s for s in specs if only in cell.cell_id(s)]
    check_devices(specs, conf)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    prov = provenance.collect()
    manifest = {
        "run": run_dir.name,
        "sweep": {k: v for k, v in conf.items() if not k.startswith("_")},
        "sweep_file": conf.get("_path"),
        "provenance": prov,
        "seeds": sorted({s["seed"] for s in specs}),
        "cells": [],
        "state": "running",
    }
    if manifest_path.exists():  # resuming: keep the first invocation's provenance next to ours
        old = store.read_json(manifest_path)
        manifest["previous_invocations"] = old.get("previous_invocations", []) + [old.get("provenance")]
    store.write_json(manifest_path, manifest)
    env = _cell_env(conf)
    timeout_s = float(conf.get("cell_timeout_s", 600))
    records = []
    bar = tqdm(specs, desc=f"sweep {conf['name']}", unit="cell", disable=not progress, file=sys.stderr)
    for spec in bar:
        cid = cell.cell_id(spec)
        path = run_dir / "cells" / f"{cid}.json"
        bar.set_postfix_str(f"{spec['system']} {spec['routing']}")
        if path.exists():
            rec = store.read_json(path)
            if rec.get("status") == "ok" or not retry_failed:
                log.info("skip finished cell %s (%s)", cid, rec.get("status"))
                records.append(rec)
                continue
        rec = run_one(spec, run_dir, timeout_s, env)
        if rec["status"] != "ok":
            log.warning("cell %s: %s: %s", cid, rec["status"], (rec.get("error") or "").splitlines()[0][:200])
        records.append(rec)
    bar.close()
    manifest["cells"] = [{"cell_id": r["cell_id"], "status": r["status"]} for r in records]
    manifest["state"] = "finished"
    store.write_json(manifest_path, manifest)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help=f"sweep preset ({', '.join(grid.presets())}); default {DEFAULT_PRESET}")
    src.add_argument("--config", default=None, help="path to a sweep YAML file")
    ap.add_argument("--out", default=None, help="run directory (default results/runs/<preset>)")
    ap.add_argument("--retry-failed", action="store_true", help="rerun cells whose record is not ok")
    ap.add_argument("--only", default=None, help="run only cells whose id contains this string")
    ap.add_argument("--list", action="store_true", help="print the cell ids and exit")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--log-level", default=os.environ.get("MOE_LAB_LOG", "WARNING"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        conf = grid.load(preset=None if args.config else (args.preset or DEFAULT_PRESET), path=args.config)
        specs = grid.expand(conf)
    except ValueError as e:  # grid.SweepFileError: every problem with its file and line
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for s in specs:
            print(cell.cell_id(s))
        return 0
    run_dir = Path(args.out) if args.out else REPO_ROOT / "results" / "runs" / conf["name"]
    try:
        records = run_sweep(conf, run_dir, retry_failed=args.retry_failed, only=args.only, progress=not args.no_progress)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.run_table(records, title=f"{conf['name']} ({run_dir})", run=run_dir.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
