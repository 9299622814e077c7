"""A recorded run of the kernels' property tests: how many hypothesis cases each test ran, and what failed.

Runs pytest on the property-test files with a hypothesis profile (``gpu``: at least 1,000 cases per
property test, for the compiled kernels on a GPU; ``ci``: the small interpreter sample) and
``--hypothesis-show-statistics``, keeps the whole log, and writes what the log says per test::

    python -m experiments.property_run --out results/kernel-properties/h100x1 -- -n 8
    python -m experiments.property_run --parse LOG --out DIR        # a log taken elsewhere

``DIR/properties.json``: provenance (commit, GPU, versions), the pytest command, its exit status and
summary line, and per test {"passing", "failing", "invalid", "stopped_because"} (tests without
hypothesis have no counts) plus the failed test ids; ``DIR/properties.md`` the same as a table, with
the tests that ran fewer passing cases than the profile asks for marked. ``DIR/pytest.log``: the log.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from . import provenance, store

FILES = ("tests/test_kernel_properties.py", "tests/test_triton_kernels.py", "tests/test_triton_kernels_gather.py")
CASES_ASKED = {"gpu": 1000, "ci": None, "repro": None}  # passing cases a test must reach (None: its own budget)

_TEST = re.compile(r"^(tests/\S+::\S+):\s*$")
_COUNTS = re.compile(r"- (\d+) passing, (\d+) failing, and (\d+) invalid test cases")
_STOPPED = re.compile(r"- Stopped because (.+)$")
_FAILED = re.compile(r"^(?:FAILED|ERROR) (tests/\S+)")
_SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s")


def parse(log: str) -> dict:
    """The hypothesis statistics and failures in a pytest log: {"tests": {id: counts}, "failed": [ids],
    "summary": pytest's last line or None}. A test's counts add over its phases (reuse, generate)."""
    tests: dict[str, dict] = {}
    current = None
    failed, summary = [], None
    for line in log.splitlines():
        stripped = line.strip()
        if m := _TEST.match(stripped):
            current = tests.setdefault(m.group(1), {"passing": 0, "failing": 0, "invalid": 0, "stopped_because": None})
        elif current is not None and (m := _COUNTS.search(stripped)):
            for key, value in zip(("passing", "failing", "invalid"), m.groups()):
                current[key] += int(value)
        elif current is not None and (m := _STOPPED.search(stripped)):
            current["stopped_because"] = m.group(1)
        if m := _FAILED.match(stripped):
            failed.append(m.group(1).split(" - ")[0])
        if m := _SUMMARY.match(stripped.strip("= ")):
            summary = m.group(1)
    return {"tests": tests, "failed": failed, "summary": summary}


def table(record: dict) -> str:
    """Markdown: one row per test with hypothesis counts, the shortfalls against the profile marked."""
    asked = CASES_ASKED.get(record.get("profile"))
    prov = record.get("provenance", {})
    hw = prov.get("hardware", {})
    lines = [f"# Kernel property run ({record.get('profile')} profile)", "",
             f"GPU: {hw.get('gpu_name') or 'none'}; commit {prov.get('git', {}).get('commit')}; "
             f"pytest: {record.get('summary')} (exit {record.get('returncode')})", "",
             f"`{record.get('command')}`", "",
             "| test | passing | failing | invalid | stopped because |", "|---|---:|---:|---:|---|"]
    short = []
    for test, c in sorted(record["tests"].items()):
        mark = ""
        if asked is not None and c["passing"] < asked:
            mark = f" (< {asked})"
            short.append(test)
        lines.append(f"| `{test}` | {c['passing']}{mark} | {c['failing']} | {c['invalid']} | {c['stopped_because'] or ''} |")
    lines += ["", f"Failed: {', '.join(f'`{t}`' for t in record['failed']) or 'none'}."]
    if short:
        lines.append(f"{len(short)} test(s) ran fewer than {asked} passing cases (their strategies' space is "
                     "smaller, or the run was cut): see `stopped because`.")
    return "\n".join(lines) + "\n"


def write(out: Path, record: dict, log: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    store.write_text(out / "pytest.log", log)
    store.write_json(out / "properties.json", record)
    store.write_text(out / "properties.md", table(record))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for pytest.log, properties.json, properties.md")
    ap.add_argument("--profile", default="gpu", choices=sorted(CASES_ASKED))
    ap.add_argument("--parse", metavar="LOG", help="record a log taken elsewhere instead of running pytest")
    ap.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (e.g. -n 8, -k ...)")
    args = ap.parse_args(argv)
    if args.parse:
        log, returncode, command = Path(args.parse).read_text(), None, f"(parsed {args.parse})"
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               "-m", "not slow", *FILES, *args.pytest_args]
        env = dict(os.environ, HYPOTHESIS_PROFILE=args.profile)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log, returncode, command = proc.stdout, proc.returncode, f"HYPOTHESIS_PROFILE={args.profile} python " + shlex.join(cmd[1:])
        sys.stdout.write(log[-4000:])
    record = {"profile": args.profile, "command": command, "returncode": returncode,
              "provenance": provenance.collect(argv), **parse(log)}
    write(Path(args.out), record, log)
    print(f"{len(record['tests'])} property tests, {len(record['failed'])} failed -> {args.out}")
    return 0 if not record["failed"] and returncode in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
