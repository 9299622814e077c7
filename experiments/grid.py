"""Sweep definitions (``experiments/sweeps/<preset>.yaml``) -> an ordered list of cell specs.

File format::

    name: cpu-small
    description: one line
    defaults: {dtype: fp32, batch: 2, ...}      # cell keys (experiments/cell.py DEFAULTS)
    grid:                                       # cartesian product, in file order
      model: [tiny-qwen3-moe]
      system: [v5-eager, v5-grouped_mm, eager, torch]
      routing: [real, skewed]
    cells: [{model: ..., system: ...}]          # optional extra cells (defaults apply)
    overrides:                                  # optional: set keys on cells that match
      - match: {system: v5-eager}
        set: {steps: 5}
    cell_timeout_s: 600                         # per cell
    env: {NCCL_NVLS_ENABLE: "0"}                # set (if unset) in every cell process
"""
from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from . import cell

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
_TOP_KEYS = {"name", "description", "defaults", "grid", "cells", "overrides", "cell_timeout_s", "env"}


def presets() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def load(preset: str | None = None, path: str | None = None) -> dict:
    """Parse a sweep file given by preset name or path."""
    if path is None:
        path = SWEEPS_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ValueError(f"unknown sweep preset {preset!r}; known: {', '.join(presets())}")
    with open(path) as f:
        conf = yaml.safe_load(f) or {}
    unknown = set(conf) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    conf.setdefault("name", Path(path).stem)
    conf["_path"] = str(path)
    return conf


def expand(conf: dict) -> list[dict]:
    """Normalised cell specs, grid first then extra cells, duplicates dropped (first kept)."""
    defaults = conf.get("defaults") or {}
    grid = conf.get("grid") or {}
    raw = []
    if grid:
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        raw += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    raw += list(conf.get("cells") or [])
    out, seen = [], set()
    for r in raw:
        spec = {**defaults, **r}
        for ov in conf.get("overrides") or []:
            if all(spec.get(k) == v for k, v in (ov.get("match") or {}).items()):
                spec.update(ov.get("set") or {})
        spec = cell.normalise(spec)
        cid = cell.cell_id(spec)
        if cid not in seen:
            seen.add(cid)
            out.append(spec)
    return out
