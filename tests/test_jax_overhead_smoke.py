"""experiments/jax_overhead.py runs end to end on the CPU at a tiny geometry and writes its JSON (the GPU
figures come from a device run)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("jax")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: as on the GPU
def test_jax_overhead_cpu_smoke(tmp_path, dtype):
    from experiments import jax_overhead

    out = tmp_path / "overhead.json"
    assert jax_overhead.main(["--device", "cpu", "--dtype", dtype, "--tokens", "16", "--hidden", "8", "--intermediate", "4",
                              "--experts", "4", "--top-k", "2", "--warmup", "1", "--repeats", "1", "--inner", "1",
                              "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    systems = {(r["what"], r["system"]) for r in record["rows"]}
    assert {("router", "torch"), ("router", "jax:family"), ("router", "jax:expert_choice"), ("router", "jax:sparsemax_topk"),
            ("layer", "torch:torch"), ("layer", "jax:torch/buffer"), ("layer", "jax:torch/host"),
            ("layer", "jax-reference")} == systems
    assert all(r["ms"] > 0 and r["vs_native"] for r in record["rows"])
    assert record["provenance"]["git"] and record["geometry"]["experts"] == 4
