"""Sweep definitions (``experiments/sweeps/<preset>.yaml``) -> an ordered list of cell specs.

File format (the schema is ``SweepFile``; every key below is checked, nothing else is allowed)::

    name: cpu-small                             # optional: the file's stem
    description: one line
    defaults: {dtype: fp32, batch: 2, ...}      # cell keys (experiments/cell.py DEFAULTS)
    grid:                                       # cartesian product, in file order
      model: [tiny-qwen3-moe]
      system: [v5-eager, v5-grouped_mm, eager, torch,     # short names (systems.py), or mappings:
               {backend: {experts: triton}, options: {fused_norm: true}, optimizer_placement: stream}]
      routing: [real, skewed]
    cells: [{model: ..., system: ...}]          # optional extra cells (defaults apply)
    overrides:                                  # optional: set keys on cells that match
      - match: {system: v5-eager}               # every key must equal the cell's; {} or absent: all cells
        set: {steps: 5}
    cell_timeout_s: 600                         # per cell, seconds
    env: {NCCL_NVLS_ENABLE: "0"}                # set (if unset) in every cell process

``load`` refuses, before anything runs, with the file and line of each problem: YAML errors and
duplicate keys, unknown keys at any level (top, ``defaults``, ``grid``, ``cells``, ``overrides``
and their ``match`` / ``set``), values a cell key cannot take (``cell.check_value``: unknown models,
``device: gpu``, ``steps: -1``, ``nproc: 0`` ...), systems whose name or mapping is malformed, that
the installed v5 / moe_lab do not know (v5's experts implementations; moe_lab's backend words, stage
implementations, dispatchers and Options fields, read from its registry) or that cannot run with the
cell's process count (``systems.check_known``, ``check_world``; ``ep0-...``), CUDA
graphs with hook-based routing, overrides that match no cell, and a file with no cells. Whether the
machine has the devices the cells ask for is checked when the sweep runs (``sweep.check_devices``).
A system is compared (``overrides``' ``match``) and kept in each cell by its canonical short name,
so ``{backend: triton}`` and ``triton`` are one system.
"""
from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from . import cell, systems

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a directory name
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_PROBLEMS = 25


@dataclass(frozen=True)
class Override:
    """One entry of ``overrides``: set ``set``'s keys on every cell whose keys equal ``match``'s."""
    match: dict = field(default_factory=dict)
    set: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SweepFile:
    """The schema of a sweep file (its top-level keys are these fields)."""
    name: str
    description: str = ""
    defaults: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    cells: tuple = ()
    overrides: tuple = ()  # of Override
    cell_timeout_s: float = 600.0
    env: dict = field(default_factory=dict)


TOP_KEYS = tuple(f.name for f in fields(SweepFile))
OVERRIDE_KEYS = tuple(f.name for f in fields(Override))
_INTERNAL = ("_path",)  # added by load: where the file came from


class SweepFileError(ValueError):
    """A sweep file that does not follow the schema; ``problems`` are (line or None, entry, message)."""

    def __init__(self, source: str, problems: list[tuple[int | None, str, str]]):
        self.source, self.problems = source, problems
        lines = [f"{source}{f':{line}' if line else ''}: {where}: {msg}" for line, where, msg in problems[:_MAX_PROBLEMS]]
        if len(problems) > _MAX_PROBLEMS:
            lines.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        head = f"invalid sweep file {source} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
        super().__init__(head + "\n  ".join(lines))


def presets() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


# ---- YAML with line numbers --------------------------------------------------------------------
def _parse_yaml(text: str, source: str) -> tuple[object, dict]:
    """(data, marks): ``marks`` maps a path of keys and list indices to its 1-based line (a mapping
    entry's line is its key's). Duplicate keys are refused."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise SweepFileError(source, [(mark.line + 1 if mark else None, "YAML", what)]) from None
    finally:
        loader.dispose()
    marks, dups = {(): 1}, []
    keys = yaml.SafeLoader("")

    def walk(n, path):
        if isinstance(n, yaml.MappingNode):
            seen = {}
            for k, v in n.value:
                try:
                    key = keys.construct_object(k, deep=True)
                except yaml.YAMLError:
                    continue
                line = k.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        dups.append((line, _where(path + (key,)), f"duplicate key {key!r} (first on line {seen[key]})"))
                    seen[key] = line
                    marks[path + (key,)] = line
                    walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                marks[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if node is not None:
        walk(node, ())
    if dups:
        raise SweepFileError(source, dups)
    return data, marks


def _where(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "top level"


# ---- validation --------------------------------------------------------------------------------
class _Checker:
    def __init__(self, source: str, marks: dict):
        self.source, self.marks, self.problems = source, marks, []

    def line(self, path: tuple) -> int | None:
        while path not in self.marks and path:
            path = path[:-1]
        return self.marks.get(path)

    def fail(self, path: tuple, msg: str, where: str | None = None) -> None:
        item = (self.line(path), where or _where(path), msg)
        if item not in self.problems:
            self.problems.append(item)

    def unknown_keys(self, path: tuple, mapping: dict, allowed, what: str) -> None:
        for k in mapping:
            if k in allowed or (path == () and k in _INTERNAL):
                continue
            close = difflib.get_close_matches(str(k), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(path + (k,), f"unknown {what} {k!r}{hint}; allowed: {', '.join(map(str, allowed))}")

    def mapping(self, path: tuple, value, what: str) -> dict | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"{what} must be a mapping, got {type(value).__name__}")
            return None
        return value

    def cell_keys(self, path: tuple, mapping: dict) -> dict:
        """Check a mapping of cell keys and their values; returns the entries that passed."""
        good = {}
        self.unknown_keys(path, mapping, tuple(cell.DEFAULTS), "cell key")
        for k, v in mapping.items():
            if k in cell.DEFAULTS and self.value(path + (k,), k, v):
                good[k] = v
        return good

    def value(self, path: tuple, key: str, value) -> bool:
        try:
            cell.CHECKS[key](value)  # (the entry's path names the key)
            if key == "system":
                systems.check_known(value)
        except ValueError as e:
            self.fail(path, str(e))
            return False
        return True


def validate(conf, source: str = "<sweep>", marks: dict | None = None) -> SweepFile:
    """Check a parsed sweep file against the schema; returns it as a ``SweepFile`` or raises
    ``SweepFileError`` listing every problem (with line numbers when ``marks`` has them)."""
    ck = _Checker(source, marks or {})
    if not isinstance(conf, dict):
        raise SweepFileError(source, [(1, "top level", f"a sweep file is a mapping of {', '.join(TOP_KEYS)}; "
                                                       f"got {type(conf).__name__}")])
    ck.unknown_keys((), conf, TOP_KEYS, "key")
    name = conf.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        ck.fail(("name",), f"name must be a directory name (letters, digits, _ . + -), got {name!r}")
    if not isinstance(conf.get("description", ""), str):
        ck.fail(("description",), "description must be a string")
    timeout = conf.get("cell_timeout_s", 600.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        ck.fail(("cell_timeout_s",), f"cell_timeout_s must be a positive number of seconds, got {timeout!r}")

    env = ck.mapping(("env",), conf.get("env"), "env") or {}
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_RE.match(k):
            ck.fail(("env", k), f"{k!r} is not an environment variable name")
        elif isinstance(v, (dict, list)) or v is None:
            ck.fail(("env", k), f"env {k}: the value must be a string or number, got {v!r}")

    defaults = ck.cell_keys(("defaults",), ck.mapping(("defaults",), conf.get("defaults"), "defaults") or {})

    grid = ck.mapping(("grid",), conf.get("grid"), "grid") or {}
    ck.unknown_keys(("grid",), grid, tuple(cell.DEFAULTS), "cell key")
    good_grid = {}
    for k, values in grid.items():
        if k not in cell.DEFAULTS:
            continue
        values = values if isinstance(values, list) else [values]
        if not values:
            ck.fail(("grid", k), f"grid {k}: an empty list gives no cells")
        oks = [ck.value(("grid", k, i) if isinstance(grid[k], list) else ("grid", k), k, v) for i, v in enumerate(values)]
        if all(oks):
            good_grid[k] = values

    cells_raw = conf.get("cells") or []
    if not isinstance(cells_raw, list):
        ck.fail(("cells",), f"cells must be a list of mappings, got {type(cells_raw).__name__}")
        cells_raw = []
    cells = []
    for i, c in enumerate(cells_raw):
        c = ck.mapping(("cells", i), c, f"cells[{i}]")
        if c is not None:
            cells.append(ck.cell_keys(("cells", i), c))

    ov_raw = conf.get("overrides") or []
    if not isinstance(ov_raw, list):
        ck.fail(("overrides",), f"overrides must be a list of {{match, set}} mappings, got {type(ov_raw).__name__}")
        ov_raw = []
    overrides = []
    for i, ov in enumerate(ov_raw):
        ov = ck.mapping(("overrides", i), ov, f"overrides[{i}]")
        if ov is None:
            continue
        ck.unknown_keys(("overrides", i), ov, OVERRIDE_KEYS, "override key")
        if not ov.get("set"):
            ck.fail(("overrides", i), "an override needs a non-empty `set`")
        match = ck.cell_keys(("overrides", i, "match"), ck.mapping(("overrides", i, "match"), ov.get("match"), "match") or {})
        sets = ck.cell_keys(("overrides", i, "set"), ck.mapping(("overrides", i, "set"), ov.get("set"), "set") or {})
        overrides.append(Override(_named(match), _named(sets)))

    if ck.problems:  # the combinations below would only repeat these
        raise SweepFileError(source, ck.problems)
    if not grid and not cells_raw:
        ck.fail((), "no cells: give a `grid` or `cells`")

    sweep = SweepFile(name=name, description=conf.get("description", ""), defaults=defaults, grid=good_grid,
                      cells=tuple(cells), overrides=tuple(overrides), cell_timeout_s=float(timeout), env=dict(env))
    used = set()
    for path, label, raw in _raw_specs(sweep):
        spec, hits = _apply_overrides(sweep, raw)
        used.update(hits)
        try:
            _check_spec(cell.normalise(spec))
        except ValueError as e:
            ck.fail(path, str(e), where=label)
    for i in range(len(sweep.overrides)):
        if i not in used:
            ck.fail(("overrides", i, "match"), "this override matches no cell")
    if ck.problems:
        raise SweepFileError(source, ck.problems)
    return sweep


def _check_spec(spec: dict) -> None:
    """Checks across a normalised cell's keys that the cell would otherwise only fail at run time."""
    system = systems.check_known(spec["system"])
    systems.check_world(system, spec["nproc"])
    if system.cuda_graphs and (spec["routing"] != "real" or spec["trace"] or spec["ckpt"]):
        raise ValueError(f"{system.name}: CUDA graphs replay the layers without their Python hooks; they need "
                         "routing 'real', no trace and no ckpt")


def _raw_specs(sweep: SweepFile):
    """(path in the file, label, defaults + entry) of every cell: the grid's product, then ``cells``."""
    if sweep.grid:
        keys = list(sweep.grid)
        for combo in itertools.product(*sweep.grid.values()):
            entry = dict(zip(keys, combo))
            label = "grid cell {" + ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}"
            yield ("grid",), label, {**sweep.defaults, **entry}
    for i, entry in enumerate(sweep.cells):
        yield ("cells", i), f"cells[{i}]", {**sweep.defaults, **entry}


def _named(spec: dict) -> dict:
    """``spec`` with its system (a short name or a mapping, already checked) as its canonical short name."""
    return {**spec, "system": systems.canonical_name(spec["system"])} if "system" in spec else dict(spec)


def _apply_overrides(sweep: SweepFile, spec: dict) -> tuple[dict, list[int]]:
    spec, hits = _named(spec), []
    for i, ov in enumerate(sweep.overrides):
        if all(spec.get(k) == v for k, v in ov.match.items()):
            spec.update(ov.set)
            hits.append(i)
    return spec, hits


# ---- loading and expansion ---------------------------------------------------------------------
def load(preset: str | None = None, path: str | None = None) -> dict:
    """Parse and validate a sweep file given by preset name or path (``SweepFileError`` on any
    problem); returns the file's mapping plus ``_path``."""
    if path is None:
        path = SWEEPS_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ValueError(f"unknown sweep preset {preset!r}; known: {', '.join(presets())}")
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read sweep file {source}: {e}") from None
    conf, marks = _parse_yaml(text, source)
    if conf is None:
        conf = {}
    if isinstance(conf, dict):
        conf.setdefault("name", Path(path).stem)
    validate(conf, source, marks)
    conf["_path"] = source
    return conf


def expand(conf: dict) -> list[dict]:
    """Normalised cell specs, grid first then extra cells, duplicates dropped (first kept).
    ``conf`` is validated first (``SweepFileError``)."""
    sweep = validate(conf, conf.get("_path", "<sweep>") if isinstance(conf, dict) else "<sweep>")
    out, seen = [], set()
    for _, _, raw in _raw_specs(sweep):
        spec = cell.normalise(_apply_overrides(sweep, raw)[0])
        cid = cell.cell_id(spec)
        if cid not in seen:
            seen.add(cid)
            out.append(spec)
    return out
