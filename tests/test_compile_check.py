"""The GEMM kernels compile for a Hopper GPU at the model's geometry, without a GPU.

The interpreter runs a kernel's Python, not the compiler, so a constexpr branch the compiler
rejects (session 6: the TMA weight descriptor's two return types) or a tile that spills registers
passes every interpreted test. These tests compile a few candidates for sm_90 in a subprocess
(compiled Triton: the test process itself runs the interpreter) and read ptxas' report.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is not installed")
ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, triton
from triton_kernels import compile_check as cc
cases = {c.name: c for c in cc.CASES}
out = []
for name, kwargs, warps, stages in json.loads(sys.argv[1]):
    r = cc.check(cases[name], triton.Config(kwargs, num_warps=warps, num_stages=stages))
    out.append(dict(case=name, verdict=r.verdict, spill=r.spill_bytes, shared=r.shared_bytes,
                    loads=r.pipelined_loads, error=r.error))
print(json.dumps(out))
"""


def compile_reports(*probes):
    """Reports of (case name, tile sizes, num_warps, num_stages) compiled in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(probes)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tma_kernels_with_a_k_major_weight_compile():
    """The fused gate_up kernel with TMA loads of a K-major weight (a 128x64 descriptor where the
    other layout has a 64x128 one) and the plain TMA GEMM both compile and pipeline their loads."""
    tiles = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
    reports = compile_reports(("gate_up_act tma", tiles, 8, 3), ("grouped_mm down fwd tma", tiles, 8, 3))
    for r in reports:
        assert r["error"] is None, f"{r['case']}: {r['error']}"
        assert r["loads"] > 0, f"{r['case']}: loads not pipelined"


def test_split_epilogue_keeps_the_down_backward_tile_in_registers():
    """128x128 down-backward tiles spill without an epilogue split and do not with a four-way one
    (the split is what made those tiles usable: 0.32 vs 0.44 ms on the H200, session 6)."""
    tiles = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
    whole, split = compile_reports(("down_bwd", dict(tiles, EPI_SPLIT=1), 8, 3),
                                   ("down_bwd", dict(tiles, EPI_SPLIT=4), 8, 3))
    assert whole["error"] is None and split["error"] is None
    assert whole["spill"] > 0, "the check cannot see spills (the unsplit epilogue spilled on sm_90)"
    assert split["spill"] == 0 and split["verdict"] == "ok", split


def test_every_form_of_the_rotary_kernel_compiles_without_spilling():
    """The rotary kernel's three forms (rotate-half; GPT-OSS's half-width cos/sin; DeepSeek-V3's
    interleaved pairs, strided reads forward and strided writes backward), both directions, at the
    real models' q and k layouts: each compiles for sm_90 with the tile its launch picks, no spills."""
    from triton_kernels import compile_check as cc

    cases = [c for c in cc.CASES if c.module == "rope"]
    forms = {(c.flags["SHARED_TRIG"], c.flags["INTERLEAVED"], c.flags["BACKWARD"]) for c in cases}
    assert forms == {(shared, interleaved, backward) for shared, interleaved in
                     ((False, False), (True, False), (True, True)) for backward in (False, True)}
    reports = compile_reports(*[(c.name, c.configs[0].kwargs, c.configs[0].num_warps, c.configs[0].num_stages)
                                for c in cases])
    for r in reports:
        assert r["error"] is None, f"{r['case']}: {r['error']}"
        assert r["spill"] == 0 and r["verdict"] == "ok", r


def test_non_gated_relu2_kernels_compile_without_spills():
    """The relu2 (non-gated) forms of the fused kernels compile for sm_90: the activation id must
    reach the down-backward epilogue as a constant (the interpreter runs it either way), and the
    largest down-backward tile keeps its registers."""
    reports = compile_reports(("gate_up_act relu2 tma", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
                              ("down_bwd relu2", {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "EPI_SPLIT": 4}, 8, 3))
    for r in reports:
        assert r["error"] is None, f"{r['case']}: {r['error']}"
        assert r["verdict"] == "ok", r
