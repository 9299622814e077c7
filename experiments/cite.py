"""Citable results: a stable key for every table in ``results/report/``, and what stands behind it.

    python -m experiments.cite --list            # every key, with its file and heading
    python -m experiments.cite KEY               # a BibTeX entry and a Markdown table of its provenance
    python -m experiments.cite KEY --bibtex      # only the BibTeX entry

A table is a Markdown table (a ``|`` line followed by a ``|---`` line) in ``results/report/*.md``; it
belongs to the nearest heading above it. Its key is ``<file stem>/<run>`` where ``<run>`` names the
raw run the heading names (``## <run>: ...`` or ``... (run `<run>`)``), plus, in ``results.md`` (one
run, several tables), ``/<model>-b<batch>s<seq>-<recipe>`` from the heading; kernel benchmark
headings (``<run>/<file>.json``) keep the file's prefix (``kernels/h200x1-triton-kernels/run1``);
the routing ablations' files (``ablation-<run>.md``) give ``ablation/<run>``.
The key is a function of the heading text alone, which ``experiments.report`` (and
``experiments.ablation --report``) writes from the raw runs: it does not move when other tables
are added. Two tables under one heading get ``#2``, ``#3`` in file order.

Behind each key: the run's raw files under ``results/runs/<run>/`` (a sweep's ``manifest.json`` and
``cells/``, or a benchmark's JSON), from which the commit, dirty flag, GPU, versions and the command
are read. BibTeX: ``@misc{moe_lab:<key with / as :>, ...}`` with the commit as the version and
``CITATION.cff``'s title and authors.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import provenance

REPORT_DIR = provenance.REPO_ROOT / "results" / "report"
RUNS_DIR = provenance.REPO_ROOT / "results" / "runs"
CITATION = provenance.REPO_ROOT / "CITATION.cff"
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_RUN_IN_PARENS = re.compile(r"\(run `([^`]+)`\)")
_RESULTS_HEADING = re.compile(r"^(?P<gpu>\S+) x(?P<n>\d+) - (?P<model>\S+) - batch (?P<b>\d+) x seq (?P<s>\d+) - "
                              r"(?P<recipe>.*?) \(run `(?P<run>[^`]+)`\)$")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.+/#-]+")


@dataclass
class Table:
    key: str
    file: Path
    line: int  # 1-based line of the table's header row
    heading: str
    run: str | None
    text: str  # the table's lines
    sources: list = field(default_factory=list)  # raw files behind it (paths)


def _slug(text: str) -> str:
    return _KEY_CHARS.sub("-", text.strip()).strip("-")


def _run_of(heading: str) -> str | None:
    m = _RUN_IN_PARENS.search(heading)
    if m:
        return m.group(1)
    head = heading.split(":", 1)[0].strip()
    if ":" in heading and head and " " not in head:
        return head
    return None


def _key_of(stem: str, heading: str, run: str | None) -> str:
    if stem.startswith("ablation-"):  # experiments.ablation --report writes one file per run: ablation-<run>.md
        stem = "ablation"
    if stem == "results":
        m = _RESULTS_HEADING.match(heading)
        if m:
            recipe = _slug(m.group("recipe").replace(", ", "-").replace(" ", "-"))
            return f"results/{m.group('run')}/{m.group('model')}-b{m.group('b')}s{m.group('s')}-{recipe}"
    if run:
        if run.endswith(".json"):  # kernel benchmarks: <run dir>/<prefix->triton_kernels_bench.json
            run = re.sub(r"-?triton_kernels_bench\.json$|\.json$", "", run).rstrip("/-")
        return f"{stem}/{_slug(run)}"
    return f"{stem}/{_slug(heading.lower())}" if heading else stem


def tables(report_dir: str | Path = REPORT_DIR) -> list[Table]:
    """Every table of every ``*.md`` under ``report_dir``, in file then line order, with its key."""
    out: list[Table] = []
    for path in sorted(Path(report_dir).glob("*.md")):
        lines = path.read_text().splitlines()
        heading, seen = "", {}
        i = 0
        while i < len(lines):
            m = _HEADING.match(lines[i])
            if m:
                heading = m.group(2)
                i += 1
                continue
            if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
                start = i
                while i < len(lines) and lines[i].startswith("|"):
                    i += 1
                run = _run_of(heading)
                key = _key_of(path.stem, heading, run)
                seen[key] = seen.get(key, 0) + 1
                if seen[key] > 1:
                    key = f"{key}#{seen[key]}"
                out.append(Table(key, path, start + 1, heading, run, "\n".join(lines[start:i]), _sources(run)))
                continue
            i += 1
    return out


def _sources(run: str | None) -> list[Path]:
    """The raw files behind a run name: a run directory's manifest and cells, or a benchmark JSON."""
    if not run:
        return []
    target = RUNS_DIR / run
    if target.is_file():
        return [target]
    if not target.is_dir():
        return []
    manifest = target / "manifest.json"
    files = [manifest] if manifest.exists() else []
    files += sorted((target / "cells").glob("*.json")) if (target / "cells").is_dir() else []
    files += sorted(p for p in target.glob("*.json") if p != manifest)
    return files


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def provenance_of(table: Table) -> dict:
    """{"commit", "dirty", "gpu", "versions", "command", "runs" [paths], "cells" (count), "when"} from
    the first raw file that records them (a sweep manifest, a benchmark's provenance)."""
    out = {"commit": None, "dirty": None, "gpu": None, "versions": {}, "command": None,
           "runs": [str(p.relative_to(provenance.REPO_ROOT)) for p in table.sources[:1]],
           "cells": sum(p.parent.name == "cells" for p in table.sources)}
    for path in table.sources:
        if path.parent.name == "cells":
            continue
        d = _read(path)
        prov = d.get("provenance") if isinstance(d.get("provenance"), dict) else None
        if prov:
            git, hw = prov.get("git") or {}, prov.get("hardware") or {}
            out.update(commit=git.get("commit"), dirty=git.get("dirty"), versions=prov.get("versions") or {},
                       command=prov.get("command"))
            gpu_count = hw.get("gpu_count") or 0
            out["gpu"] = f"{gpu_count}x {hw.get('gpu_name')}" if gpu_count else f"CPU ({hw.get('cpu_count')} cores)"
            break
        man = d.get("manifest")
        if isinstance(man, dict):  # triton_kernels.bench
            out.update(commit=man.get("commit"), dirty=man.get("dirty"), gpu=man.get("gpu"), command=man.get("command"),
                       versions={k: man.get(k) for k in ("python", "torch", "triton", "cuda") if man.get(k)})
            break
    if table.sources and table.sources[0].parent != RUNS_DIR:
        run_dir = table.sources[0].parent
        out["runs"] = [str(run_dir.relative_to(provenance.REPO_ROOT)) + "/"]
    return out


def _command_text(command) -> str:
    if isinstance(command, list):
        parts = list(command)
        if parts and parts[0].endswith(".py"):  # sys.argv[0] of `python -m experiments.<x>`
            mod = Path(parts[0]).with_suffix("")
            parts[0] = "python -m " + ".".join(mod.parts[-2:])
        return " ".join(parts)
    return str(command or "")


def _cff_field(name: str) -> str | None:
    try:
        for line in CITATION.read_text().splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def bibtex(table: Table, prov: dict | None = None) -> str:
    prov = prov or provenance_of(table)
    title = _cff_field("title") or "moe_lab"
    commit = (prov["commit"] or "unknown")[:12]
    note = f"Table `{table.key}' in {table.file.relative_to(provenance.REPO_ROOT).as_posix()}"
    if prov.get("gpu"):
        note += f"; {prov['gpu']}"
    if prov.get("runs"):
        note += f"; raw runs {', '.join(prov['runs'])}"
    bib_key = "moe_lab:" + table.key.replace("/", ":").replace("#", "-")
    heading = table.heading.replace("{", "(").replace("}", ")").replace("`", "")
    return (f"@misc{{{bib_key},\n"
            f"  title = {{{{{title}}}: {heading}}},\n"
            f"  author = {{{{moe_lab contributors}}}},\n"
            f"  howpublished = {{{title}, commit {commit}{' (dirty working tree)' if prov.get('dirty') else ''}}},\n"
            f"  version = {{{commit}}},\n"
            f"  note = {{{note}}}\n"
            f"}}")


def provenance_table(table: Table, prov: dict | None = None) -> str:
    prov = prov or provenance_of(table)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items())
                         if k in ("transformers", "torch", "triton", "python", "cuda", "numpy") and v) or "-"
    rows = [("key", f"`{table.key}`"),
            ("table", f"{table.file.relative_to(provenance.REPO_ROOT).as_posix()}, line {table.line}: {table.heading}"),
            ("commit", f"`{prov['commit']}`" + (" (dirty)" if prov.get("dirty") else "") if prov["commit"] else "unknown"),
            ("GPU", prov.get("gpu") or "unknown"), ("versions", versions),
            ("command", f"`{_command_text(prov['command'])}`" if prov.get("command") else "unknown"),
            ("raw runs", ", ".join(f"`{r}`" for r in prov["runs"]) + (f" ({prov['cells']} cell records)" if prov["cells"] else "")
             if prov["runs"] else "none found under results/runs/")]
    return "| field | value |\n|---|---|\n" + "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in rows) + "\n"


def find(key: str, report_dir: str | Path = REPORT_DIR) -> Table:
    found = {t.key: t for t in tables(report_dir)}
    if key in found:
        return found[key]
    import difflib

    close = difflib.get_close_matches(key, list(found), n=3, cutoff=0.5)
    raise KeyError(f"no table with key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                   + " (python -m experiments.cite --list)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("key", nargs="?", help="a table's key (see --list)")
    ap.add_argument("--list", action="store_true", help="list every table's key")
    ap.add_argument("--bibtex", action="store_true", help="print only the BibTeX entry")
    ap.add_argument("--report-dir", default=str(REPORT_DIR))
    args = ap.parse_args(argv)
    if args.list or not args.key:
        for t in tables(args.report_dir):
            print(f"{t.key}\t{t.file.name}:{t.line}\t{t.heading[:100]}")
        return 0
    try:
        table = find(args.key, args.report_dir)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    prov = provenance_of(table)
    print(bibtex(table, prov))
    if not args.bibtex:
        print()
        print(provenance_table(table, prov))
        print(table.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
