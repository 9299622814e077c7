"""The step breakdown on the CPU: every part measured, none negative, the parts add up to the step,
one forward and one backward interval per MoE block, and a failed system recorded, not raised."""
from __future__ import annotations

import json

import pytest
import torch

from experiments import cell, kernel_profile, step_breakdown


@pytest.mark.parametrize("system", ["v5-grouped_mm", "torch"])
def test_parts_add_up_to_the_step(system):
    spec = cell.normalise({"model": "tiny-qwen3-moe", "layers": 2, "seq": 32, "system": system,
                           "device": "cpu", "warmup": 1, "steps": 2, "dtype": "fp32"})
    row = step_breakdown.breakdown_system(spec)
    assert len(row["steps"]) == 2
    for step in row["steps"]:
        parts = [step[p] for p in step_breakdown.PARTS]
        assert all(p >= 0 for p in parts), step
        assert sum(parts) == pytest.approx(step["step"], rel=1e-6, abs=1e-6)
        assert step["fwd_moe"] > 0 and step["bwd_moe"] > 0


def test_one_interval_per_moe_block():
    import transformers

    from tiny_models import tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    clock = step_breakdown._Clock(torch.device("cpu"))
    marks = step_breakdown._StepMarks(model, clock)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    blocks = len(step_breakdown.moe_blocks(model))
    assert blocks == model.config.num_hidden_layers
    assert len(marks.moe_fwd) == blocks and len(marks.moe_bwd) == blocks
    assert all(end is not None for _, end in marks.moe_bwd)
    assert "decoder_bwd_start" in marks.marks
    marks.remove()


def test_main_writes_rows_and_records_a_failed_system(tmp_path):
    out = tmp_path / "b.json"
    step_breakdown.main(["--model", "tiny-qwen3-moe", "--layers", "1", "--seq", "16", "--systems", "torch,nope",
                         "--device", "cpu", "--warmup", "1", "--steps", "1", "--dtype", "fp32", "--out", str(out)])
    record = json.loads(out.read_text())
    assert [r["status"] for r in record["rows"]] == ["ok", "failed"]  # a name moe_lab does not know, with the reason
    assert "moe_lab has no backend 'nope'" in record["rows"][1]["error"]
    assert "provenance" in record and "| torch |" in record["table"]


def test_report_renders_breakdowns(tmp_path):
    from experiments import report

    run = tmp_path / "runs" / "cpu-breakdown"
    step_breakdown.main(["--model", "tiny-qwen3-moe", "--layers", "1", "--seq", "16", "--systems", "torch",
                         "--device", "cpu", "--warmup", "1", "--steps", "1", "--dtype", "fp32",
                         "--out", str(run / "breakdown.json")])
    text = report.breakdown_markdown(tmp_path / "runs")
    assert "## cpu-breakdown: tiny-qwen3-moe, 1 layers" in text and "| torch | real |" in text
    assert report.breakdown_markdown(tmp_path / "nothing") is None


def test_profile_lists_kernels_by_class():
    spec = cell.normalise({"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "system": "v5-grouped_mm",
                           "device": "cpu", "warmup": 1, "steps": 1, "dtype": "fp32"})
    row = step_breakdown.breakdown_system(spec, profile=True)
    names = [k["name"] for k in row["kernels"]]
    assert any("mm" in n for n in names) and row["kernel_total_ms"] > 0
    assert row["kernels"] == sorted(row["kernels"], key=lambda k: -k["ms"])
    assert sum(row["kernel_classes"].values()) == pytest.approx(row["kernel_total_ms"])
    # ops' own times: nested events (autograd nodes holding ATen ops) are not counted twice
    assert row["kernel_total_ms"] <= row["profiled_step_ms"]
    assert kernel_profile.kernel_class("void flash_fwd_kernel<...>") == "attention"
    assert kernel_profile.kernel_class("nvjet_tst_128x256") == "gemm"
    assert kernel_profile.kernel_class("at::native::vectorized_elementwise_kernel<4>") == "elementwise"
