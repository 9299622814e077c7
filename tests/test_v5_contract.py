"""The v5 contract command's own logic (experiments/v5_contract.py) on synthetic outcomes, and its
pytest plugin on a tiny synthetic test tree: no transformers test tree, no network."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments import v5_contract as vc
from experiments import v5_contract_plugin as plugin

REPO_ROOT = Path(__file__).resolve().parent.parent
FILE = "tests/models/m/test_modeling_m.py"


def rec(name, when, outcome, message="", subtest=None, wasxfail=False, moe_lab=None):
    return {"kind": "test", "nodeid": f"{FILE}::T::{name}", "when": when, "outcome": outcome, "message": message,
            "subtest": subtest, "wasxfail": wasxfail, "duration": 0.1, "moe_lab": moe_lab}


def passed(name, moe_lab=None):
    return [rec(name, "setup", "passed"), rec(name, "call", "passed", moe_lab=moe_lab), rec(name, "teardown", "passed")]


def failed(name, message="AssertionError: boom", moe_lab=None):
    return [rec(name, "setup", "passed"), rec(name, "call", "failed", message, moe_lab=moe_lab),
            rec(name, "teardown", "passed")]


def skipped(name, reason="Skipped: test is slow"):
    return [rec(name, "setup", "skipped", reason), rec(name, "teardown", "passed")]


# ---- outcomes -----------------------------------------------------------------------------------
def test_outcomes_of_each_phase():
    records = (passed("test_a") + failed("test_b") + skipped("test_c")
               + [rec("test_d", "setup", "failed", "fixture broke"), rec("test_d", "teardown", "passed")]
               + [rec("test_e", "setup", "passed"), rec("test_e", "call", "passed"),
                  rec("test_e", "teardown", "failed", "leaked")]
               + [rec("test_f", "setup", "passed"), rec("test_f", "call", "skipped", "xfail", wasxfail=True),
                  rec("test_f", "teardown", "passed")]
               + [rec("test_g", "setup", "passed")]  # the run was killed during test_g
               + [{"kind": "collect", "nodeid": "tests/models/m/test_other.py", "message": "ImportError: x"}])
    out = vc.test_outcomes(records)
    assert {k: v["outcome"] for k, v in out.items()} == {
        "T::test_a": "passed", "T::test_b": "failed", "T::test_c": "skipped", "T::test_d": "error",
        "T::test_e": "error", "T::test_f": "xfailed", "T::test_g": "not run", "test_other.py": "error"}
    assert out["T::test_b"]["message"] == "AssertionError: boom"
    assert out["T::test_d"]["message"] == "setup: fixture broke"
    assert out["T::test_other.py" if False else "test_other.py"]["message"].startswith("collection: ImportError")


def test_a_failed_subtest_fails_its_test_whatever_the_call_report_says():
    records = [rec("test_s", "setup", "passed"),
               rec("test_s", "call", "passed", subtest="[A]"),
               rec("test_s", "call", "failed", "AssertionError: 1 not greater than 1", subtest="[B]"),
               rec("test_s", "call", "passed", moe_lab={"in_place": 2, "forwards": 4}),
               rec("test_s", "teardown", "passed")]
    out = vc.test_outcomes(records)["T::test_s"]
    assert out["outcome"] == "failed"
    assert out["message"] == "subtest [B]: AssertionError: 1 not greater than 1"
    assert out["moe_lab"] == {"in_place": 2, "forwards": 4}


@pytest.mark.parametrize("vanilla, moe_lab, excluded, expected", [
    ("passed", "failed", False, vc.REGRESSION),
    ("passed", "error", False, vc.REGRESSION),
    ("passed", "not run", False, vc.REGRESSION),
    ("xpassed", "failed", False, vc.REGRESSION),
    ("passed", "failed", True, vc.EXCLUDED),
    ("failed", "passed", False, vc.FIXED),
    ("error", "failed", False, vc.BOTH_FAILED),
    ("passed", "passed", False, vc.SAME),
    ("skipped", "xfailed", False, vc.SAME),
    ("passed", "skipped", False, vc.SKIPPED_WITH_MOE_LAB),
    ("skipped", "failed", False, vc.RAN_WITH_MOE_LAB_ONLY),
    ("not run", "passed", False, vc.NOT_RUN_VANILLA),
])
def test_verdicts(vanilla, moe_lab, excluded, expected):
    assert vc.verdict(vanilla, moe_lab, excluded) == expected


def test_compare_pairs_every_test_of_either_run():
    vanilla = vc.test_outcomes(passed("test_a") + passed("test_b") + failed("test_c", "KeyError: v"))
    moe_lab = vc.test_outcomes(failed("test_a", "RuntimeError: fake tensor 12", moe_lab={"in_place": 2})
                               + passed("test_c", moe_lab={"in_place": 2, "forwards": 1}) + passed("test_new"))
    out = vc.compare("m", vanilla, moe_lab, [])
    assert out["T::test_a"]["verdict"] == vc.REGRESSION
    assert out["T::test_a"]["moe_lab_message"] == "RuntimeError: fake tensor 12"
    assert out["T::test_b"] == {"vanilla": "passed", "moe_lab": "not run", "verdict": vc.REGRESSION,
                                "moe_lab_message": "not in this run"}
    assert out["T::test_c"]["verdict"] == vc.FIXED and out["T::test_c"]["vanilla_message"] == "KeyError: v"
    assert out["T::test_new"]["verdict"] == vc.NOT_RUN_VANILLA
    summary = vc.summarize(out)
    assert summary["vanilla"] == {"passed": 2, "failed": 1, "skipped": 0, "not run": 1}
    assert summary["moe_lab"] == {"passed": 2, "failed": 1, "skipped": 0, "not run": 1}
    assert summary["moe_lab_in_place"] == 2 and summary["moe_lab_forwards"] == 1
    assert summary["verdicts"] == {vc.FIXED: 1, vc.NOT_RUN_VANILLA: 1, vc.REGRESSION: 2}


# ---- exclusions ---------------------------------------------------------------------------------
def test_exclusions_match_by_model_and_pattern(tmp_path):
    path = tmp_path / "ex.yaml"
    path.write_text(textwrap.dedent("""\
        exclusions:
          - model: "*"
            test: "test_eager_matches_batched*"
            reason: >-
              v5's own implementations
              compared with each other
          - model: olmoe
            test: "OlmoeModelTest::test_x[*]"
            reason: only here
          - model: mixtral
            test: "test_y"
            message: "AssertionError: Expected 'mock'*"
            reason: only for that failure
        """))
    ex = vc.load_exclusions(path)
    assert ex[0].reason == "v5's own implementations compared with each other"
    assert vc.matching_exclusion("mixtral", "MixtralModelTest::test_eager_matches_batched_and_grouped_inference_0_fp16",
                                 ex) is ex[0]
    assert vc.matching_exclusion("olmoe", "OlmoeModelTest::test_x[a]", ex) is ex[1]
    assert vc.matching_exclusion("mixtral", "MixtralModelTest::test_x[a]", ex) is None  # another model
    assert vc.matching_exclusion("olmoe", "OlmoeModelTest::test_x", ex) is None
    assert vc.matching_exclusion("mixtral", "M::test_y", ex, "AssertionError: Expected 'mock' to be called") is ex[2]
    assert vc.matching_exclusion("mixtral", "M::test_y", ex, "AssertionError: Tensor-likes are not close!") is None
    vanilla = vc.test_outcomes(passed("test_eager_matches_batched_1") + passed("test_other"))
    moe_lab = vc.test_outcomes(failed("test_eager_matches_batched_1") + failed("test_other"))
    out = vc.compare("m", vanilla, moe_lab, ex)
    assert out["T::test_eager_matches_batched_1"]["verdict"] == vc.EXCLUDED
    assert out["T::test_eager_matches_batched_1"]["exclusion"]["model"] == "*"
    assert out["T::test_other"]["verdict"] == vc.REGRESSION
    assert vc.unused_exclusions({"m": {"tests": out}}, ex) == [ex[1], ex[2]]


@pytest.mark.parametrize("text", [
    "exclusions:\n  - {model: '*', test: 'x'}\n",                       # no reason
    "exclusions:\n  - {model: '*', test: 'x', reason: '  '}\n",          # an empty reason
    "exclusions:\n  - {model: '*', test: 'x', reason: r, extra: 1}\n",   # an unknown key
    "exclusions:\n  - {model: '*', test: 'x', reason: r, message: ''}\n",  # an empty message pattern
    "exclusions: {model: '*'}\n",
])
def test_malformed_exclusions_are_refused(tmp_path, text):
    path = tmp_path / "ex.yaml"
    path.write_text(text)
    with pytest.raises(ValueError):
        vc.load_exclusions(path)


def test_the_committed_exclusions_file_loads_and_gives_reasons():
    ex = vc.load_exclusions(vc.DEFAULT_EXCLUSIONS)
    assert all(len(e.reason) > 40 for e in ex)


# ---- the table ----------------------------------------------------------------------------------
def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "te')  # a torn last line


def _result(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    in_place = {"experts_built": 2, "in_place": 2, "models_patched": 1, "forwards": 3}
    start = {"kind": "start", "bridged": ["transformers.testing_utils._X"], "unresolved": []}
    _write_jsonl(work / "m-vanilla.jsonl", [start] + passed("test_a") + passed("test_b") + passed("test_c")
                 + failed("test_d", "AttributeError: no _is_stateful") + skipped("test_e")
                 + passed("test_eager_matches_batched_0"))
    _write_jsonl(work / "m-moe_lab.jsonl", [start]
                 + failed("test_a", "torch._dynamo.exc.Unsupported: call 12", moe_lab=in_place)
                 + failed("test_b", "torch._dynamo.exc.Unsupported: call 7", moe_lab=in_place)
                 + passed("test_c", moe_lab=in_place) + failed("test_d", "AttributeError: no _is_stateful")
                 + skipped("test_e") + failed("test_eager_matches_batched_0", "AssertionError: mock", moe_lab=in_place))
    runs = {"m": {mode: {"returncode": 1, "timed_out": False, "wall_s": 12.0, "note": "", "moe_lab_commit": "f" * 40,
                         "moe_lab_dirty": False} for mode in vc.MODES}}
    prov = {"date": "2026-12-07 12:00 UTC", "transformers": "5.25.0", "torch": "2.13.0", "moe_lab_commit": "abc" * 14,
            "moe_lab_dirty": False, "moe_backend": "default", "tests_source": "a tree", "machine": "2 CPU cores",
            "pytest_options": "-n 2"}
    ex = [vc.Exclusion("*", "test_eager_matches_batched*", "v5's own implementations compared"),
          vc.Exclusion("m", "test_never*", "matches nothing")]
    return vc.build_result(["m"], work, runs, ex, prov)


def test_message_keys_mask_numbers_not_names():
    assert vc.message_key("RuntimeError: BF16 expected, got float32 at 0x7f3a (12 of 1.5e-3)\nmore") == \
        "RuntimeError: BF16 expected, got float32 at # (# of #)"


def test_build_result_and_table(tmp_path):
    result = _result(tmp_path)
    m = result["models"]["m"]
    assert m["summary"]["vanilla"] == {"passed": 4, "failed": 1, "skipped": 1, "not run": 0}
    assert m["summary"]["moe_lab"] == {"passed": 1, "failed": 4, "skipped": 1, "not run": 0}
    assert m["summary"]["verdicts"] == {vc.BOTH_FAILED: 1, vc.EXCLUDED: 1, vc.REGRESSION: 2, vc.SAME: 2}
    assert m["summary"]["moe_lab_in_place"] == 4
    assert result["provenance"]["bridged"] == ["transformers.testing_utils._X"]
    assert result["provenance"]["moe_lab_commit"] == "f" * 40  # the runs' commit, not the checkout's
    assert [e["test"] for e in result["unused_exclusions"]] == ["test_never*"]
    # the two compile failures are one group: numbers are masked
    assert vc.regression_groups(m["tests"]) == [("torch._dynamo.exc.Unsupported: call #", ["T::test_a", "T::test_b"])]
    table = vc.render_table(result)
    assert "| m | 6 | 4 / 1 / 1 | 1 / 4 / 1 | 4 (4) | **2** | 1 | none |" in table
    assert "- 2: `torch._dynamo.exc.Unsupported: call #`: `test_a`, `test_b`" in table
    assert "`test_eager_matches_batched*` (*; 1 tests): v5's own implementations compared" in table
    assert "`test_never*` (m)" in table
    assert "`transformers.testing_utils._X`" in table


def test_outputs_are_written_atomically(tmp_path, monkeypatch):
    """tests.json and table.md go through experiments.store (temporary file, then rename)."""
    result = _result(tmp_path)
    written = []
    monkeypatch.setattr(vc.store, "write_bytes", lambda path, data: written.append(Path(path).name))
    vc.store.write_json(tmp_path / "tests.json", result)
    vc.store.write_text(tmp_path / "table.md", vc.render_table(result))
    assert written == ["tests.json", "table.md"]


def test_main_refuses_a_tree_without_the_model_tests(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vc.main(["--tests", str(tmp_path), "--models", "qwen3_moe", "--out", str(tmp_path / "out")])
    assert "for: qwen3_moe" in capsys.readouterr().err


def test_the_pytest_command_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_SLOW", "1")
    cmd = vc.pytest_command(tmp_path, "olmoe", "moe_lab", tmp_path / "o.jsonl", 2, 300, None)
    assert cmd[3] == "tests/models/olmoe/test_modeling_olmoe.py"
    assert cmd[cmd.index("--moe-lab-contract") + 1] == "moe_lab" and "--timeout" in cmd
    env = vc.pytest_env(tmp_path, "olmoe", "moe_lab", None, slow=False, online=False, process_log=tmp_path / "p")
    assert "RUN_SLOW" not in env and env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(vc.SITE_DIR), str(REPO_ROOT)]
    assert env["MOE_LAB_CONTRACT_MODE"] == "moe_lab" and env["MOE_LAB_CONTRACT_MODELS"] == "olmoe"
    assert vc.pytest_env(tmp_path, "olmoe", "vanilla", None, True, True, tmp_path / "p")["RUN_SLOW"] == "1"


# ---- the plugin ---------------------------------------------------------------------------------
def test_bridge_finds_definitions_and_imports(tmp_path):
    src = tmp_path / "src" / "transformers"
    src.mkdir(parents=True)
    (src / "testing_utils.py").write_text("A = 1\nif True:\n    B = {'x': 2}\ndef f():\n    return A\n")
    test = tmp_path / "t.py"
    test.write_text("from transformers.testing_utils import (A, B)\nfrom transformers import x\nfrom .y import z\n")
    assert plugin._imported_transformers_names(test) == {"transformers.testing_utils": {"A", "B"},
                                                         "transformers": {"x"}}
    assert plugin._top_level_definition(src / "testing_utils.py", "B").lineno == 3
    assert plugin._top_level_definition(src / "testing_utils.py", "f").name == "f"
    assert plugin._top_level_definition(src / "testing_utils.py", "C") is None


class _Crash:
    def __init__(self, message):
        self.skipped, self.longrepr = False, type("L", (), {"reprcrash": type("C", (), {"message": message})()})()


@pytest.mark.parametrize("message, expected", [
    ("AssertionError: 1 not greater than 1\nmore", "AssertionError: 1 not greater than 1"),
    ("torch.multiprocessing.spawn.ProcessRaisedException: \n\n-- Process 0 terminated with the following error:\n"
     "Traceback (most recent call last):\n  File x\n    f()\n    ^^^\nRuntimeError: mixed torch.Tensor and DTensor",
     "torch.multiprocessing.spawn.ProcessRaisedException: RuntimeError: mixed torch.Tensor and DTensor"),
    ("torch._dynamo.exc.TorchRuntimeError: RuntimeError when making fake tensor call\n  Explanation: Dynamo failed "
     "to run FX node: call_function f(*(x,)): got RuntimeError('Expected inputs of BF16 type')\n  Hint: h",
     "torch._dynamo.exc.TorchRuntimeError: RuntimeError when making fake tensor call -- "
     "RuntimeError('Expected inputs of BF16 type')"),
    ("torch._dynamo.exc.Unsupported: Unsupported method call\n  Explanation: Dynamo does not know how\n  Hint: h",
     "torch._dynamo.exc.Unsupported: Unsupported method call -- Dynamo does not know how"),
])
def test_failure_messages_say_what_went_wrong(message, expected):
    assert plugin._short_message(_Crash(message)) == expected


def test_shadowing_transformers_paths_are_dropped(tmp_path, monkeypatch):
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    assert plugin.drop_shadowing_paths() == [str(tmp_path)]
    assert str(tmp_path) not in sys.path


TREE_TEST = '''
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock


def config():
    return Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                          num_experts_per_tok=2, head_dim=8)


def test_moe_model():
    model = Qwen3MoeForCausalLM(config())
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)


def test_dense_model():
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))


def test_block_outside_a_model():
    Qwen3MoeSparseMoeBlock(config())


@pytest.mark.parametrize("n", [1])
def test_failing(n):
    assert n == 2
'''


@pytest.mark.parametrize("mode", ["vanilla", "moe_lab"])
def test_plugin_puts_moe_lab_in_place_and_records(tmp_path, mode):
    """A tiny tree, laid out as transformers' (tests/models/qwen3_moe/...), run as the command runs it."""
    model_dir = tmp_path / "tests" / "models" / "qwen3_moe"
    model_dir.mkdir(parents=True)
    (model_dir / "test_modeling_qwen3_moe.py").write_text(TREE_TEST)
    out = tmp_path / "out.jsonl"
    cmd = vc.pytest_command(tmp_path, "qwen3_moe", mode, out, jobs=1, test_timeout=120, backend=None)
    env = vc.pytest_env(tmp_path, "qwen3_moe", mode, None, False, False, tmp_path / "processes.jsonl")
    proc = subprocess.run(cmd + ["-p", "no:randomly"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    records = vc.read_records(out)
    assert records[0]["kind"] == "start" and records[0]["mode"] == mode, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests = vc.test_outcomes(records)
    got = {k: v["outcome"] for k, v in tests.items()}
    if mode == "vanilla":
        assert got == {"test_moe_model": "passed", "test_dense_model": "passed", "test_block_outside_a_model": "passed",
                       "test_failing[1]": "failed"}
        return
    assert got == {"test_moe_model": "passed", "test_dense_model": "passed", "test_block_outside_a_model": "failed",
                   "test_failing[1]": "failed"}
    counters = tests["test_moe_model"]["moe_lab"]
    assert counters["experts_built"] == 2 and counters["in_place"] == 2 and counters["models_patched"] == 1
    assert counters["forwards"] == 2
    assert tests["test_dense_model"]["moe_lab"]["experts_built"] == 0
    assert tests["test_block_outside_a_model"]["message"].startswith(plugin.NOT_IN_PLACE)
