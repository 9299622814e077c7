"""The report's figures: per GPU and model, a headline step figure, the MoE block, EP scaling.

Every figure holds one GPU model only (grouped by the GPU name each record's provenance gives; a CPU
run is its own group, never beside GPU bars) and one model, and is at most 1600 px wide:

* ``headline-<gpu>-<model>.png``: the training step, v5 eager, v5 grouped_mm (v5's default),
  moe_lab's default backend (``torch``) and moe_lab's fastest system; tokens/s per GPU and peak
  memory side by side, each bar with its value and its ratio to v5 grouped_mm. One shape (batch x
  sequence, dtype) per figure: the one where most of the four were measured, then the smallest batch.
* ``moe-block-<gpu>-<model>.png``: one MoE block forward + backward (``block_bench``) per system and
  routing regime, time (log scale) with the speed-up over v5 grouped_mm, and activation memory.
* ``ep-scaling-<gpu>-<model>.png`` (when runs on several GPUs exist): tokens/s per GPU and peak
  memory for each GPU count, v5 (one GPU: grouped_mm; N GPUs: FSDP2 and v5's expert parallel) and
  moe_lab (one GPU: the backends the EP systems use; N GPUs: ``ep<N>-<dispatcher>-<backend>``), each
  bar with its ratio to the v5 baseline of its GPU count.

Each bar is the latest measurement of its system (by the commit it ran, then run name, as the
summary), with real routing where the figure does not say otherwise; runs with a behaviour flag set
away from its default (``+MOE_LAB_TRITON_TMA=1``) are left out. The run behind each bar is named
under it. Same rows, same bytes (no clock, no PNG software tag).
"""
from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

from . import store, systems

log = logging.getLogger(__name__)

PREFIXES = ("headline-", "moe-block-", "ep-scaling-")
MAX_WIDTH_PX = 1600
DPI = 100
BASELINE = "v5-grouped_mm"
MOE_LAB_DEFAULT = "torch"  # the default import ran the torch backend in the committed runs (before "auto")
ROUTINGS = ("real", "balanced", "skewed")
_V5 = ("v5-eager", "v5-grouped_mm")
_PLAIN_OPTIMIZERS = (None, "adamw_fused", "adamw")  # the device's AdamW (fused on GPUs): no "+<optimizer>" key
COLORS = {"v5-eager": "#bbbbbb", "v5": "#888888", "default": "#88aadd", "fastest": "#2255aa",
          "real": "#2255aa", "balanced": "#66aa77", "skewed": "#dd8844"}


# ---- choosing what to draw ---------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", str(text)).strip("-") or "unknown"


def gpu_groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by GPU, as {(file slug, full GPU name): rows}. The full name (provenance's
    ``gpu_name``) separates GPUs that share a short name; CPU rows form their own groups."""
    names = {}
    for r in rows:
        names.setdefault((r.get("gpu") or "unknown", r.get("gpu_name") or r.get("gpu") or "unknown"), []).append(r)
    shorts = {}
    for short, full in names:
        shorts.setdefault(short, []).append(full)
    return {(short if len(shorts[short]) == 1 else f"{short}-{slug(full).lower()}", full): rs
            for (short, full), rs in sorted(names.items())}


def latest(rows: list[dict], order) -> dict[str, dict]:
    """{summary key: the latest ok row} without rows run with a behaviour flag; ``order`` sorts
    rows so that a later measurement comes later (report.latest_first_order)."""
    out = {}
    for r in order([r for r in rows if r["status"] == "ok" and not r.get("flags")]):
        out[r["key"]] = r
    return out


def _plain(r: dict) -> bool:
    return r.get("optimizer") in _PLAIN_OPTIMIZERS and not r.get("ckpt")


def headline_data(rows: list[dict], order) -> list[dict]:
    """One entry per (GPU, model): the shape chosen and its four bars [(role, row or None)]."""
    out = []
    for (gpu, gpu_name), rs in gpu_groups(rows).items():
        one = [r for r in latest(rs, order).values() if r["gpu_count"] == 1 and r["routing"] == "real" and not r["ckpt"]]
        for model in sorted({r["model"] for r in one}):
            shapes = {}
            for r in one:
                if r["model"] == model:
                    shapes.setdefault((r["batch"], r["seq"], r["dtype"]), []).append(r)
            best = None
            for shape, srs in sorted(shapes.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
                bars = _headline_bars(srs)
                score = sum(b is not None for _, b in bars)
                if bars[1][1] is not None and (best is None or score > best[0]):
                    best = (score, shape, bars)
            if best is not None and best[0] >= 2:
                out.append({"gpu": gpu, "gpu_name": gpu_name, "model": model, "shape": best[1], "bars": best[2]})
    return out


def _headline_bars(rows: list[dict]) -> list[tuple[str, dict | None]]:
    by_system = {r["system"]: r for r in rows if _plain(r)}
    trainer_loop = set(systems.TRAINER_NAMES.values())  # another kind of step (the Trainer's loop)
    moe_lab = [r for r in rows if not r["system"].startswith("v5-") and r["system"] not in trainer_loop]
    fastest = max(moe_lab, key=lambda r: (r["tokens_per_s_per_gpu"] or 0.0, r["key"]), default=None)
    return [("v5 eager", by_system.get("v5-eager")), ("v5 grouped_mm\n(v5's default)", by_system.get(BASELINE)),
            (f"moe_lab default\n({MOE_LAB_DEFAULT})", by_system.get(MOE_LAB_DEFAULT)), ("moe_lab fastest", fastest)]


def block_data(blocks: list[dict], order) -> list[dict]:
    """One entry per (GPU, model) of the block benchmark: systems (v5 first, then moe_lab slowest to
    fastest on real routing) and {(system, routing): row}."""
    out = []
    for (gpu, gpu_name), rs in gpu_groups(blocks).items():
        rows = latest(rs, order).values()
        for model in sorted({r["model"] for r in rows}):
            cells = {(r["system"], r["routing"]): r for r in rows if r["model"] == model and r["routing"] in ROUTINGS}
            systems = sorted({s for s, _ in cells}, key=lambda s: (s not in _V5, _V5.index(s) if s in _V5 else 0,
                                                                   -_ms(cells, s), s))
            out.append({"gpu": gpu, "gpu_name": gpu_name, "model": model, "systems": systems, "cells": cells})
    return out


def _ms(cells: dict, system: str) -> float:
    for routing in ROUTINGS:
        if (system, routing) in cells:
            return cells[(system, routing)]["ms"]
    return math.inf


def single_gpu_counterpart(system: str) -> str | None:
    """``ep<N>-<dispatcher>-<backend>[-variants]`` -> ``<backend>[-variants]`` without ``-fsdp``;
    v5's multi-GPU systems -> v5-grouped_mm; None for a one-GPU system."""
    m = re.match(r"^ep\d+-[a-z0-9_]+-(.+)$", system)
    if m:
        return "-".join(w for w in m.group(1).split("-") if w != "fsdp")
    if system == "v5-ep" or system.startswith("v5-fsdp2-"):
        return BASELINE
    return None


def ep_data(rows: list[dict], order) -> list[dict]:
    """One entry per (GPU, model) with runs on several GPUs: the shape most of them ran and, per
    GPU count, the bars [(system, row)] and the v5 baseline row of that count."""
    out = []
    for (gpu, gpu_name), rs in gpu_groups(rows).items():
        ok = [r for r in latest(rs, order).values() if r["routing"] == "real"]
        for model in sorted({r["model"] for r in ok if r["gpu_count"] > 1}):
            multi = [r for r in ok if r["model"] == model and r["gpu_count"] > 1]
            shapes = {}
            for r in multi:
                k = (r["batch"], r["seq"], r["dtype"], r["optimizer"], r["ckpt"])
                shapes[k] = shapes.get(k, 0) + 1
            shape = max(sorted(shapes, key=str), key=lambda k: shapes[k])
            same = [r for r in ok if r["model"] == model and (r["batch"], r["seq"], r["dtype"], r["optimizer"], r["ckpt"]) == shape]
            wanted = {c for c in (single_gpu_counterpart(r["system"]) for r in same if r["gpu_count"] > 1) if c}
            counts = {}
            for r in same:
                if r["gpu_count"] > 1 or r["system"] in wanted:
                    counts.setdefault(r["gpu_count"], []).append(r)
            sections = []
            for n in sorted(counts):
                base_name = BASELINE if n == 1 else "v5-fsdp2-grouped_mm"
                bars = sorted(counts[n], key=lambda r: (not r["system"].startswith("v5-"), r["system"]))
                sections.append({"gpus": n, "bars": bars, "baseline": next((r for r in bars if r["system"] == base_name), None),
                                 "baseline_name": base_name})
            out.append({"gpu": gpu, "gpu_name": gpu_name, "model": model, "shape": shape, "sections": sections})
    return out


# ---- drawing -----------------------------------------------------------------------------------
def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _wrap(name: str, width: int = 26) -> str:
    """A long system name broken after its dashes, lines of at most ``width`` characters where the
    words allow."""
    lines, line = [], ""
    for word in name.split("-"):
        piece = word if not line else "-" + word
        if line and len(line) + len(piece) > width:
            lines.append(line + "-")
            line = word
        else:
            line += piece
    return "\n".join(lines + [line])


def _memory(r: dict) -> tuple[float | None, bool]:
    """(GiB, is the reserved upper bound): graph rows have only the reserved peak."""
    if r.get("peak_gib") is not None:
        return r["peak_gib"], False
    return r.get("peak_reserved_gib"), r.get("peak_reserved_gib") is not None


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    store.write_bytes(path, buf.getvalue())
    return path


def _device(entry: dict) -> str:
    """The GPU's full name, or "CPU (<processor>)" for a CPU run."""
    if entry["gpu"].startswith("cpu"):
        return "CPU" if entry["gpu_name"] in ("cpu", "", None) else f"CPU ({entry['gpu_name']})"
    return entry["gpu_name"]


def _shape_text(batch, seq, dtype) -> str:
    return f"batch {batch} x {seq} tokens, {dtype}"


def _optimizer_text(r: dict) -> str:
    return "" if r.get("optimizer") in _PLAIN_OPTIMIZERS else f"\n+ {r['optimizer']}"


def draw_headline(plt, entry: dict, path: Path) -> Path:
    bars = entry["bars"]
    base = bars[1][1]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(15.0, 6.4), layout="constrained")
    labels = []
    for role, r in bars:
        if r is None:
            labels.append(f"{role}\n(not measured)")
        elif role.startswith("moe_lab fastest"):
            labels.append(f"{role}\n{_wrap(r['system'])}{_optimizer_text(r)}\n[{r['run']}]")
        else:
            labels.append(f"{role}{_optimizer_text(r)}\n[{r['run']}]")
    colors = [COLORS["v5-eager"], COLORS["v5"], COLORS["default"], COLORS["fastest"]]
    x = range(len(bars))
    tps = [r["tokens_per_s_per_gpu"] if r else math.nan for _, r in bars]
    ax_t.bar(x, tps, color=colors)
    top = max([v for v in tps if v == v] or [1.0])
    eager = bars[0][1]
    for i, (_, r) in enumerate(bars):
        if r is None:
            continue
        ratio = f"\n{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x" if base else ""
        if eager and r is not eager:
            ratio += f" ({r['tokens_per_s_per_gpu'] / eager['tokens_per_s_per_gpu']:.1f}x)"
        ax_t.text(i, r["tokens_per_s_per_gpu"] + top * 0.01, f"{_k(r['tokens_per_s_per_gpu'])}{ratio}",
                  ha="center", va="bottom", fontsize=11, fontweight="bold")
    ax_t.set_ylim(0, top * 1.18)
    ax_t.set_ylabel("tokens/s per GPU (higher is better)")
    ax_t.set_title("training step throughput")

    mem = [_memory(r) if r else (None, False) for _, r in bars]
    vals = [m if m is not None else math.nan for m, _ in mem]
    ax_m.bar(x, vals, color=colors, hatch=None)
    for i, (m, reserved) in enumerate(mem):
        if reserved:
            ax_m.bar([i], [m], color="none", edgecolor="black", hatch="//")
    base_mem = _memory(base)[0] if base else None
    top_m = max([v for v in vals if v == v] or [1.0])
    for i, (m, reserved) in enumerate(mem):
        if m is None:
            continue
        ratio = f"\n{m / base_mem:.2f}x" if base_mem else ""
        ax_m.text(i, m + top_m * 0.01, f"{'<= ' if reserved else ''}{m:.1f} GiB{ratio}",
                  ha="center", va="bottom", fontsize=11, fontweight="bold")
    ax_m.set_ylim(0, top_m * 1.18)
    if all(m is None for m, _ in mem):
        ax_m.text(1.5, top_m * 0.5, "no peak memory: it is measured on CUDA devices only", ha="center", fontsize=11)
    ax_m.set_ylabel("peak memory, GiB (lower is better)")
    ax_m.set_title("peak memory (hatched: reserved peak, an upper bound, for CUDA-graph rows)")
    for ax in (ax_t, ax_m):
        ax.set_xticks(list(x))
        ax.set_xlim(-0.6, len(bars) - 0.4)
        ax.set_xticklabels(labels, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(f"{_device(entry)} - {entry['model']} - training step, {_shape_text(*entry['shape'])}, real routing\n"
                 "ratios vs v5 grouped_mm (tokens/s: vs v5 eager in brackets); [run] of each bar", fontsize=12)
    out = _save(fig, path)
    plt.close(fig)
    return out


def draw_block(plt, entry: dict, path: Path) -> Path:
    systems, cells = entry["systems"], entry["cells"]
    routings = [rt for rt in ROUTINGS if any((s, rt) in cells for s in systems)]
    n, k = len(systems), len(routings)
    height = max(4.5, 0.32 * n * k + 1.8)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(15.0, height), layout="constrained",
                                     gridspec_kw={"width_ratios": [3, 2]})
    step = 1.0 / (k + 1)
    first = next(iter(cells.values()))
    base_ms = [r["ms"] for (s, _), r in cells.items() if s == BASELINE]
    # a linear scale that shows the fast systems apart: up to 3x v5 grouped_mm's time, slower bars cut
    limit = 3.0 * max(base_ms) if base_ms else 1.3 * max(r["ms"] for r in cells.values())
    for j, rt in enumerate(routings):
        ys, ms, texts = [], [], []
        for i, s in enumerate(systems):
            r = cells.get((s, rt))
            if r is None:
                continue
            base = cells.get((BASELINE, rt))
            ys.append(i + (j - (k - 1) / 2) * step)
            ms.append(r["ms"])
            texts.append(f" {r['ms']:.2f} ms" + (f"  {base['ms'] / r['ms']:.2f}x" if base else ""))
        shown = [min(v, limit) for v in ms]
        ax_t.barh(ys, shown, height=step * 0.9, color=COLORS[rt], label=f"{rt} routing")
        for y, v, t in zip(ys, ms, texts):
            if v > limit:  # off the scale: the bar stops at the edge, its number says how far
                ax_t.text(limit, y, f"{t.strip()} (off scale) ", va="center", ha="right", fontsize=8, color="white",
                          fontweight="bold")
            else:
                ax_t.text(v, y, t, va="center", fontsize=8)
    ax_t.set_xlim(0, limit * 1.02)
    ax_t.set_xlabel("ms per forward + backward (lower is better); ratio: speed-up over v5 grouped_mm, same routing")
    ax_t.legend(loc="lower right", fontsize=9)

    act = []
    for s in systems:
        r = cells.get((s, "real"))
        act.append(r["activation_gib"] if r is not None and r.get("activation_gib") is not None else math.nan)
    ax_m.barh(range(n), act, height=0.6, color=COLORS["real"])
    base_act = cells.get((BASELINE, "real"), {}).get("activation_gib")
    top = max([a for a in act if a == a] or [1.0])
    for i, a in enumerate(act):
        if a == a:
            ax_m.text(a, i, f" {a:.3f}" + (f"  {a / base_act:.2f}x" if base_act else ""), va="center", fontsize=8)
        else:
            ax_m.text(top * 0.02, i, "not measured (CUDA graph replays allocate nothing)" if "graphs" in systems[i]
                      else "not measured", va="center", fontsize=8)
    ax_m.set_xlim(0, top * 1.45)
    ax_m.set_xlabel("activation memory, GiB, real routing (ratio vs v5 grouped_mm)")
    for ax in (ax_t, ax_m):
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"{s}\n[{_run_of(cells, s)}]" for s in systems], fontsize=8)
        ax.set_ylim(n - 0.5, -0.5)  # first system on top, the same rows in both panels
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    ax_m.set_yticklabels([])
    fig.suptitle(f"{_device(entry)} - {entry['model']} - one MoE block, forward + backward, "
                 f"{first['tokens']} tokens\n(each bar the latest measurement of its system and routing; [run] under its name)", fontsize=12)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _run_of(cells: dict, system: str) -> str:
    runs = sorted({r["run"] for (s, _), r in cells.items() if s == system})
    return ", ".join(runs)


def draw_ep(plt, entry: dict, path: Path) -> Path:
    labels, tps, mem, texts, mtexts, colors, seps = [], [], [], [], [], [], []
    for sec in entry["sections"]:
        base = sec["baseline"]
        if labels:
            seps.append(len(labels) - 0.5)
        for r in sec["bars"]:
            n = sec["gpus"]
            labels.append(f"{n} GPU{'s' if n > 1 else ''}: {r['system']}  [{r['run']}]")
            t = r["tokens_per_s_per_gpu"]
            tps.append(t)
            texts.append(f" {_k(t)}" + (f"  {t / base['tokens_per_s_per_gpu']:.2f}x" if base else ""))
            m, reserved = _memory(r)
            mem.append(m if m is not None else math.nan)
            mtexts.append("" if m is None else f" {'<= ' if reserved else ''}{m:.1f}")
            colors.append(COLORS["v5"] if r["system"].startswith("v5-") else COLORS["fastest"])
    n = len(labels)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(15.0, max(4.5, 0.36 * n + 1.8)), layout="constrained",
                                     gridspec_kw={"width_ratios": [3, 2]})
    ax_t.barh(range(n), tps, color=colors, height=0.7)
    for i, t in enumerate(texts):
        ax_t.text(tps[i], i, t, va="center", fontsize=9, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3})
    ax_t.set_xlim(0, max(tps) * 1.3)
    one = next((s["baseline"] for s in entry["sections"] if s["gpus"] == 1 and s["baseline"]), None)
    if one:
        ax_t.axvline(one["tokens_per_s_per_gpu"], color="black", linestyle="--", linewidth=0.8)
        ax_t.text(one["tokens_per_s_per_gpu"], -0.75, " v5 grouped_mm on 1 GPU", fontsize=8)
    ax_t.set_xlabel("tokens/s per GPU (higher is better); ratio vs v5 grouped_mm (1 GPU) or v5 FSDP2 grouped_mm (N GPUs)")
    ax_m.barh(range(n), mem, color=colors, height=0.7)
    for i, t in enumerate(mtexts):
        if t:
            ax_m.text(mem[i], i, t, va="center", fontsize=9)
    ax_m.set_xlim(0, max([m for m in mem if m == m] or [1.0]) * 1.25)
    ax_m.set_xlabel("peak memory per GPU, GiB (lower is better)")
    for ax in (ax_t, ax_m):
        ax.set_yticks(range(n))
        ax.set_ylim(n - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        for y in seps:
            ax.axhline(y, color="black", linewidth=0.6)
    ax_t.set_yticklabels(labels, fontsize=9)
    ax_m.set_yticklabels([])
    batch, seq, dtype, optimizer, ckpt = entry["shape"]
    fig.suptitle(f"{_device(entry)} - {entry['model']} - expert parallelism: {_shape_text(batch, seq, dtype)} per GPU, "
                 f"{optimizer}{', checkpointing' if ckpt else ''}, real routing", fontsize=13)
    out = _save(fig, path)
    plt.close(fig)
    return out


def figures(rows: list[dict], blocks: list[dict], out_dir: Path, order) -> list[Path] | None:
    """Draw every figure into ``out_dir``; None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib not installed: no figures (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    with matplotlib.rc_context({"font.size": 10, "svg.hashsalt": "moe_lab", "path.simplify": True}):
        for e in headline_data(rows, order):
            written.append(draw_headline(plt, e, out_dir / f"headline-{e['gpu']}-{slug(e['model'])}.png"))
        for e in block_data(blocks, order):
            written.append(draw_block(plt, e, out_dir / f"moe-block-{e['gpu']}-{slug(e['model'])}.png"))
        for e in ep_data(rows, order):
            written.append(draw_ep(plt, e, out_dir / f"ep-scaling-{e['gpu']}-{slug(e['model'])}.png"))
    return written
