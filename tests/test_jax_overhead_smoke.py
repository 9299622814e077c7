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


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """The GPU run of 1208279 lost every figure to one failing row; now the row says why and the rest stay."""
    from experiments import jax_overhead
    from moe_lab.jax import layer

    real = layer.moe_layer

    def host_fails(*a, transport="buffer", **kw):
        if transport == "host":
            raise RuntimeError("the host transport broke")
        return real(*a, transport=transport, **kw)

    monkeypatch.setattr(layer, "moe_layer", host_fails)
    out = tmp_path / "overhead.json"
    assert jax_overhead.main(["--device", "cpu", "--tokens", "16", "--hidden", "8", "--intermediate", "4", "--experts", "4",
                              "--top-k", "2", "--warmup", "1", "--repeats", "1", "--inner", "1", "--skip", "router",
                              "--out", str(out)]) == 1
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["jax:torch/host"]["status"] == "failed" and "host transport broke" in rows["jax:torch/host"]["error"]
    assert rows["jax:torch/host"]["ms"] is None and rows["jax:torch/host"]["vs_native"] is None
    assert rows["jax-reference"]["status"] == "ok" and rows["jax:torch/buffer"]["vs_native"] > 0


def test_the_host_transport_runs_torch_where_jax_computes(monkeypatch):
    import jax
    import torch

    from moe_lab.jax import layer

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert layer._host_device() == "cuda"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layer._host_device() == "cpu"
