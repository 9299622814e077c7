"""CI runs what the README tells a newcomer to run: the install and test lines of the README's
"On a fresh machine" block appear, unchanged, between the markers of `.ci/run`."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_fresh_machine_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a fresh machine", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _ci_between(marker: str) -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    body = text.split(f"# --- README: {marker} ---\n", 1)[1].split(f"# --- end README: {marker} ---", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = _readme_fresh_machine_block()
    install, tests = _ci_between("install"), _ci_between("tests")
    assert install and tests
    assert readme[: len(install)] == install, "the README's install lines and .ci/run's differ"
    assert tests[0] in readme, "the README's test command is not the one .ci/run runs"
    main_job = [line for line in readme if line not in install and line not in tests]
    assert main_job == ["python -m experiments.sweep"], main_job


def test_readme_pins_nothing_ci_does_not():
    """The only pins in the README's install are torch and triton (CPU wheels), as in CI."""
    pins = re.findall(r"([A-Za-z_-]+)==", " ".join(_readme_fresh_machine_block()))
    assert sorted(pins) == ["torch", "triton"]


def test_the_second_ci_run_leaves_out_only_tests_that_exist():
    """`.ci/run`'s run on the oldest transformers deselects the `once` tests conftest names; a renamed
    file or test in those lists would silently fall back into (or out of) that run."""
    import ast

    import conftest

    assert '-m "not once"' in (ROOT / ".ci" / "run").read_text()
    tests = ROOT / "tests"
    for name in conftest.ONCE_MODULES | set(conftest.ONCE_TESTS):
        assert (tests / name).is_file(), f"conftest.ONCE_*: no tests/{name}"
    for name, functions in conftest.ONCE_TESTS.items():
        defined = {n.name for n in ast.parse((tests / name).read_text()).body if isinstance(n, ast.FunctionDef)}
        assert functions <= defined, f"{name}: no {sorted(functions - defined)}"
