"""pytest plugin of the v5 contract (`python -m experiments.v5_contract`): runs a transformers test
tree's modeling tests vanilla or with moe_lab in place, and records every test's outcome.

Loaded with ``-p experiments.v5_contract_plugin --moe-lab-contract {vanilla,moe_lab}``.

Both modes:
- the installed transformers is the one under test: a ``sys.path`` entry that would shadow it with
  another ``transformers`` package (the tree's ``conftest.py`` puts its ``src/`` there, and spawned
  ranks inherit ``sys.path``) is removed;
- version-skew bridge: a name that the tree's tests import from a ``transformers`` module, that
  the installed module lacks and that the tree's own copy of that module (``src/transformers``)
  defines at top level, is defined in the installed module from that copy. Nothing installed is
  replaced; each bridged name is recorded. (The tree may be a little older or newer than the
  installed release; both modes get the same bridge.)
- ``--moe-lab-contract-out FILE``: one JSON line per test (and per failed collection) with its
  outcome, written by the controlling process (under xdist the workers' reports arrive there).

moe_lab mode: every model the tests build runs its MoE blocks through moe_lab, as
``moe_lab.AutoModelForCausalLM`` would run them: ``PreTrainedModel.post_init`` (the last step of
every v5 model's construction, ``from_pretrained`` and ``from_config`` included) is wrapped, and a
model holding v5 experts modules not yet in moe_lab's hands goes through ``moe_lab.patch_model``
with the drop-in's defaults (``--moe-lab-contract-backend`` names another backend). A refusal is
not caught: the test fails, as the drop-in would. The plugin checks that it took effect: the
experts modules built during a test are counted where v5 builds them (their classes' ``__init__``),
independently of the hook; a test that built one while no moe_lab layer was put in place fails
with "moe_lab was not in place". Each test's record carries how many experts modules were built,
how many run through moe_lab, and how many MoE forwards moe_lab computed eagerly.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import re
import sys
import threading
from pathlib import Path

import pytest

MODES = ("vanilla", "moe_lab")
NOT_IN_PLACE = "moe_lab was not in place"


def pytest_addoption(parser):
    group = parser.getgroup("moe_lab v5 contract")
    group.addoption("--moe-lab-contract", choices=MODES, default=None,
                    help="vanilla, or moe_lab in place in every model the tests build")
    group.addoption("--moe-lab-contract-out", default=None, help="JSON-lines file of every test's outcome")
    group.addoption("--moe-lab-contract-backend", default=None,
                    help="moe_lab backend (default: the drop-in's default, moe_backend=None)")


# ---- per-test counters (one test at a time per process) -----------------------------------------
class _Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.experts_built = 0       # v5 experts modules constructed (counted in their __init__)
        self.in_place = 0            # experts modules put in moe_lab's hands (MoELayer or adapted experts)
        self.models_patched = 0      # models that went through patch_model
        self.forwards = 0            # eager MoE forwards computed by moe_lab (compiled regions not counted)

    def as_dict(self) -> dict:
        return {"experts_built": self.experts_built, "in_place": self.in_place,
                "models_patched": self.models_patched, "forwards": self.forwards}


COUNTERS = _Counters()
STATE = {"mode": None, "backend": None, "bridged": [], "unresolved": [], "dropped_paths": [], "wrapped": []}


# ---- both modes: the installed transformers, and the skew bridge --------------------------------
def _installed_transformers_dir() -> Path:
    """Where the installed distribution's `transformers` package is (not whatever `import` finds first)."""
    from importlib.metadata import distribution

    return Path(distribution("transformers").locate_file("transformers")).resolve()


def drop_shadowing_paths() -> list[str]:
    """Remove sys.path entries holding a `transformers` package other than the installed one."""
    installed = _installed_transformers_dir()
    dropped = []
    for entry in list(sys.path):
        candidate = Path(entry or ".").resolve() / "transformers"
        if (candidate / "__init__.py").is_file() and candidate.resolve() != installed:
            sys.path.remove(entry)
            dropped.append(entry)
    return dropped


def _imported_transformers_names(path: Path) -> dict[str, set[str]]:
    """{module: {names}} of every `from transformers... import names` in one source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return {}
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "transformers" or node.module.startswith("transformers.")):
            found.setdefault(node.module, set()).update(a.name for a in node.names if a.name != "*")
    return found


def _top_level_definition(source_file: Path, name: str):
    """The top-level statement of `source_file` that defines `name` (also inside a top-level `if`)."""
    try:
        tree = ast.parse(source_file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None

    def defines(stmt) -> bool:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return stmt.name == name
        if isinstance(stmt, ast.Assign):
            return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
        if isinstance(stmt, ast.AnnAssign):
            return isinstance(stmt.target, ast.Name) and stmt.target.id == name
        return False

    for stmt in tree.body:
        if defines(stmt):
            return stmt
        if isinstance(stmt, ast.If):
            for inner in stmt.body:
                if defines(inner):
                    return inner
    return None


def bridge_missing_names(tree_root: Path, test_files: list[Path]) -> tuple[list[str], list[str]]:
    """Define, in the installed transformers, names the tree's tests import that it lacks and the
    tree's `src/transformers` copy defines. Returns (bridged, unresolved) as "module.name"."""
    wanted: dict[str, set[str]] = {}
    for path in test_files:
        for module, names in _imported_transformers_names(path).items():
            wanted.setdefault(module, set()).update(names)
    bridged, unresolved = [], []
    for module_name in sorted(wanted):
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module the installed release lacks: the import error shows in the test
            continue
        for name in sorted(wanted[module_name]):
            if hasattr(module, name):
                continue
            try:  # a submodule imported by name
                importlib.import_module(f"{module_name}.{name}")
                continue
            except Exception:  # noqa: BLE001
                pass
            relative = Path(*module_name.split("."))
            candidates = [tree_root / "src" / relative.with_suffix(".py"), tree_root / "src" / relative / "__init__.py"]
            stmt = next((s for s in (_top_level_definition(c, name) for c in candidates if c.is_file()) if s), None)
            if stmt is None:
                unresolved.append(f"{module_name}.{name}")
                continue
            code = compile(ast.Module(body=[stmt], type_ignores=[]), f"<v5-contract bridge {module_name}.{name}>", "exec")
            namespace = dict(module.__dict__)
            try:  # evaluated apart first: a definition that needs what the installed module lacks is left out
                exec(code, namespace)  # noqa: S102 - the tree's own definition
            except Exception as exc:  # noqa: BLE001
                unresolved.append(f"{module_name}.{name} ({type(exc).__name__}: {exc})")
                continue
            exec(code, module.__dict__)  # noqa: S102 - now in the installed module (functions see its globals)
            bridged.append(f"{module_name}.{name}")
    return bridged, unresolved


def _tree_test_sources(tree_root: Path, args: list[str]) -> list[Path]:
    """The tree's shared test modules (tests/*.py and their helper packages, not other models'
    tests) and the files or directories named on the command line."""
    tests = tree_root / "tests"
    files = [p for p in tests.glob("*.py")]
    for sub in ("generation", "utils", "exporters"):
        files += sorted((tests / sub).glob("*.py"))
    for arg in args:
        path = Path(arg.split("::")[0])
        path = path if path.is_absolute() else tree_root / path
        if path.is_dir():
            files += sorted(path.rglob("*.py"))
        elif path.suffix == ".py":
            files += sorted(path.parent.glob("*.py"))
    return files


# ---- moe_lab mode -------------------------------------------------------------------------------
def _is_v5_experts(module) -> bool:
    from moe_lab.families import is_v5_experts_module

    return is_v5_experts_module(module)


def _experts_in_place(model) -> tuple[int, int]:
    """(v5 experts modules in `model`, how many of them run through moe_lab)."""
    from moe_lab.layer import MoELayer

    total = in_place = 0
    for parent in model.modules():
        for child in parent.children():
            if _is_v5_experts(child):
                total += 1
                in_place += isinstance(parent, MoELayer) or hasattr(child, "moe_lab_planner")
    return total, in_place


def _put_in_place(model) -> None:
    total, in_place = _experts_in_place(model)
    if total == 0 or in_place == total:  # a dense model, or an outer model around a patched one
        return
    if in_place:
        raise AssertionError(f"{type(model).__name__}: {in_place} of {total} experts modules already run "
                             "through moe_lab; the contract plugin patches whole models only")
    import moe_lab

    moe_lab.patch_model(model, moe_backend=STATE["backend"])
    total_after, in_place_after = _experts_in_place(model)
    if in_place_after != total_after:
        raise AssertionError(f"{NOT_IN_PLACE}: {type(model).__name__}: {total_after - in_place_after} of "
                             f"{total_after} experts modules still run v5's code after patch_model")
    with COUNTERS.lock:
        COUNTERS.models_patched += 1
        COUNTERS.in_place += in_place_after
    _note_process(type(model).__name__)


def _note_process(model_class: str) -> None:
    """Once per process: a line in MOE_LAB_CONTRACT_PROCESS_LOG saying this process put moe_lab in
    place, and whether multiprocessing spawned it (the ranks of distributed tests)."""
    path = os.environ.get("MOE_LAB_CONTRACT_PROCESS_LOG")
    if not path or STATE.get("noted"):
        return
    import multiprocessing

    STATE["noted"] = True
    record = {"pid": os.getpid(), "spawned": multiprocessing.parent_process() is not None, "model": model_class,
              "xdist_worker": os.environ.get("PYTEST_XDIST_WORKER")}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _install_moe_lab() -> None:
    import torch
    from transformers import PreTrainedModel

    import moe_lab.layer as layer

    original_post_init = PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        result = original_post_init(self, *args, **kwargs)
        _put_in_place(self)
        return result

    post_init.__wrapped__ = original_post_init
    PreTrainedModel.post_init = post_init

    original_run = layer.run_routed_experts

    def run_routed_experts(*args, **kwargs):
        if not torch.compiler.is_compiling():
            COUNTERS.forwards += 1
        return original_run(*args, **kwargs)

    run_routed_experts.__wrapped__ = original_run
    layer.run_routed_experts = run_routed_experts


def _count_experts_construction(model_dirs: set[str]) -> list[str]:
    """Wrap `__init__` of the v5 experts classes of these models' modeling modules (counted per test)."""
    wrapped = []
    for model_type in sorted(model_dirs):
        try:
            modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except Exception:  # noqa: BLE001 - not a model directory of the installed release
            continue
        for name, cls in sorted(vars(modeling).items()):
            if not (isinstance(cls, type) and cls.__module__ == modeling.__name__ and name.endswith("Experts")):
                continue
            if getattr(cls.__init__, "_v5_contract_counted", False):
                continue
            original = cls.__init__

            def __init__(self, *args, __original=original, **kwargs):
                __original(self, *args, **kwargs)
                if _is_v5_experts(self):
                    with COUNTERS.lock:
                        COUNTERS.experts_built += 1

            __init__._v5_contract_counted = True
            __init__.__wrapped__ = original
            cls.__init__ = __init__
            wrapped.append(f"{modeling.__name__}.{name}")
    return wrapped


def _model_dirs(args) -> set[str]:
    """The model directories (tests/models/<name>/...) named on the command line."""
    dirs = set()
    for arg in args:
        parts = Path(str(arg).split("::")[0]).parts
        if "models" in parts and parts.index("models") + 1 < len(parts):
            dirs.add(parts[parts.index("models") + 1])
    return dirs


# ---- activation: at interpreter start (every process of the run) or at pytest_configure ----------
ENV_MODE, ENV_TREE, ENV_BACKEND, ENV_MODELS = ("MOE_LAB_CONTRACT_MODE", "MOE_LAB_CONTRACT_TREE",
                                               "MOE_LAB_CONTRACT_BACKEND", "MOE_LAB_CONTRACT_MODELS")


def activate(mode: str, tree_root: Path, backend: str | None, model_dirs: set[str]) -> None:
    """Put the run's mode in place in this process (idempotent): the shadowing paths dropped, the
    skew bridge, and in moe_lab mode the hook and the experts-construction count."""
    if mode not in MODES:
        raise ValueError(f"v5 contract mode {mode!r}: one of {MODES}")
    if STATE["mode"] is not None:
        if STATE["mode"] != mode:
            raise RuntimeError(f"v5 contract: this process runs {STATE['mode']!r}, asked {mode!r}")
        STATE["dropped_paths"] += drop_shadowing_paths()
        return
    STATE["mode"], STATE["backend"] = mode, backend
    STATE["dropped_paths"] = drop_shadowing_paths()
    sources = _tree_test_sources(tree_root, [f"tests/models/{m}" for m in sorted(model_dirs)])
    STATE["bridged"], STATE["unresolved"] = bridge_missing_names(tree_root, sources)
    if mode == "moe_lab":
        _install_moe_lab()
        STATE["wrapped"] = _count_experts_construction(model_dirs)


def activate_from_environment() -> None:
    """Called by `experiments/v5_contract_site/sitecustomize.py` at the start of every Python process
    the runner starts (pytest, its xdist workers, the ranks tests spawn): nothing without MOE_LAB_CONTRACT_MODE."""
    mode = os.environ.get(ENV_MODE)
    if not mode:
        return
    models = {m for m in os.environ.get(ENV_MODELS, "").split(",") if m}
    activate(mode, Path(os.environ.get(ENV_TREE, ".")), os.environ.get(ENV_BACKEND) or None, models)


# ---- hooks --------------------------------------------------------------------------------------
def pytest_configure(config):
    mode = config.getoption("--moe-lab-contract")
    if mode is None:
        return
    activate(mode, Path(str(config.rootpath)), config.getoption("--moe-lab-contract-backend"),
             _model_dirs(config.args))
    config.pluginmanager.register(_Recorder(config), "moe_lab_v5_contract_recorder")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if STATE["mode"] is not None:
        COUNTERS.reset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if STATE["mode"] is None:
        return
    report = outcome.get_result()
    if report.when == "call" and STATE["mode"] == "moe_lab" and report.passed and not hasattr(report, "wasxfail"):
        if COUNTERS.experts_built and not COUNTERS.in_place:
            report.outcome = "failed"
            report.longrepr = (f"{NOT_IN_PLACE}: {COUNTERS.experts_built} v5 experts modules were built during "
                               "this test and none runs through moe_lab")
    if report.when in ("call", "teardown") or (report.when == "setup" and not report.passed):
        report.user_properties.append(("moe_lab_contract", COUNTERS.as_dict()))


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Unsupported|Interrupt|Exit)\b.*:")
_GOT = re.compile(r"\bgot (\w+(Error|Exception)\(.*\))\s*$")


def _short_message(report) -> str:
    """What went wrong (or why the test was skipped), in one line of at most 300 characters: the
    crash's first line, and where that says little, the line that does (the exception a spawned
    rank raised; the explanation of a torch.compile graph break)."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:300]
    crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
    text = crash if crash else str(report.longrepr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and set(ln.strip()) - set("^~ ")]
    if not lines:
        return ""
    head, detail = lines[0], ""
    if head.endswith(":") and len(lines) > 1:  # e.g. ProcessRaisedException: <a rank's traceback>
        detail = next((ln for ln in reversed(lines[1:]) if _EXCEPTION_LINE.match(ln)), lines[-1])
    else:
        explanation = next((ln for ln in lines[1:] if ln.startswith("Explanation:")), "")
        if explanation:
            got = _GOT.search(explanation)
            detail = got.group(1) if got else explanation[len("Explanation:"):].strip()
    if detail and not head.endswith(":"):
        head += " --"
    return (f"{head} {detail}" if detail else head)[:300]


class _Recorder:
    """Writes one JSON line per test phase report that decides the outcome (controlling process)."""

    def __init__(self, config):
        self.config = config
        self.is_worker = hasattr(config, "workerinput")
        path = config.getoption("--moe-lab-contract-out")
        self.path = None if (path is None or self.is_worker) else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write({"kind": "start", "mode": STATE["mode"], "backend": STATE["backend"], "pid": os.getpid(),
                         "bridged": STATE["bridged"], "unresolved": STATE["unresolved"],
                         "dropped_paths": STATE["dropped_paths"]})

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def pytest_collectreport(self, report):
        if self.path is not None and report.failed:
            self._write({"kind": "collect", "nodeid": report.nodeid, "outcome": "error", "message": _short_message(report)})

    def pytest_runtest_logreport(self, report):
        if self.path is None:
            return
        stats = dict(report.user_properties).get("moe_lab_contract")
        context = getattr(report, "context", None)  # a unittest subTest's or a `subtests` fixture's report
        subtest = None if context is None else (str(getattr(context, "msg", "") or "") + " " + json.dumps(
            getattr(context, "kwargs", {}) or {}, sort_keys=True, default=str)).strip()
        self._write({"kind": "test", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                     "subtest": subtest, "wasxfail": hasattr(report, "wasxfail"), "duration": round(report.duration, 3),
                     "message": "" if report.passed else _short_message(report), "moe_lab": stats})

    def pytest_sessionfinish(self, session, exitstatus):
        if self.path is not None:
            self._write({"kind": "finish", "exitstatus": int(exitstatus), "wrapped": STATE["wrapped"]})
