"""Cells over two processes on the CPU (gloo), launched by the sweep through torch.distributed.run:
v5's FSDP2 via DistributedConfig, and moe_lab's expert parallel (replicated, and with FSDP2 for the rest)."""
import pytest

from experiments import sweep

TINY = {"model": "tiny-qwen3-moe", "layers": 1, "batch": 1, "seq": 32, "dtype": "fp32", "optimizer": "adamw",
        "warmup": 1, "steps": 1, "device": "cpu"}


@pytest.mark.slow
def test_two_process_cells(tmp_path):
    conf = {"name": "d", "defaults": TINY, "cell_timeout_s": 150, "env": {"OMP_NUM_THREADS": "1"},
            "cells": [{"system": "v5-grouped_mm"}, {"system": "v5-fsdp2-grouped_mm", "nproc": 2},
                      {"system": "ep2-all2all-torch", "nproc": 2}, {"system": "ep2-all2all-torch-fsdp", "nproc": 2},
                      # v5's expert parallel makes its experts DTensors: fused AdamW must still run
                      {"system": "v5-ep", "nproc": 2, "optimizer": "adamw_fused"}]}
    single, fsdp, ep, ep_fsdp, v5_ep = sweep.run_sweep(conf, tmp_path / "d", progress=False)
    assert v5_ep["status"] == "ok", v5_ep.get("error")
    assert single["status"] == "ok" and fsdp["status"] == "ok", fsdp.get("error")
    assert fsdp["world"] == 2 and "torch.distributed.run" in " ".join(fsdp["launcher"]["command"])
    # rank 0 trains on the single-process batch from the same weights: same first-step loss
    assert fsdp["metrics"]["first_loss"] == pytest.approx(single["metrics"]["first_loss"], rel=1e-5)
    for record in (ep, ep_fsdp):
        assert record["status"] == "ok", record.get("error")
        assert record["metrics"]["first_loss"] == pytest.approx(single["metrics"]["first_loss"], rel=1e-5)
