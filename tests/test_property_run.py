"""experiments.property_run: the hypothesis counts and failures of a property run, read from pytest's log."""
from __future__ import annotations

import json

from experiments import property_run

LOG = """\
.F.                                                                      [100%]
============================ Hypothesis Statistics =============================
tests/test_kernel_properties.py::test_route_nonfinite:

  - during reuse phase (0.01 seconds):
    - Typical runtimes: ~ 1ms, of which < 1ms in data generation
    - 2 passing, 0 failing, and 0 invalid test cases

  - during generate phase (2.15 seconds):
    - Typical runtimes: ~ 1-120 ms, of which ~ 0-3 ms in data generation
    - 998 passing, 0 failing, and 3 invalid test cases

  - Stopped because settings.max_examples=1000


tests/test_triton_kernels.py::test_grouped_mm_matches[bf16]:

  - during generate phase (2.65 seconds):
    - Typical runtimes: ~ 8-326 ms, of which ~ 0-1 ms in data generation
    - 40 passing, 1 failing, and 0 invalid test cases

  - Stopped because nothing left to do

=========================== short test summary info ============================
FAILED tests/test_triton_kernels.py::test_grouped_mm_matches[bf16] - AssertionError: Tensor-likes are not close!
1 failed, 2 passed in 12.34s
"""


def test_counts_add_over_phases_and_failures_are_named():
    got = property_run.parse(LOG)
    assert got["tests"]["tests/test_kernel_properties.py::test_route_nonfinite"] == {
        "passing": 1000, "failing": 0, "invalid": 3, "stopped_because": "settings.max_examples=1000"}
    assert got["tests"]["tests/test_triton_kernels.py::test_grouped_mm_matches[bf16]"]["failing"] == 1
    assert got["failed"] == ["tests/test_triton_kernels.py::test_grouped_mm_matches[bf16]"]
    assert got["summary"] == "1 failed, 2 passed"


def test_parse_mode_writes_the_record_and_marks_shortfalls(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(LOG)
    rc = property_run.main(["--parse", str(log), "--out", str(tmp_path / "out")])
    assert rc == 1  # a failed test
    record = json.loads((tmp_path / "out" / "properties.json").read_text())
    assert record["profile"] == "gpu" and len(record["tests"]) == 2 and record["provenance"]["git"]["commit"]
    md = (tmp_path / "out" / "properties.md").read_text()
    assert "| 40 (< 1000) | 1 |" in md and "| 1000 | 0 | 3 |" in md
    assert "1 test(s) ran fewer than 1000" in md and "test_grouped_mm_matches[bf16]`." in md
    assert (tmp_path / "out" / "pytest.log").read_text() == LOG
