"""The v5 contract as a command: transformers' own modeling tests of the MoE families, run vanilla
and with moe_lab in place on the same machine, compared test by test.

    python -m experiments.v5_contract --tests DIR [--models qwen3_moe mixtral ...] [--out results/v5-contract]

``DIR`` is laid out like the transformers repository root (``tests/``, ``utils/``, ``conftest.py``,
``pyproject.toml``; ``src/transformers`` of the same commit if the skew bridge is to find what the
tests import and the installed release lacks): a clone of transformers at, or near, the installed
version. None of its files is committed here; ``results/NOTES.md`` says how the committed table's
tree was obtained.

For each model, ``tests/models/<model>/test_modeling_<model>.py`` runs twice in subprocesses, each
with a wall-clock limit (``--run-timeout``) and a per-test limit (``--test-timeout``, pytest-timeout),
with pytest-xdist (``-n``) where installed, slow tests off (RUN_SLOW unset; ``--slow`` sets it) and
the Hub offline (``--online`` leaves it reachable): once vanilla, once with moe_lab in place
(``experiments/v5_contract_plugin.py``, which every Python process of the run loads at start through
``experiments/v5_contract_site/sitecustomize.py``, spawned ranks included). A test that passes
vanilla and fails (or does not run) with moe_lab is a regression, unless
``experiments/v5_contract_exclusions.yaml`` lists it with a reason.

Writes ``<out>/table.md`` (per model: vanilla and moe_lab passed/failed/skipped, how many tests ran
through moe_lab, regressions grouped by their error, exclusions) and ``<out>/tests.json`` (every
test's pair of outcomes, and the provenance: transformers and torch versions, the tests' source and
commit, moe_lab's commit, the date), atomically. Raw pytest logs and outcome files go to ``--work``
(default ``runs/v5-contract``, git-ignored); ``--reuse`` keeps runs already finished there.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from . import provenance, store

REPO_ROOT = provenance.REPO_ROOT
MODELS = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "nemotron_h", "olmoe", "qwen2_moe")
MODES = ("vanilla", "moe_lab")
DEFAULT_EXCLUSIONS = REPO_ROOT / "experiments" / "v5_contract_exclusions.yaml"
SITE_DIR = REPO_ROOT / "experiments" / "v5_contract_site"
PLUGIN = "experiments.v5_contract_plugin"

# an outcome, as the table counts it
BUCKET = {"passed": "passed", "xpassed": "passed", "failed": "failed", "error": "failed",
          "skipped": "skipped", "xfailed": "skipped", "not run": "not run"}
# verdicts of a (vanilla, moe_lab) pair
REGRESSION, EXCLUDED, FIXED, BOTH_FAILED, SAME = "regression", "excluded", "fixed", "both failed", "same"
SKIPPED_WITH_MOE_LAB, RAN_WITH_MOE_LAB_ONLY, NOT_RUN_VANILLA = ("skipped with moe_lab only",
                                                               "ran with moe_lab only", "not run vanilla")


# ---- exclusions ---------------------------------------------------------------------------------
def _wildcard(pattern: str) -> re.Pattern:
    """`*` and `?` are wildcards; everything else, brackets included, is literal."""
    return re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".") + r"\Z", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """A known moe_lab failure that is not moe_lab's business. `test`: a pattern on the test's id
    within its file ("Class::test_name[params]") or on its bare name ("test_name[params]");
    `message` (optional): a pattern the moe_lab failure's message must match, so that the same test
    failing for another reason is still a regression. In both, `*` and `?` are wildcards and
    everything else, brackets included, is literal."""
    model: str
    test: str
    reason: str
    message: str | None = None

    def matches(self, model: str, test_id: str, message: str | None = None) -> bool:
        if self.model not in ("*", model):
            return False
        pattern = _wildcard(self.test)
        if not (pattern.match(test_id) or pattern.match(test_id.rsplit("::", 1)[-1])):
            return False
        return self.message is None or bool(_wildcard(self.message).match(message or ""))


def load_exclusions(path: str | os.PathLike) -> list[Exclusion]:
    """The exclusions file: a mapping with key `exclusions`, a list of {model, test, reason[, message]}."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or not isinstance(data.get("exclusions", []), list):
        raise ValueError(f"{path}: expected a mapping with a list under 'exclusions'")
    out = []
    required, allowed = {"model", "test", "reason"}, {"model", "test", "reason", "message"}
    for i, entry in enumerate(data.get("exclusions") or []):
        if not isinstance(entry, dict) or not required <= set(entry) <= allowed:
            raise ValueError(f"{path}: exclusion {i}: the keys model, test, reason and optionally message "
                             f"(got {entry!r})")
        if not all(isinstance(entry[k], str) and entry[k].strip() for k in entry):
            raise ValueError(f"{path}: exclusion {i}: every value must be a non-empty string")
        message = entry.get("message")
        out.append(Exclusion(entry["model"].strip(), entry["test"].strip(), " ".join(entry["reason"].split()),
                             None if message is None else message.strip()))
    return out


def matching_exclusion(model: str, test_id: str, exclusions: list[Exclusion],
                       message: str | None = None) -> Exclusion | None:
    return next((e for e in exclusions if e.matches(model, test_id, message)), None)


# ---- outcomes -----------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> list[dict]:
    """The plugin's JSON lines; a torn last line (a killed run) is ignored."""
    records = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _test_id(nodeid: str) -> str:
    """'tests/models/x/test_modeling_x.py::Class::test[p]' -> 'Class::test[p]' (a file: the file's name)."""
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid.rsplit("/", 1)[-1]


def test_outcomes(records: list[dict]) -> dict[str, dict]:
    """{test id: {"outcome", "message", "moe_lab"}} from one run's records.

    outcome: passed, failed (the call or any of its subtests failed), error (setup, teardown or
    collection failed), skipped, xfailed, xpassed. message: the first line of the first failure (or
    of the skip reason). moe_lab: the plugin's counters for the test (moe_lab mode)."""
    tests: dict[str, dict] = {}
    for r in records:
        if r.get("kind") == "collect":
            tests[_test_id(r["nodeid"])] = {"outcome": "error", "message": f"collection: {r.get('message', '')}",
                                            "moe_lab": None}
            continue
        if r.get("kind") != "test":
            continue
        t = tests.setdefault(_test_id(r["nodeid"]), {"outcome": None, "message": "", "moe_lab": None})
        when, outcome, message = r["when"], r["outcome"], r.get("message", "")
        if r.get("moe_lab") is not None and when in ("call", "setup") and not r.get("subtest"):
            t["moe_lab"] = r["moe_lab"]
        if r.get("subtest"):
            if outcome == "failed" and t["outcome"] not in ("error",):
                if t["outcome"] != "failed":
                    t["message"] = f"subtest {r['subtest']}: {message}"
                t["outcome"] = "failed"
            continue
        if when == "setup":
            if outcome == "failed":
                t["outcome"], t["message"] = "error", f"setup: {message}"
            elif outcome == "skipped":
                t["outcome"] = "xfailed" if r.get("wasxfail") else "skipped"
                t["message"] = message
        elif when == "call":
            if t["outcome"] == "failed":  # a subtest already failed: the test failed
                continue
            if r.get("wasxfail"):
                t["outcome"] = "xfailed" if outcome == "skipped" else "xpassed"
            else:
                t["outcome"] = outcome
            if outcome != "passed":
                t["message"] = message
        elif when == "teardown" and outcome == "failed" and t["outcome"] in ("passed", "xpassed", None):
            t["outcome"], t["message"] = "error", f"teardown: {message}"
    for t in tests.values():
        if t["outcome"] is None:  # started, never reported (the run was killed mid-test)
            t["outcome"], t["message"] = "not run", t["message"] or "no outcome reported"
    return tests


def verdict(vanilla: str, moe_lab: str, excluded: bool) -> str:
    v, m = BUCKET[vanilla], BUCKET[moe_lab]
    if v == "not run":
        return NOT_RUN_VANILLA
    if v == "passed" and m in ("failed", "not run"):
        return EXCLUDED if excluded else REGRESSION
    if v == "failed" and m == "passed":
        return FIXED
    if v == "failed" and m in ("failed", "not run"):
        return BOTH_FAILED
    if v == "passed" and m == "skipped":
        return SKIPPED_WITH_MOE_LAB
    if v == "skipped" and m != "skipped":
        return RAN_WITH_MOE_LAB_ONLY
    return SAME


def compare(model: str, vanilla: dict[str, dict], moe_lab: dict[str, dict],
            exclusions: list[Exclusion]) -> dict[str, dict]:
    """{test id: {"vanilla", "moe_lab", "verdict", messages, moe_lab counters, "exclusion"}}; a test
    missing from one run counts as "not run" there."""
    out = {}
    for test_id in sorted(set(vanilla) | set(moe_lab)):
        v = vanilla.get(test_id, {"outcome": "not run", "message": "not in this run", "moe_lab": None})
        m = moe_lab.get(test_id, {"outcome": "not run", "message": "not in this run", "moe_lab": None})
        exclusion = matching_exclusion(model, test_id, exclusions, m["message"])
        entry = {"vanilla": v["outcome"], "moe_lab": m["outcome"],
                 "verdict": verdict(v["outcome"], m["outcome"], exclusion is not None)}
        if BUCKET[v["outcome"]] in ("failed", "not run") and v["message"]:
            entry["vanilla_message"] = v["message"]
        if BUCKET[m["outcome"]] in ("failed", "not run") and m["message"]:
            entry["moe_lab_message"] = m["message"]
        if m.get("moe_lab") and any(m["moe_lab"].values()):
            entry["moe_lab_counters"] = m["moe_lab"]
        if entry["verdict"] == EXCLUDED:
            entry["exclusion"] = dataclasses.asdict(exclusion)
        out[test_id] = entry
    return out


def ran_through_moe_lab(counters: dict | None) -> bool:
    """The test built a model whose MoE blocks moe_lab ran (its layers were put in place)."""
    return bool(counters) and counters.get("in_place", 0) > 0


def summarize(tests: dict[str, dict]) -> dict:
    counts = {mode: Counter(BUCKET[t[mode]] for t in tests.values()) for mode in MODES}
    verdicts = Counter(t["verdict"] for t in tests.values())
    return {
        "tests": len(tests),
        **{mode: {k: counts[mode].get(k, 0) for k in ("passed", "failed", "skipped", "not run")} for mode in MODES},
        "moe_lab_in_place": sum(ran_through_moe_lab(t.get("moe_lab_counters")) for t in tests.values()),
        "moe_lab_forwards": sum(bool((t.get("moe_lab_counters") or {}).get("forwards")) for t in tests.values()),
        "verdicts": dict(sorted(verdicts.items())),
    }


_NUMBER = re.compile(r"\b(0x[0-9a-fA-F]+|\d+(\.\d+)?(e-?\d+)?)\b")  # not the digits of a name: bf16, float32


def message_key(message: str) -> str:
    """A failure message reduced to what groups alike failures: numbers masked, at most 200 characters."""
    first = (message or "(no message)").strip().splitlines()[0] if (message or "").strip() else "(no message)"
    return _NUMBER.sub("#", first)[:200]


def regression_groups(tests: dict[str, dict], which: str = REGRESSION) -> list[tuple[str, list[str]]]:
    """[(message key, [test ids])] of the tests with this verdict, largest group first."""
    groups = defaultdict(list)
    field = "vanilla_message" if which == BOTH_FAILED else "moe_lab_message"
    for test_id, t in tests.items():
        if t["verdict"] == which:
            groups[message_key(t.get(field, ""))].append(test_id)
    return sorted(((k, sorted(v)) for k, v in groups.items()), key=lambda kv: (-len(kv[1]), kv[0]))


def unused_exclusions(result_models: dict, exclusions: list[Exclusion]) -> list[Exclusion]:
    used = {(e["model"], e["test"], e.get("message")) for m in result_models.values() for t in m["tests"].values()
            for e in [t.get("exclusion")] if e}
    return [e for e in exclusions if (e.model, e.test, e.message) not in used]


# ---- the table ----------------------------------------------------------------------------------
def _names(test_ids: list[str], limit: int = 6) -> str:
    bare = sorted({t.rsplit("::", 1)[-1] for t in test_ids})
    shown = ", ".join(f"`{n}`" for n in bare[:limit])
    return shown + (f", and {len(bare) - limit} more" if len(bare) > limit else "")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def render_table(result: dict) -> str:
    """The committed markdown table of a result (as written to tests.json)."""
    p = result["provenance"]
    lines = [
        "# The v5 contract: transformers' modeling tests, vanilla vs moe_lab",
        "",
        f"Written by `python -m experiments.v5_contract` on {p['date']}. transformers {p['transformers']} "
        f"(installed), torch {p['torch']}, moe_lab {p['moe_lab_commit'][:12]}"
        f"{' (dirty tree)' if p.get('moe_lab_dirty') else ''}, moe_lab backend: {p['moe_backend']}. "
        f"Tests: {p['tests_source']}. {p['machine']}; pytest {p['pytest_options']}.",
        "",
        "A regression is a test that passes vanilla and fails (or does not finish) with moe_lab in place; "
        "an excluded one is listed, with its reason, in `experiments/v5_contract_exclusions.yaml`. "
        "\"through moe_lab\": tests that built a model whose MoE blocks moe_lab ran (with an eager MoE "
        "forward through moe_lab in brackets).",
        "",
        "| model | tests | vanilla passed / failed / skipped | moe_lab passed / failed / skipped | through moe_lab "
        "| regressions | excluded | other differences |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total = Counter()
    for model, m in result["models"].items():
        s = m["summary"]
        v, ml, vd = s["vanilla"], s["moe_lab"], s["verdicts"]
        other = {k: n for k, n in vd.items() if k not in (SAME, REGRESSION, EXCLUDED, BOTH_FAILED)}
        other_text = ", ".join(f"{n} {k}" for k, n in sorted(other.items())) or "none"
        not_run = f" (+{v['not run']} not run)" if v["not run"] else ""
        not_run_m = f" (+{ml['not run']} not run)" if ml["not run"] else ""
        lines.append(f"| {model} | {s['tests']} | {v['passed']} / {v['failed']} / {v['skipped']}{not_run} | "
                     f"{ml['passed']} / {ml['failed']} / {ml['skipped']}{not_run_m} | {s['moe_lab_in_place']} "
                     f"({s['moe_lab_forwards']}) | **{vd.get(REGRESSION, 0)}** | {vd.get(EXCLUDED, 0)} | {other_text} |")
        for key in ("tests", "moe_lab_in_place", "moe_lab_forwards"):
            total[key] += s[key]
        for mode in MODES:
            for k in ("passed", "failed", "skipped", "not run"):
                total[f"{mode} {k}"] += s[mode][k]
        for k in (REGRESSION, EXCLUDED):
            total[k] += vd.get(k, 0)
    if len(result["models"]) > 1:
        lines.append(f"| all | {total['tests']} | {total['vanilla passed']} / {total['vanilla failed']} / "
                     f"{total['vanilla skipped']} | {total['moe_lab passed']} / {total['moe_lab failed']} / "
                     f"{total['moe_lab skipped']} | {total['moe_lab_in_place']} ({total['moe_lab_forwards']}) | "
                     f"**{total[REGRESSION]}** | {total[EXCLUDED]} | |")
    lines += ["", "## Regressions, grouped by moe_lab's error", ""]
    any_regression = False
    for model, m in result["models"].items():
        groups = regression_groups(m["tests"])
        if not groups:
            continue
        any_regression = True
        lines.append(f"**{model}**")
        lines.append("")
        for key, ids in groups:
            lines.append(f"- {len(ids)}: `{_md(key)}`: {_names(ids)}")
        lines.append("")
    if not any_regression:
        lines += ["None.", ""]
    others = [(model, k, groups) for model, m in result["models"].items()
              for k in (SKIPPED_WITH_MOE_LAB, RAN_WITH_MOE_LAB_ONLY, FIXED, NOT_RUN_VANILLA)
              for groups in [[t for t, x in m["tests"].items() if x["verdict"] == k]] if groups]
    if others:
        lines += ["## Other differences", ""]
        for model, k, ids in others:
            lines.append(f"- {model}, {k}: {_names(ids, 10)}")
        lines.append("")
    lines += ["## Excluded", ""]
    excluded = [(model, t, x["exclusion"]) for model, m in result["models"].items()
                for t, x in m["tests"].items() if x["verdict"] == EXCLUDED]
    by_reason = defaultdict(list)
    for model, t, e in excluded:
        by_reason[(e["model"], e["test"], e.get("message") or "", e["reason"])].append(f"{model}::{t}")
    for (em, et, message, reason), ids in sorted(by_reason.items()):
        failing = f"; failing with `{_md(message)}`" if message else ""
        lines.append(f"- `{et}` ({em}; {len(ids)} tests{failing}): {_md(reason)}")
    if not by_reason:
        lines.append("None.")
    unused = result.get("unused_exclusions") or []
    if unused:
        lines.append("")
        lines.append("Exclusions that matched no moe_lab failure in this run: " +
                     ", ".join(f"`{e['test']}` ({e['model']})" for e in unused) + ".")
    lines += ["", "## Failing vanilla too (the tree against the installed release), grouped", ""]
    for model, m in result["models"].items():
        groups = regression_groups(m["tests"], BOTH_FAILED)
        if groups:
            lines.append(f"- {model}: " + "; ".join(f"{len(ids)} `{_md(key[:90])}`" for key, ids in groups[:6]) +
                         (f"; {sum(len(i) for _, i in groups[6:])} others" if len(groups) > 6 else ""))
    lines += ["", "## Runs", "", "Exit 1: some test failed. Spawned ranks: processes started by the tests "
              "(distributed tests' ranks) that put moe_lab in place.", "",
              "| model | mode | wall s | exit | spawned ranks with moe_lab | note |", "|---|---|---|---|---|---|"]
    for model, m in result["models"].items():
        for mode in MODES:
            r = m["runs"][mode]
            ranks = r.get("spawned_processes_with_moe_lab") if mode == "moe_lab" else "-"
            lines.append(f"| {model} | {mode} | {r.get('wall_s', 0):.0f} | {r.get('returncode')} | {ranks} | "
                         f"{_md(r.get('note', '')) or ''} |")
    if p.get("runs_wall_s"):
        lines += ["", f"The {2 * len(result['models'])} pytest runs took {p['runs_wall_s'] / 60:.0f} min in all."]
    bridged = p.get("bridged") or []
    if bridged:
        lines += ["", "Skew bridge (names the tests import that the installed transformers lacks, defined from "
                  "the tree's `src/`, in both modes): " + ", ".join(f"`{b}`" for b in bridged) + "."]
    unresolved = p.get("unresolved") or []
    if unresolved:
        lines += ["", "Not bridged: " + ", ".join(f"`{_md(u)}`" for u in unresolved) + "."]
    lines.append("")
    return "\n".join(lines)


# ---- running ------------------------------------------------------------------------------------
def _git(directory: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tree_version(tests_dir: Path) -> str | None:
    """`__version__` of the tree's src/transformers/__init__.py, read, not imported."""
    init = tests_dir / "src" / "transformers" / "__init__.py"
    if not init.is_file():
        return None
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def tests_provenance(tests_dir: Path, described: str | None) -> dict:
    commit = _git(tests_dir, "rev-parse", "HEAD")
    info = {"dir": str(tests_dir), "commit": commit, "remote": _git(tests_dir, "remote", "get-url", "origin"),
            "commit_date": _git(tests_dir, "log", "-1", "--format=%cI") if commit else None,
            "version": tree_version(tests_dir), "description": described}
    return info


def _tests_source_text(info: dict) -> str:
    if info.get("description"):
        return info["description"]
    parts = [info.get("remote") or info["dir"]]
    if info.get("commit"):
        parts.append(f"commit {info['commit'][:12]} ({info.get('commit_date') or '?'})")
    if info.get("version"):
        parts.append(f"version {info['version']}")
    return ", ".join(parts)


def test_file(tests_dir: Path, model: str) -> Path:
    return tests_dir / "tests" / "models" / model / f"test_modeling_{model}.py"


def pytest_command(tests_dir: Path, model: str, mode: str, out_jsonl: Path, jobs: int, test_timeout: int,
                   backend: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", str(test_file(tests_dir, model).relative_to(tests_dir)),
           "-p", PLUGIN, "--moe-lab-contract", mode, "--moe-lab-contract-out", str(out_jsonl),
           "-p", "no:cacheprovider", "-q", "-o", "log_cli=false", "--timeout", str(test_timeout)]
    if backend:
        cmd += ["--moe-lab-contract-backend", backend]
    if jobs > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(jobs)]
    return cmd


def pytest_env(tests_dir: Path, model: str, mode: str, backend: str | None, slow: bool, online: bool,
               process_log: Path) -> dict:
    env = dict(os.environ)
    env.pop("RUN_SLOW", None)
    if slow:
        env["RUN_SLOW"] = "1"
    if not online:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    # the start-up hook, then this checkout (its moe_lab and plugin, not another install's)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update({"MOE_LAB_CONTRACT_MODE": mode, "MOE_LAB_CONTRACT_TREE": str(tests_dir),
                "MOE_LAB_CONTRACT_MODELS": model, "MOE_LAB_CONTRACT_PROCESS_LOG": str(process_log)})
    env.pop("MOE_LAB_CONTRACT_BACKEND", None)
    if backend:
        env["MOE_LAB_CONTRACT_BACKEND"] = backend
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(tests_dir: Path, work: Path, model: str, mode: str, args) -> dict:
    """Run one model's test file in one mode; returns the run record (also written to work/)."""
    stem = f"{model}-{mode}"
    out_jsonl, log_path, record_path = work / f"{stem}.jsonl", work / f"{stem}.log", work / f"{stem}.run.json"
    process_log = work / f"{stem}.processes.jsonl"
    if args.reuse and record_path.exists():
        record = store.read_json(record_path)
        if record.get("finished") and record.get("tests_commit") == args.tests_commit:
            print(f"[v5-contract] {stem}: reusing the finished run in {work}", flush=True)
            return record
    for p in (out_jsonl, process_log):
        p.unlink(missing_ok=True)
    cmd = pytest_command(tests_dir, model, mode, out_jsonl, args.jobs, args.test_timeout, args.moe_backend)
    env = pytest_env(tests_dir, model, mode, args.moe_backend, args.slow, args.online, process_log)
    print(f"[v5-contract] {stem}: running (limit {args.run_timeout} s) ...", flush=True)
    start = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tests_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            returncode = proc.returncode
        except BaseException:
            _kill_group(proc)
            raise
    wall = time.monotonic() - start
    processes = read_records(process_log)
    git = provenance.git_state()
    record = {"model": model, "mode": mode, "command": cmd, "returncode": returncode, "timed_out": timed_out,
              "moe_lab_commit": git["commit"], "moe_lab_dirty": git["dirty"],
              "wall_s": round(wall, 1), "finished": True, "tests_commit": args.tests_commit,
              "log": str(log_path), "outcomes": str(out_jsonl),
              "spawned_processes_with_moe_lab": len({r["pid"] for r in processes if r.get("spawned")}),
              "note": f"timed out after {args.run_timeout} s; unfinished tests count as not run" if timed_out else ""}
    store.write_json(record_path, record)
    print(f"[v5-contract] {stem}: exit {returncode}{' (timed out)' if timed_out else ''} in {wall:.0f} s", flush=True)
    return record


def build_result(models: list[str], work: Path, runs: dict, exclusions: list[Exclusion], prov: dict) -> dict:
    result = {"provenance": prov, "exclusions": [dataclasses.asdict(e) for e in exclusions], "models": {}}
    bridged, unresolved = set(), set()
    for model in models:
        outcomes = {}
        for mode in MODES:
            records = read_records(work / f"{model}-{mode}.jsonl")
            for r in records:
                if r.get("kind") == "start":
                    bridged.update(r.get("bridged") or [])
                    unresolved.update(r.get("unresolved") or [])
            outcomes[mode] = test_outcomes(records)
        tests = compare(model, outcomes["vanilla"], outcomes["moe_lab"], exclusions)
        run_info = {mode: {k: runs[model][mode].get(k) for k in
                           ("returncode", "timed_out", "wall_s", "note", "spawned_processes_with_moe_lab")}
                    for mode in MODES}
        result["models"][model] = {"summary": summarize(tests), "runs": run_info, "tests": tests}
    prov["bridged"], prov["unresolved"] = sorted(bridged), sorted(unresolved)
    # the commit of moe_lab that ran: the moe_lab-mode runs' (vanilla runs do not import it, and may
    # be reused from an older checkout)
    ran_at = {(r.get("moe_lab_commit"), r.get("moe_lab_dirty")) for m in runs.values()
              for mode, r in m.items() if mode == "moe_lab" and r.get("moe_lab_commit")}
    if len(ran_at) == 1:  # the runs' own commit (reused runs may predate this checkout's)
        prov["moe_lab_commit"], prov["moe_lab_dirty"] = ran_at.pop()
    elif ran_at:
        prov["moe_lab_commit"] = "mixed: " + ", ".join(sorted(c[:12] for c, _ in ran_at))
    result["unused_exclusions"] = [dataclasses.asdict(e) for e in unused_exclusions(result["models"], exclusions)]
    return result


def provenance_record(args, tests_dir: Path, tests_info: dict) -> dict:
    import pytest
    import torch
    import transformers

    git = provenance.git_state()
    jobs = f"-n {args.jobs}" if args.jobs > 1 and importlib.util.find_spec("xdist") is not None else "no xdist"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "transformers": transformers.__version__, "torch": torch.__version__, "pytest": pytest.__version__,
        "python": sys.version.split()[0], "moe_lab_commit": git["commit"], "moe_lab_dirty": git["dirty"],
        "moe_backend": args.moe_backend or "the drop-in's default (moe_backend=None)",
        "tests": tests_info, "tests_source": _tests_source_text(tests_info),
        "machine": f"{os.cpu_count()} CPU cores" + (", CUDA" if torch.cuda.is_available() else ", no GPU"),
        "pytest_options": f"{jobs}, --timeout {args.test_timeout} a test, {args.run_timeout} s a run, "
                          f"RUN_SLOW {'1' if args.slow else 'unset'}, Hub {'online' if args.online else 'offline'}",
        "command": ["python", "-m", "experiments.v5_contract", *sys.argv[1:]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.v5_contract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", required=True, type=Path,
                        help="a transformers source tree (its root: tests/, utils/, conftest.py, src/)")
    parser.add_argument("--tests-source", default=None,
                        help="how the tree was obtained, for the table (default: its git remote and commit)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "v5-contract",
                        help="where table.md and tests.json go")
    parser.add_argument("--work", type=Path, default=Path("runs") / "v5-contract",
                        help="raw logs and outcomes (default: runs/v5-contract)")
    parser.add_argument("--exclusions", type=Path, default=DEFAULT_EXCLUSIONS)
    parser.add_argument("--jobs", "-n", type=int, default=2, help="pytest-xdist workers (1: none)")
    parser.add_argument("--test-timeout", type=int, default=600, help="seconds a test (pytest-timeout)")
    parser.add_argument("--run-timeout", type=int, default=5400, help="seconds a pytest run")
    parser.add_argument("--moe-backend", default=None, help="moe_lab backend (default: the drop-in's default)")
    parser.add_argument("--slow", action="store_true", help="RUN_SLOW=1 (off by default)")
    parser.add_argument("--online", action="store_true", help="leave the Hub reachable (offline by default)")
    parser.add_argument("--reuse", action="store_true", help="keep runs already finished in --work")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when there is a regression")
    args = parser.parse_args(argv)
    # SIGTERM stops the running pytest's whole process group too (run_one's cleanup), as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    tests_dir = args.tests.resolve()
    unknown = [m for m in args.models if not test_file(tests_dir, m).is_file()]
    if unknown:
        parser.error(f"no tests/models/<model>/test_modeling_<model>.py under {tests_dir} for: {', '.join(unknown)}")
    exclusions = load_exclusions(args.exclusions)  # a malformed file fails before any run
    tests_info = tests_provenance(tests_dir, args.tests_source)
    args.tests_commit = tests_info["commit"]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prov = provenance_record(args, tests_dir, tests_info)
    start = time.monotonic()
    runs = {m: {mode: run_one(tests_dir, work, m, mode, args) for mode in MODES} for m in args.models}
    prov["wall_s"] = round(time.monotonic() - start, 1)
    prov["runs_wall_s"] = round(sum(r["wall_s"] for m in runs.values() for r in m.values()), 1)
    result = build_result(args.models, work, runs, exclusions, prov)
    out = args.out
    store.write_json(out / "tests.json", result)
    store.write_text(out / "table.md", render_table(result))
    regressions = sum(m["summary"]["verdicts"].get(REGRESSION, 0) for m in result["models"].values())
    print(f"[v5-contract] {out / 'table.md'}: {regressions} regressions over {len(args.models)} models", flush=True)
    return 1 if (args.fail_on_regression and regressions) else 0


if __name__ == "__main__":
    sys.exit(main())
