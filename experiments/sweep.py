"""Sweep runner: every cell of a grid in its own process, resumable, failures recorded.

    python -m experiments.sweep                      # preset cpu-small, CPU, about two minutes -> runs/cpu-small
    python -m experiments.sweep --preset h200x1 --out $OUT/runs/h200x1
    python -m experiments.sweep --config my.yaml --retry-failed

Raw results go under ``--out`` (default ``runs/<preset>`` under the current directory; nothing the
repository commits is written): ``manifest.json`` (command, git commit and dirty flag, versions,
hardware, environment flags, seeds, the sweep file, every cell's id and status, and ``state``:
``running``, ``finished`` or ``interrupted``), ``cells/<cell_id>.json`` (one record per cell,
per-step samples included) and ``logs/<cell_id>.log`` (the cell's stdout/stderr). All JSON is written
atomically. A cell whose record exists is skipped, and the sweep says so ("8 cells already done in
DIR"); ``--retry-failed`` reruns the ones that did not finish ok, ``--fresh`` reruns every cell.
A cell that fails, runs out of memory or times out is recorded as such and the sweep goes on. Cells
with ``nproc > 1`` run under ``python -m torch.distributed.run --standalone``.

Each cell runs in its own session (process group). Ctrl-C (SIGINT) or SIGTERM stops the sweep: the
running cell's whole process group is terminated (SIGTERM, then SIGKILL after a grace period), its
record says ``interrupted``, the manifest's state ``interrupted``, and the sweep exits with 128 + the
signal number. Running the same command again resumes, rerunning the interrupted cell.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import cell, grid, models, provenance, report, store

log = logging.getLogger(__name__)

REPO_ROOT = provenance.REPO_ROOT
DEFAULT_PRESET = "cpu-small"
USER_RUNS = "runs"  # under the current directory (git-ignored in the repository)
KILL_GRACE_S = 5.0  # SIGTERM to a cell's process group, then SIGKILL after this long


def default_run_dir(name: str) -> Path:
    """Where a sweep's records go without ``--out``: ``runs/<name>`` under the current directory."""
    return Path.cwd() / USER_RUNS / name


class SweepInterrupted(KeyboardInterrupt):
    """The sweep got SIGINT or SIGTERM (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise ``SweepInterrupted`` once; later ones while the sweep cleans up are
    ignored, so the clean-up (killing the running cell) is not cut short. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise SweepInterrupted(signum)
        print(f"{signal.Signals(signum).name} again: still stopping the running cell", file=sys.stderr, flush=True)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


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


def _parent_pids() -> dict[int, int]:
    """{pid: parent pid} of every process (Linux /proc; {} elsewhere)."""
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    out[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, theirs, ...), from /proc."""
    children = {}
    for child, parent in _parent_pids().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """End a cell started with ``start_new_session=True`` and everything it started: SIGTERM to its
    process group and to the groups of its descendants (torchrun starts each rank in a session of
    its own), SIGKILL to what is left after ``grace_s``, then reap the cell's process."""
    pids = [proc.pid, *descendants(proc.pid)]
    groups = {proc.pid}
    for pid in pids[1:]:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target, send in [(g, os.killpg) for g in sorted(groups)] + [(p, os.kill) for p in pids]:
            try:
                send(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGKILL:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the cell's process as soon as it exits
            if not any(alive(p) for p in pids):
                break
            time.sleep(0.05)
        else:
            log.warning("cell processes %s still alive %.0fs after SIGTERM: SIGKILL", [p for p in pids if alive(p)], grace_s)
    proc.wait()


def run_one(spec: dict, run_dir: Path, timeout_s: float, env: dict, prov: dict | None = None) -> dict:
    """Run one cell in a child process; return its record (written by the cell, or by us when the
    process died without writing one). On SIGINT/SIGTERM (``SweepInterrupted``) the cell's process
    group is killed, an ``interrupted`` record written, and the exception re-raised."""
    cid = cell.cell_id(spec)
    out_path = run_dir / "cells" / f"{cid}.json"
    log_path = run_dir / "logs" / f"{cid}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():  # a record from an earlier invocation (rerun): never mistaken for this run's
        out_path.unlink()
    cmd = cell_command(spec, out_path)
    t0 = time.perf_counter()
    status = None
    proc = None
    with open(log_path, "wb") as logf:
        try:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)  # the cell's own process group (torchrun and its ranks)
            rc, status = None, "timeout"
        except BaseException as e:  # Ctrl-C / SIGTERM (or anything else): the cell must not outlive us
            if proc is not None:
                kill_group(proc)
            why = signal.Signals(e.signum).name if isinstance(e, SweepInterrupted) else type(e).__name__
            record = {"status": "interrupted", "cell_id": cid, "spec": spec,
                      "error": f"the sweep was interrupted ({why}) after {time.perf_counter() - t0:.1f}s; "
                               "the cell's process group was killed",
                      "model_label": models.model_label(spec["model"], spec["layers"]),
                      **{k: (prov or {}).get(k) for k in ("hardware", "versions", "git")},
                      "launcher": {"command": cmd, "returncode": proc and proc.returncode, "wall_s": time.perf_counter() - t0,
                                   "log": str(log_path.relative_to(run_dir))}}
            store.write_json(out_path, record)
            raise
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


def _done(rec: dict | None, retry_failed: bool) -> bool:
    """Whether a cell's existing record stands (skipped on resume)."""
    if rec is None or rec.get("status") == "interrupted":
        return False
    return rec.get("status") == "ok" or not retry_failed


def run_sweep(conf: dict, run_dir: Path, *, retry_failed: bool = False, only: str | None = None,
              progress: bool = True, fresh: bool = False) -> list[dict]:
    """Run (or resume) every cell of ``conf`` under ``run_dir``; returns the records in grid order.

    Cells with a record are skipped (announced at WARNING level) unless ``fresh`` (every selected
    cell reruns) or ``retry_failed`` (the ones not ok rerun); an ``interrupted`` record always
    reruns. Raises ``SweepError`` (nothing run) when the machine lacks the devices the cells ask
    for, and ``SweepInterrupted`` after SIGINT/SIGTERM, with the running cell killed and the
    manifest's state ``interrupted``."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety: run without a bar where tqdm is missing
        def tqdm(it, **_):
            return _NoBar(it)

    run_dir = Path(run_dir).resolve()  # cells run with the repository as their directory
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
    existing = {}
    for spec in specs:
        path = run_dir / "cells" / f"{cell.cell_id(spec)}.json"
        if path.exists():
            existing[cell.cell_id(spec)] = store.read_json(path)
    if fresh and existing:
        log.warning("--fresh: rerunning %d cell%s that already had a record in %s", len(existing),
                    "s" if len(existing) != 1 else "", run_dir)
        existing = {}
    done = [r for r in existing.values() if _done(r, retry_failed)]
    if done:
        not_ok = sum(r.get("status") != "ok" for r in done)
        log.warning("%d of %d cells already done in %s%s; --fresh to rerun%s", len(done), len(specs), run_dir,
                    f" ({not_ok} not ok: --retry-failed reruns them)" if not_ok else "",
                    " them" if len(done) == len(specs) else "")
    interrupted = [cid for cid, r in existing.items() if r.get("status") == "interrupted"]
    if interrupted:
        log.warning("rerunning %d cell%s interrupted earlier", len(interrupted), "s" if len(interrupted) != 1 else "")
    store.write_json(manifest_path, manifest)
    env = _cell_env(conf)
    timeout_s = float(conf.get("cell_timeout_s", 600))
    records = []
    bar = tqdm(specs, desc=f"sweep {conf['name']}", unit="cell", disable=not progress, file=sys.stderr)
    try:
        with stop_on_signals():
            for spec in bar:
                cid = cell.cell_id(spec)
                bar.set_postfix_str(f"{spec['system']} {spec['routing']}")
                if _done(existing.get(cid), retry_failed):
                    log.info("skip finished cell %s (%s)", cid, existing[cid].get("status"))
                    records.append(existing[cid])
                    continue
                rec = run_one(spec, run_dir, timeout_s, env, prov)
                if rec["status"] != "ok":
                    log.warning("cell %s: %s: %s", cid, rec["status"], (rec.get("error") or "").splitlines()[0][:200])
                records.append(rec)
    except KeyboardInterrupt as e:  # SweepInterrupted (SIGINT, SIGTERM), or a KeyboardInterrupt from elsewhere
        bar.close()
        statuses = {r["cell_id"]: r["status"] for r in records}
        for spec in specs[len(records):]:  # the interrupted cell, then those not reached
            path = run_dir / "cells" / f"{cell.cell_id(spec)}.json"
            statuses[cell.cell_id(spec)] = store.read_json(path).get("status") if path.exists() else "not_run"
        manifest["cells"] = [{"cell_id": cid, "status": st} for cid, st in statuses.items()]
        manifest["state"] = "interrupted"
        manifest["interrupted_by"] = signal.Signals(e.signum).name if isinstance(e, SweepInterrupted) else "KeyboardInterrupt"
        store.write_json(manifest_path, manifest)
        raise
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
    ap.add_argument("--out", default=None, help=f"run directory (default {USER_RUNS}/<preset> under the current directory)")
    again = ap.add_mutually_exclusive_group()
    again.add_argument("--retry-failed", action="store_true", help="rerun cells whose record is not ok")
    again.add_argument("--fresh", action="store_true", help="rerun every cell, even those with a record")
    ap.add_argument("--only", default=None, help="run only cells whose id contains this string")
    ap.add_argument("--list", action="store_true", help="print the cell ids and exit")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--log-level", default=provenance.log_level("WARNING"))
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
            if not args.only or args.only in cell.cell_id(s):
                print(cell.cell_id(s))
        return 0
    run_dir = Path(args.out) if args.out else default_run_dir(conf["name"])
    try:
        records = run_sweep(conf, run_dir, retry_failed=args.retry_failed, only=args.only,
                            progress=not args.no_progress, fresh=args.fresh)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, SweepInterrupted) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}): the running cell was stopped and recorded as interrupted; "
              f"{run_dir}/manifest.json says state: interrupted. Run the same command again to resume.",
              file=sys.stderr, flush=True)
        return 128 + signum
    print(report.run_table(records, title=f"{conf['name']} ({run_dir})", run=run_dir.name))
    runs_arg = "" if Path(run_dir).resolve().parent == (Path.cwd() / USER_RUNS).resolve() else f" --runs {run_dir}"
    print(f"Records: {run_dir}. Tables and figures: python -m experiments.report{runs_arg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
