"""Tables, plots and a summary.json from raw runs alone, byte-identical on every run.

    python -m experiments.report                      # your runs: runs/ -> runs/report/, runs/summary.json
    python -m experiments.report --runs DIR           # DIR (one run or a folder of runs) -> runs/report/ ...
    python -m experiments.report --results            # the committed results: results/runs -> results/report/,
                                                      #   results/summary.json (maintainers, after adding a run)

By default the report reads the runs ``python -m experiments.sweep`` wrote under ``runs/`` in the
current directory and writes there (``runs/report/``, ``runs/summary.json``); nothing the repository
commits is touched, and writing into ``results/`` without ``--results`` is refused. ``--runs``,
``--out`` and ``--summary`` override each path. Writes ``<out>/results.md`` and ``<out>/results.csv``,
figures when matplotlib is installed (``experiments/figures.py``: per GPU and model, the headline
step, the MoE block, EP scaling), and merges keys into the summary (keys it does not
produce are kept untouched).

Summary keys: ``<gpu>x<count>/<model>-L<layers>/<system><suffix>`` with ``count`` the GPUs the cell
used, e.g. ``h200x1/qwen3-30b-a3b-L8/v5-grouped_mm``. Suffix rule: ``@<routing>`` when the routing
regime is not ``real`` (``@balanced``, ``@skewed``, ``@skewed@1.5``), then ``+ckpt`` when activation
checkpointing is on, ``+<optimizer>``, ``+b<batch>``, then the switches the cell ran with away from
their defaults (``record_flags``): from the moe_lab ``Options`` the record says it used
(``options_changed``; ``+tma``, ``+no_autotune``; a system name's own ``+<option>`` part is
re-derived from them, so ``triton+tma`` and ``triton`` run under ``MOE_LAB_TRITON_TMA=1`` share a
key), or, for records made before cells recorded their Options, from the recorded environment
(``+MOE_LAB_TRITON_TMA=1``). Only cells with status ok enter the summary. When several cells map to one
key, the run whose directory name sorts last wins (then the later cell in grid order) and a
warning names the collision. Nothing here reads a clock: the same raw files give the same bytes.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import functools
import math
import subprocess
import sys
from pathlib import Path

from . import flops, store, systems
from .provenance import switch_on

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED = REPO_ROOT / "results"  # results/runs, results/report, results/summary.json
USER_RUNS = Path("runs")  # under the current directory: where experiments.sweep writes by default
BASELINES = ("v5-grouped_mm", "v5-eager", "v5-fsdp2-grouped_mm", "v5-ep", "v5-trainer", "v5-peft-lora")
# the systems that run the unmodified Trainer script (systems.TRAINER_NAMES): their first loss is
# compared with v5-trainer's (same weights, same data), the harness's rows' with the harness's v5
TRAINER_SYSTEMS = tuple(systems.TRAINER_NAMES.values())
TRAINER_NOTE = ("Trainer rows (v5-trainer, trainer, trainer-max): an unmodified transformers.Trainer script "
                "(experiments/trainer_script.py) with the Trainer's defaults; its step, timed from on_step_begin to "
                "on_step_end, adds gradient clipping and the learning-rate scheduler to forward, backward and the "
                "optimizer; its Δ1st loss is against v5-trainer's.")
SUMMARY_FIELDS = ("tokens_per_s_per_gpu", "step_ms", "tflops_per_gpu", "mfu", "peak_gib", "peak_reserved_gib", "activation_gib",
                  "routing", "seq", "batch", "commit", "run")
CSV_FIELDS = ("key", "run", "cell_id", "status", "gpu", "gpu_count", "model", "system", "routing", "seq", "batch",
              "dtype", "optimizer", "ckpt", "steps", "step_ms", "step_ms_min", "step_ms_max", "tokens_per_s_per_gpu",
              "tflops_per_gpu", "mfu", "peak_gib", "peak_reserved_gib", "activation_gib", "first_loss", "final_loss",
              "speedup_vs_v5-grouped_mm", "speedup_vs_v5-eager", "transformers", "torch", "triton", "cuda",
              "gpu_name", "commit", "dirty", "error")


# ---- loading -----------------------------------------------------------------------------------
def find_runs(root: Path) -> list[Path]:
    """Run directories (holding manifest.json or cells/) under ``root``, or ``root`` itself; routing
    ablations (``experiments.ablation``: manifest ``"kind": "ablation"``) have their own report."""
    root = Path(root)
    if (root / "cells").is_dir():
        return [] if _is_ablation(root) else [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "cells").is_dir() and not _is_ablation(p)) \
        if root.is_dir() else []


def _is_ablation(run_dir: Path) -> bool:
    manifest = run_dir / "manifest.json"
    return manifest.exists() and store.read_json(manifest).get("kind") == "ablation"


def load_records(run_dir: Path) -> list[dict]:
    """Cell records of a run, in manifest (grid) order, then any others by file name."""
    run_dir = Path(run_dir)
    files = {p.stem: p for p in sorted((run_dir / "cells").glob("*.json"))}
    order = []
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        order = [c["cell_id"] for c in store.read_json(manifest).get("cells", []) if c["cell_id"] in files]
    order += [k for k in files if k not in order]
    return [store.read_json(files[k]) for k in order]


# ---- rows --------------------------------------------------------------------------------------
def summary_key(row: dict) -> str:
    """The summary key of a row (see the module docstring); ``key_system``: the system part, when
    the row's flags re-derive the name's ``+<option>`` part."""
    suffix = "" if row["routing"] == "real" else f"@{row['routing']}"
    if row["ckpt"]:
        suffix += "+ckpt"
    if row.get("optimizer") not in (None, "adamw_fused", "adamw"):  # fused/plain AdamW: the device's norm
        suffix += f"+{row['optimizer']}"
    if row.get("batch", 1) not in (1, None):
        suffix += f"+b{row['batch']}"
    system = row.get("key_system") or row["system"]
    return f"{row['gpu']}x{row['gpu_count']}/{row['model']}/{system}{suffix}{_flag_suffix(row.get('flags'))}"


def _flag_suffix(flags: dict | None) -> str:
    """The key suffix of a measurement's switches, in name order: ``+<option>`` / ``+no_<option>``
    for an on/off moe_lab option (``option_flags``), ``+NAME=value`` for a recorded environment
    variable (``env_flags``)."""
    return "".join(f"+{k}={v}" if not isinstance(v, bool) else f"+{k}" if v else f"+no_{k}"
                   for k, v in sorted((flags or {}).items()))


def option_flags(rec: dict) -> dict:
    """The switches of a record that recorded its moe_lab Options (``options_changed``; None for v5)
    which its system's variant words do not already say: {option: True/False}. Read from the
    record alone (the name's words, not ``systems.parse``)."""
    base = ((rec.get("spec") or {}).get("system") or "").split("+")[0]
    named = {systems.OPTION_WORDS[w] for w in base.split("-") if w in systems.OPTION_WORDS}
    words = set(systems.OPTION_WORDS.values())
    return {k: v for k, v in (rec.get("options_changed") or {}).items()  # a word's option agrees with the name
            if isinstance(v, bool) and not (k in words and v == (k in named))}


def record_flags(rec: dict, run_flags: dict | None = None) -> dict:
    """The switches a cell's key names: from its recorded Options; else (older records) from its
    own recorded environment; else the run's (``run_flags``, from the manifest)."""
    if "options_changed" in rec:
        return option_flags(rec)
    if "env" in rec:  # a cell's own record of its switches wins (a resumed run may differ)
        return env_flags(rec["env"])
    return dict(run_flags or {})


def to_row(rec: dict, run: str, flags: dict | None = None) -> dict:
    """A flat row of one cell record; ``flags``: its switches away from their defaults
    (``record_flags``); a record with its Options recorded always uses those."""
    spec = rec.get("spec", {})
    m = rec.get("metrics") or {}
    hw = rec.get("hardware") or {}
    v = rec.get("versions") or {}
    git = rec.get("git") or {}
    gpu = hw.get("gpu", "unknown")
    row = {
        "run": run, "cell_id": rec.get("cell_id"), "status": rec.get("status"),
        "gpu": gpu, "gpu_count": spec.get("nproc", 1), "gpu_name": hw.get("gpu_name"),
        "model": rec.get("model_label"), "system": spec.get("system"), "routing": spec.get("routing"),
        "seq": spec.get("seq"), "batch": spec.get("batch"), "dtype": spec.get("dtype"),
        "optimizer": spec.get("optimizer"), "ckpt": bool(spec.get("ckpt")), "steps": spec.get("steps"),
        "transformers": v.get("transformers"), "torch": v.get("torch"), "triton": v.get("triton"),
        "cuda": v.get("cuda"), "commit": git.get("commit"), "dirty": git.get("dirty"),
        "error": (rec.get("error") or "").splitlines()[0][:300] if rec.get("error") else "",
        "system_kind": rec.get("system_kind") or (rec.get("system_spec") or {}).get("kind"),
        "peer_versions": (rec.get("system_spec") or {}).get("peer_versions"),
    }
    for k in ("step_ms", "step_ms_min", "step_ms_max", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu",
              "peak_gib", "activation_gib", "first_loss", "final_loss"):
        row[k] = m.get(k)
    row["activation_gib"] = _activation_gib(row["system"], m)
    row["peak_reserved_gib"] = m.get("peak_reserved_gib")
    if _has_variant(row["system"], "graphs"):
        # graph replays allocate nothing: the allocated peak misses their temporaries (cell.py), so
        # these rows have no allocated peak or activation, only the reserved peak (an upper bound;
        # absent before it was recorded)
        row["peak_gib"], row["activation_gib"] = None, None
    if "options_changed" in rec:  # the name's +<option> part comes back from the Options it ran with
        flags = option_flags(rec)
        row["key_system"] = (row["system"] or "").split("+")[0]
    row["flags"] = dict(flags or {})
    row["key"] = summary_key(row)
    return row


def _has_variant(system_name: str | None, *words: str) -> bool:
    """Whether a system name carries any of these variant words. Read from the name's words, not
    ``systems.parse``: records keep names of variants since removed (``-cudnnattn``)."""
    return bool(set(words) & set((system_name or "").split("+")[0].split("-")))


def _activation_gib(system_name, metrics: dict):
    """Peak minus what persists between steps. With the optimizer in backward (``-optbwd``,
    ``-optstream``) gradients do not persist: each is freed after its parameter's step, so the peak
    less parameters and optimizer state. Records before that rule (cell.static_bytes) subtracted
    every gradient as well, which made their activation negative; this derives it anew from the
    recorded peak and static sizes."""
    static = metrics.get("static_gib") or {}
    in_backward = _has_variant(system_name, systems.OPTIMIZER_IN_BACKWARD, systems.OPTIMIZER_ON_SIDE_STREAM)
    if metrics.get("peak_gib") is None or not static or not in_backward:
        return metrics.get("activation_gib")
    return metrics["peak_gib"] - static.get("params", 0.0) - static.get("optimizer", 0.0)


def _group(row: dict) -> tuple:
    return (row["gpu"], row["gpu_count"], row["model"], row["seq"], row["batch"], row["dtype"], row["optimizer"],
            row["ckpt"])


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<baseline> = tokens/s/GPU over the baseline's, same group and routing and run."""
    index = {}
    for r in rows:
        if r["status"] == "ok":
            index[(r["run"], _group(r), r["routing"], r["system"])] = r
    for r in rows:
        for b in BASELINES:
            base = index.get((r["run"], _group(r), r["routing"], b))
            ok = r["status"] == "ok" and base and base["tokens_per_s_per_gpu"]
            r[f"speedup_vs_{b}"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if ok else None


# On/off environment switches that changed what a cell measured before cells recorded their moe_lab
# Options (on = set to anything but "" or "0", as the code read them), with their defaults: a record
# of such a cell with one flipped keeps its own summary keys (``...+MOE_LAB_HOST_CHECKS=1``) instead
# of standing for the system. Block benchmarks (block.json) are still keyed this way.
# (MOE_LAB_TRITON_DW_PERSISTENT: a switch of commit 78efe7f only, removed since; its one run keeps its key.)
BEHAVIOUR_FLAGS = {"MOE_LAB_HOST_CHECKS": False, "MOE_LAB_TRITON_AUTOTUNE": True, "MOE_LAB_TRITON_TF32": False,
                   "MOE_LAB_TRITON_TMA": False, "MOE_LAB_TRITON_DW_PERSISTENT": False}


def env_flags(env: dict) -> dict:
    """The behaviour flags of a recorded environment that differ from their defaults, as "0" / "1"."""
    flags = {}
    for name, default in BEHAVIOUR_FLAGS.items():
        on = switch_on(env.get(name), default)
        if on != default:
            flags[name] = "1" if on else "0"
    return flags


def run_flags(run_dir: Path) -> dict:
    """The behaviour flags of a sweep run, from its manifest: the preset's ``env`` under the
    launching process's environment (which wins, as for the cells it starts)."""
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.exists():
        return {}
    m = store.read_json(manifest)
    return env_flags({**((m.get("sweep") or {}).get("env") or {}), **((m.get("provenance") or {}).get("env") or {})})


def collect_rows(run_dirs: list[Path]) -> list[dict]:
    rows = []
    for rd in sorted(run_dirs, key=lambda p: p.name):
        flags = run_flags(rd)
        for rec in load_records(rd):
            rows.append(to_row(rec, rd.name, record_flags(rec, flags)))
    add_speedups(rows)
    return rows


# ---- formatting --------------------------------------------------------------------------------
def _f(x, fmt="{:.1f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
    return "\n".join(out)


def _ref_loss(rows: list[dict], r: dict):
    refs = ("v5-trainer",) if r["system"] in TRAINER_SYSTEMS else ("v5-eager", "v5-grouped_mm", "v5-fsdp2-grouped_mm")
    for b in refs:
        for o in rows:
            if o["run"] == r["run"] and o["system"] == b and o["routing"] == r["routing"] and o["status"] == "ok" \
                    and _group(o) == _group(r):
                return o["first_loss"]
    return None


def group_tables(rows: list[dict]) -> str:
    """One Markdown table per (run, hardware, model, shape, recipe)."""
    parts = []
    groups = {}
    for r in rows:
        groups.setdefault((r["run"],) + _group(r), []).append(r)
    for (run, gpu, count, model, seq, batch, dtype, opt, ckpt), rs in groups.items():
        title = (f"### {gpu} x{count} - {model} - batch {batch} x seq {seq} - {dtype}, {opt}"
                 f"{', activation checkpointing' if ckpt else ''} (run `{run}`)")
        present = {r["system"] for r in rs if r["status"] == "ok"}
        baselines = [b for b in BASELINES if b in present]  # speed-up columns for the baselines this group ran
        lines = []
        for r in rs:
            ref = _ref_loss(rows, r)
            dloss = r["first_loss"] - ref if (r["status"] == "ok" and ref is not None) else None
            lines.append([r["system"], r["routing"], r["status"], _f(r["step_ms"]), _f(r["tokens_per_s_per_gpu"], "{:.0f}"),
                          _f(r["tflops_per_gpu"], "{:.2f}"), _f(r["mfu"], "{:.1%}"), _peak_cell(r),
                          _f(r["activation_gib"], "{:.2f}"), _f(r["first_loss"], "{:.4f}"), _f(dloss, "{:+.1e}"),
                          *[_f(r[f"speedup_vs_{b}"], "{:.2f}x") for b in baselines]])
        header = ["system", "routing", "status", "step ms", "tok/s/GPU", "TFLOP/s/GPU", "MFU", "peak GiB",
                  "act. GiB", "1st loss", "Δ1st loss", *[f"vs {b}" for b in baselines]]
        parts.append(title + "\n\n" + _table(header, lines))
        if any(r["system"] in TRAINER_SYSTEMS for r in rs):
            parts.append(TRAINER_NOTE)
        failed = [r for r in rs if r["status"] != "ok"]
        if failed:
            parts.append("Not ok:\n\n" + "\n".join(f"- `{r['system']}` / {r['routing']}: **{r['status']}**: {r['error']}"
                                                  for r in failed))
        vers = sorted({(r["transformers"], r["torch"], r["triton"], r["cuda"], r["gpu_name"], r["commit"], r["dirty"])
                       for r in rs}, key=str)
        parts.append("Versions: " + "; ".join(
            f"transformers {t}, torch {to}, triton {tr}, CUDA {c}, {g}, commit {str(cm)[:12]}{' (dirty)' if d else ''}"
            for t, to, tr, c, g, cm, d in vers))
    return "\n\n".join(parts)


def _peak_cell(row: dict) -> str:
    """The allocated peak, or for graph rows "<= reserved (reserved)"."""
    if row["peak_gib"] is None and row.get("peak_reserved_gib") is not None:
        return f"<= {row['peak_reserved_gib']:.2f} (reserved)"
    return _f(row["peak_gib"], "{:.2f}")


def markdown(rows: list[dict], source: str = "results/runs/") -> str:
    peaks = ", ".join(f"{k.upper()} {v:g}" for k, v in sorted(flops.PEAK_TFLOPS_BF16.items()))
    head = [
        "# moe_lab training-step benchmark",
        "",
        f"Generated by `python -m experiments.report` from raw runs under `{source}` (do not edit).",
        "Full training steps (forward, backward, optimizer) after warm-up; step time is the median of the measured",
        "steps; TFLOP/s are analytic model FLOPs (`experiments/flops.py`: 3x forward matmul FLOPs, causal attention",
        "counted at one half, no recomputation); MFU against the dense bf16 spec peak per GPU "
        f"({peaks} TFLOP/s); note: {flops.MEASURED_CEILING_NOTE}.",
        "Activation memory = peak allocated - (parameters + gradients + optimizer state); with the optimizer in",
        "backward (-optbwd, -optstream) gradients do not persist and are not subtracted. -graphs rows show",
        "`<= reserved` (the reserved peak, an upper bound: graph replays allocate nothing, so the allocated peak",
        "misses their temporaries) and no activation; rows recorded before the reserved peak was kept show none;",
        "summary.json keeps it as `peak_reserved_gib`. Δ1st loss: first-step",
        "loss minus v5-eager's (else v5-grouped_mm's) on the same routing; the same seed gives the same weights and data.",
        "",
    ]
    return "\n".join(head) + group_tables(rows) + "\n"


def run_table(records: list[dict], title: str = "", run: str = "this") -> str:
    """A Markdown table of one sweep's records (printed by the sweep CLI)."""
    rows = [to_row(r, run) for r in records]
    add_speedups(rows)
    return (f"## {title}\n\n" if title else "") + group_tables(rows) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in CSV_FIELDS})
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def commit_depth(commit: str | None) -> int:
    """How many commits of this repository's history lead to ``commit`` (-1 if unknown here): the
    order in which runs were measured, since run names are not chronological."""
    if not commit:
        return -1
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-list", "--count", commit],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return -1
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else -1


def latest_first_order(rows: list[dict]) -> list[dict]:
    """Rows ordered so that a later measurement comes later: by the commit it ran (history depth),
    then run name, then the rows' own order (a stable sort)."""
    depth = {}
    for r in rows:
        depth[r["run"]] = max(depth.get(r["run"], -1), commit_depth(r.get("commit")))
    return sorted(rows, key=lambda r: (depth[r["run"]], r["run"]))


def summary_entries(rows: list[dict]) -> dict:
    out = {}
    for r in latest_first_order(rows):  # by the commit each run measured, then run name: later wins
        if r["status"] != "ok":
            continue
        if r["key"] in out:
            log.warning("summary key %s: run %s replaces run %s", r["key"], r["run"], out[r["key"]]["run"])
        out[r["key"]] = {k: r[k] for k in SUMMARY_FIELDS}
    return out


def merge_summary(path: Path, entries: dict) -> dict:
    """Merge ``entries`` into the JSON object at ``path`` (other keys untouched); write atomically."""
    current = store.read_json(path) if Path(path).exists() else {}
    current.update(entries)
    store.write_json(path, current)
    return current


# ---- plots -------------------------------------------------------------------------------------
LEGACY_PLOTS = ("throughput.png", "memory.png", *(f"speedup_vs_{b}.png" for b in BASELINES))  # before figures.py


def plots(rows: list[dict], out_dir: Path, blocks: list[dict] | None = None) -> list[Path]:
    """The figures of ``experiments/figures.py`` (per GPU and model: headline step, MoE block, EP
    scaling); earlier figures of ours in ``out_dir`` that these rows no longer give are removed.
    [] when matplotlib is missing."""
    from . import figures

    out_dir = Path(out_dir)
    written = figures.figures(rows, blocks or [], out_dir, latest_first_order)
    if written is None:  # no matplotlib: leave any figures as they are
        return []
    if out_dir.is_dir():
        for old in sorted(out_dir.glob("*.png")):
            ours = old.name.startswith(figures.PREFIXES) or old.name in LEGACY_PLOTS
            if ours and old not in written:
                old.unlink()
    return written


# ---- MoE-block benchmarks (experiments.block_bench) --------------------------------------------------
BENCH_FILES = ("block.json", "breakdown.json", "attention.json", "*triton_kernels_bench.json")  # per run, beside cells/


def bench_files(runs: Path, name: str) -> list[Path]:
    """Every ``<run>/<name>`` under ``runs`` (by run name), or ``runs/<name>`` when ``runs`` is one run."""
    root = Path(runs)
    return sorted(root.glob(f"*/{name}")) + ([root / name] if (root / name).exists() else [])


def block_rows(runs: Path) -> list[dict]:
    """Rows of every ``block.json`` (MoE block forward+backward) under ``runs``, by run name."""
    files = bench_files(runs, "block.json")
    rows = []
    for path in files:
        rec = store.read_json(path)
        prov = rec.get("provenance", {})
        hw, git = prov.get("hardware", {}), prov.get("git", {})
        for r in rec["rows"]:
            suffix = "" if r["routing"] == "real" else f"@{r['routing']}"
            row = dict(r, run=path.parent.name, gpu=hw.get("gpu", "unknown"), gpu_name=hw.get("gpu_name"), commit=git.get("commit"),
                       torch=prov.get("versions", {}).get("torch"), triton=prov.get("versions", {}).get("triton"),
                       transformers=prov.get("versions", {}).get("transformers"))
            row["flags"] = env_flags(prov.get("env", {}))
            suffix += _flag_suffix(row["flags"])
            row["key"] = f"{row['gpu']}x1/moe-block/{r['model']}/{r['system']}{suffix}"
            rows.append(row)
    return rows


def block_markdown(rows: list[dict]) -> str:
    lines = ["# MoE block, forward + backward (one layer)", ""]
    for run in sorted({r["run"] for r in rows}):
        mine = [r for r in rows if r["run"] == run]
        base = {r["routing"]: r for r in mine if r["system"] == "v5-grouped_mm" and r["status"] == "ok"}
        first = mine[0]
        lines += [f"## {run}: {first['model']}, {first['tokens']} tokens, {first['gpu']}", "",
                  "| system | routing | ms (fwd+bwd) | ms (fwd) | TFLOP/s | activation GiB | vs v5-grouped_mm |",
                  "|---|---|---|---|---|---|---|"]
        for r in mine:
            if r["status"] != "ok":
                lines.append(f"| {r['system']} | {r['routing']} | {r['status']}: {r.get('error', '')[:80]} | | | | |")
                continue
            b = base.get(r["routing"])
            ratio = f"{b['ms'] / r['ms']:.2f}x" if b else ""
            act = f"{r['activation_gib']:.3f}" if r.get("activation_gib") is not None else "-"
            lines.append(f"| {r['system']} | {r['routing']} | {r['ms']:.3f} | {r['ms_forward']:.3f} | {r['tflops']:.1f} | "
                         f"{act} | {ratio} |")
        lines += ["", f"Versions: transformers {first['transformers']}, torch {first['torch']}, triton {first['triton']}, "
                      f"commit {str(first['commit'])[:12]}", ""]
    return "\n".join(lines)


def block_summary_entries(rows: list[dict]) -> dict:
    fields = ("ms", "ms_forward", "tflops", "activation_gib", "routing", "tokens", "commit", "run")
    return {r["key"]: {k: r.get(k) for k in fields} for r in latest_first_order(rows) if r["status"] == "ok"}


def breakdown_markdown(runs: Path) -> str | None:
    """Every ``breakdown.json`` (experiments.step_breakdown) under ``runs`` as tables, or None if none."""
    files = bench_files(runs, "breakdown.json")
    if not files:
        return None
    from .step_breakdown import format_table

    lines = ["# Where a training step's time goes (ms, medians)", ""]
    for path in files:
        rec = store.read_json(path)
        prov = rec.get("provenance", {})
        versions, git = prov.get("versions", {}), prov.get("git", {})
        lines += [f"## {path.parent.name}: {rec['model']}, {rec['layers']} layers, batch {rec['batch']} x {rec['seq']}, "
                  f"{prov.get('hardware', {}).get('gpu', 'unknown')}, optimizer {rec.get('optimizer', 'adamw_fused')} "
                  "unless a row names its own", "", format_table(rec["rows"]), "",
                  f"Versions: transformers {versions.get('transformers')}, torch {versions.get('torch')}, "
                  f"triton {versions.get('triton')}, commit {str(git.get('commit'))[:12]}", ""]
    return "\n".join(lines)


def attention_markdown(runs: Path) -> str | None:
    """Every ``attention.json`` (experiments.attention_bench) under ``runs`` as tables, or None if none."""
    files = bench_files(runs, "attention.json")
    if not files:
        return None
    lines = ["# Causal attention, forward + backward (one layer's call)", ""]
    for path in files:
        rec = store.read_json(path)
        if not rec.get("rows"):
            continue
        prov = rec.get("provenance", {})
        versions, git = prov.get("versions", {}), prov.get("git", {})
        first = rec["rows"][0]
        lines += [f"## {path.parent.name}: {first['model']}, {first['heads']} heads / {first['kv_heads']} KV heads x "
                  f"{first['head_dim']}, {first['tokens']} tokens, {prov.get('hardware', {}).get('gpu', 'unknown')}", "",
                  "| batch | path | status | ms (fwd+bwd) | ms (fwd) | TFLOP/s | vs sdpa | max abs diff vs sdpa (out, dq, dk, dv) |",
                  "|---|---|---|---|---|---|---|---|"]
        base = {r["batch"]: r["ms"] for r in rec["rows"] if r["path"] == "sdpa" and r["status"] == "ok"}
        for r in rec["rows"]:
            if r["status"] != "ok":
                error = r.get("error", "")[:80].replace("|", "\\|")
                lines.append(f"| {r['batch']} | {r['path']} | {r['status']}: {error} | - | - | - | - | - |")
                continue
            d = r.get("max_abs_diff_vs_sdpa")
            diffs = ", ".join(f"{d[n]:.1e}" for n in ("out", "dq", "dk", "dv")) if d else "-"
            ratio = f"{base[r['batch']] / r['ms']:.2f}x" if r["batch"] in base else "-"
            lines.append(f"| {r['batch']} | {r['path']} | ok | {r['ms']:.3f} | {r['ms_forward']:.3f} | {r['tflops']:.1f} | "
                         f"{ratio} | {diffs} |")
        lines += ["", f"Versions: torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
                      f"commit {str(git.get('commit'))[:12]}", ""]
    return "\n".join(lines)


def kernel_bench_markdown(runs: Path) -> str | None:
    """Every ``*triton_kernels_bench.json`` (``python -m triton_kernels.bench``) under ``runs`` as
    tables (medians; "vs torch" = torch's median over Triton's for the same op), or None if none."""
    files = bench_files(runs, "*triton_kernels_bench.json")
    if not files:
        return None
    lines = ["# Triton kernels against their PyTorch equivalents (`python -m triton_kernels.bench`)", ""]
    for path in files:
        rec = store.read_json(path)
        m = rec.get("manifest", {})
        lines += [f"## {path.parent.name}/{path.name}: {m.get('gpu')}, torch {m.get('torch')}, triton {m.get('triton')}, "
                  f"commit {str(m.get('commit'))[:12]}{' (dirty)' if m.get('dirty') else ''}"
                  f"{', MOE_LAB_TRITON_TMA=' + m['tma'] if m.get('tma') not in (None, '0') else ''}", "",
                  f"Command: `{m.get('command')}`; timer: {m.get('timer')}.", "",
                  "| group | op | shape | impl | ms (median) | samples | TFLOP/s | GB/s | vs torch |",
                  "|---|---|---|---|---|---|---|---|---|"]
        torch_ms = {(r["group"], r["op"], r["shape"]): r["ms"] for r in rec.get("rows", []) if r["impl"] == "torch"}
        for r in rec.get("rows", []):
            base = torch_ms.get((r["group"], r["op"], r["shape"])) if r["impl"] != "torch" else None
            vs_torch = _f(base / r["ms"] if base and r["ms"] else None, "{:.2f}x")  # (a failed candidate has no ms)
            lines.append(f"| {r['group']} | {r['op']} | {r['shape']} | {r['impl']} | {_f(r['ms'], '{:.4f}')} | "
                         f"{len(r.get('ms_samples') or []) or '-'} | {_f(r.get('tflops'))} | {_f(r.get('gbps'))} | "
                         f"{vs_torch} |")
        lines.append("")
    return "\n".join(lines)


# ---- peers: other tools beside v5 and moe_lab, same run ----------------------------------------------
def _versions_text(versions: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v) or "-"


def _peer_step_tables(rows: list[dict]) -> list[str]:
    """One table per run and geometry that has a peer step row: v5's grouped_mm, each peer, moe_lab's
    default (auto) and its fastest row of that run; the ratios are tokens/s against v5 and, for moe_lab's
    rows, against the fastest peer that ran."""
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["run"], _group(r), r["routing"]), []).append(r)
    for (run, group, routing), mine in sorted(groups.items(), key=lambda kv: str(kv[0])):
        peers_here = [r for r in mine if r["system_kind"] == "peer"]
        if not peers_here:
            continue
        ok = [r for r in mine if r["status"] == "ok" and r["tokens_per_s_per_gpu"]]
        base = next((r for r in ok if r["system"] == "v5-grouped_mm"), None)
        ours = [r for r in ok if (r["system_kind"] or "").startswith("moe_lab")]
        shown = ([base] if base else []) + peers_here
        default = next((r for r in ours if r["system"] == "auto"), None)
        fastest = max(ours, key=lambda r: r["tokens_per_s_per_gpu"], default=None)
        shown += [r for r in (default, fastest) if r is not None and r not in shown]
        best_peer = max((r for r in peers_here if r in ok), key=lambda r: r["tokens_per_s_per_gpu"], default=None)
        first = mine[0]
        lines += [f"## {run}: {first['model']}, batch {first['batch']} x seq {first['seq']}, {first['dtype']}, "
                  f"{first['gpu']}, routing {routing} (step)", "",
                  "| system | kind | status | step ms | tok/s/GPU | peak GiB | vs v5-grouped_mm | vs best peer | versions or reason |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in shown:
            good = r in ok
            vs_v5 = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x" if good and base else ""
            vs_peer = (f"{r['tokens_per_s_per_gpu'] / best_peer['tokens_per_s_per_gpu']:.2f}x"
                       if good and best_peer and (r["system_kind"] or "").startswith("moe_lab") else "")
            note = _versions_text(r["peer_versions"]) if r["system_kind"] == "peer" else ""
            if not good:
                note = (f"{note}; " if note != "-" and note else "") + (r["error"] or "")[:160]
            lines.append(f"| {r['system']} | {r['system_kind']} | {r['status']} | {_f(r['step_ms'])} | "
                         f"{_f(r['tokens_per_s_per_gpu'], '{:.0f}')} | {_f(r['peak_gib'], '{:.2f}')} | {vs_v5} | {vs_peer} | {note} |")
        lines += ["", f"Versions: transformers {first['transformers']}, torch {first['torch']}, triton {first['triton']}, "
                      f"commit {str(first['commit'])[:12]}", ""]
    return lines


def _peer_block_tables(blocks: list[dict]) -> list[str]:
    """One table per block benchmark run that has a peer row (the same MoE layer, forward + backward)."""
    lines = []
    for run in sorted({b["run"] for b in blocks}):
        mine = [b for b in blocks if b["run"] == run]
        if not any(b.get("peer") for b in mine):
            continue
        first = mine[0]
        for routing in sorted({b["routing"] for b in mine}):
            here = [b for b in mine if b["routing"] == routing]
            ok = {b["system"]: b for b in here if b["status"] == "ok"}
            base = ok.get("v5-grouped_mm")
            peer_ms = [b["ms"] for b in here if b.get("peer") and b["status"] == "ok"]
            lines += [f"## {run}: {first['model']}, {first['tokens']} tokens, {first['gpu']}, routing {routing} (MoE block)", "",
                      "| system | status | ms (fwd+bwd) | TFLOP/s | vs v5-grouped_mm | vs best peer | versions or reason |",
                      "|---|---|---|---|---|---|---|"]
            for b in here:
                is_peer = bool(b.get("peer"))
                note = _versions_text((b.get("peer") or {}).get("versions")) if is_peer else ""
                if b["status"] != "ok":
                    lines.append(f"| {b['system']} | {b['status']} | | | | | {note}; {str(b.get('error', ''))[:160]} |")
                    continue
                vs_v5 = f"{base['ms'] / b['ms']:.2f}x" if base else ""
                vs_peer = f"{min(peer_ms) / b['ms']:.2f}x" if peer_ms and not is_peer and not b["system"].startswith("v5") else ""
                lines.append(f"| {b['system']} | ok | {b['ms']:.3f} | {b['tflops']:.1f} | {vs_v5} | {vs_peer} | {note} |")
            lines += ["", f"Versions: transformers {first['transformers']}, torch {first['torch']}, triton {first['triton']}, "
                          f"commit {str(first['commit'])[:12]}", ""]
    return lines


def peers_markdown(rows: list[dict], blocks: list[dict]) -> str | None:
    """``peers.md``: every run where a peer system (``experiments/peers.py``) was measured or recorded
    unavailable, beside v5 and moe_lab in that run; None where no run has one."""
    body = _peer_step_tables(rows) + _peer_block_tables(blocks)
    if not body:
        return None
    return "\n".join(["# Peers: other tools beside v5 and moe_lab, same run, same GPU", "",
                      "Each table is one run. \"vs best peer\": moe_lab's rows against the fastest peer that ran there "
                      "(tokens/s for steps, time for blocks). A peer that could not run says why.", ""] + body)


def generate(runs: Path, out_dir: Path, summary: Path | None, make_plots: bool = True) -> dict:
    """Regenerate every derived file; returns {"rows": n, "files": [...]}."""
    run_dirs = find_runs(runs)
    rows = collect_rows(run_dirs)
    out_dir = Path(out_dir)
    committed = Path(runs).resolve() == (COMMITTED / "runs").resolve()
    store.write_text(out_dir / "results.md", markdown(rows, "results/runs/" if committed else f"{runs}"))
    store.write_text(out_dir / "results.csv", to_csv(rows))
    files = [out_dir / "results.md", out_dir / "results.csv"]
    blocks = block_rows(runs)
    if make_plots:
        files += plots(rows, out_dir, blocks)
    if blocks:
        store.write_text(out_dir / "moe_block.md", block_markdown(blocks))
        files.append(out_dir / "moe_block.md")
    breakdown = breakdown_markdown(runs)
    if breakdown is not None:
        store.write_text(out_dir / "step_breakdown.md", breakdown)
        files.append(out_dir / "step_breakdown.md")
    for name, text in (("attention.md", attention_markdown(runs)), ("kernels.md", kernel_bench_markdown(runs)),
                       ("peers.md", peers_markdown(rows, blocks))):
        if text is not None:
            store.write_text(out_dir / name, text)
            files.append(out_dir / name)
    if summary is not None:
        merge_summary(summary, {**summary_entries(rows), **block_summary_entries(blocks)})
        files.append(Path(summary))
    return {"rows": len(rows), "runs": [p.name for p in run_dirs], "files": [str(f) for f in files]}


def resolve_paths(args) -> tuple[Path, Path, Path | None]:
    """(runs, out, summary or None) of parsed arguments: ``--results`` -> the committed ``results/``,
    else the user folder ``runs/`` (current directory); ``--runs``/``--out``/``--summary`` win.
    Raises ValueError when a path to write lies in the committed ``results/`` without ``--results``."""
    base_runs, base_out, base_summary = ((COMMITTED / "runs", COMMITTED / "report", COMMITTED / "summary.json")
                                         if args.results else
                                         (USER_RUNS, USER_RUNS / "report", USER_RUNS / "summary.json"))
    runs = Path(args.runs) if args.runs else base_runs
    out = Path(args.out) if args.out else base_out
    summary = None if args.no_summary else (Path(args.summary) if args.summary else base_summary)
    if not args.results:
        for what, path in (("--out", out), ("--summary", summary)):
            if path is not None and (path.resolve() == COMMITTED.resolve() or COMMITTED.resolve() in path.resolve().parents):
                raise ValueError(f"{what} {path} is in the committed results/ folder: pass --results to regenerate "
                                 "the committed report (maintainers), or write elsewhere")
    return runs, out, summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Regenerate tables, plots and summary.json from raw runs.")
    ap.add_argument("--results", "--write-committed", dest="results", action="store_true",
                    help="report on the committed results/runs and rewrite results/report and results/summary.json")
    ap.add_argument("--runs", default=None, help=f"a run directory or a folder of them (default {USER_RUNS}/, "
                                                 "or results/runs with --results)")
    ap.add_argument("--out", default=None, help=f"where tables and figures go (default {USER_RUNS}/report)")
    ap.add_argument("--summary", default=None, help=f"summary JSON to merge into (default {USER_RUNS}/summary.json)")
    ap.add_argument("--no-summary", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        runs, out, summary = resolve_paths(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not find_runs(runs) and not any(bench_files(runs, n) for n in BENCH_FILES):
        print(f"error: no runs under {runs} (python -m experiments.sweep writes them to {USER_RUNS}/<preset>; "
              "--runs DIR reads another folder, --results the committed results/runs)", file=sys.stderr)
        return 2
    res = generate(runs, out, summary, make_plots=not args.no_plots)
    print(f"{res['rows']} cells from {len(res['runs'])} runs -> " + ", ".join(res["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
