"""The report's figures (experiments/figures.py): one GPU per figure (CPU runs never beside GPU bars),
the four headline bars chosen as documented, the MoE block and EP scaling per GPU and model, at
most 1600 px wide, the same bytes from the same rows, and the committed PNGs are the ones the
committed runs give."""
import struct
from pathlib import Path

import pytest

from experiments import figures, report

pytest.importorskip("matplotlib")


def _record(system, tps, *, gpu="h200", gpu_name="NVIDIA H200", model="qwen3-30b-a3b-L8", batch=1, nproc=1,
            routing="real", optimizer="adamw_fused", peak=40.0, commit="c1", status="ok", env=None):
    return {"status": status, "cell_id": f"{system}-{routing}-{batch}-{nproc}", "model_label": model,
            "spec": {"system": system, "routing": routing, "batch": batch, "seq": 4096, "dtype": "bf16",
                     "optimizer": optimizer, "nproc": nproc, "ckpt": False, "steps": 10},
            "metrics": {"tokens_per_s_per_gpu": tps, "peak_gib": peak, "step_ms": 1.0},
            "hardware": {"gpu": gpu, "gpu_name": gpu_name}, "versions": {}, "git": {"commit": commit},
            "env": env or {}}


def _rows(records_by_run: dict) -> list[dict]:
    rows = []
    for run, recs in records_by_run.items():
        rows += [report.to_row(rec, run, report.env_flags(rec["env"])) for rec in recs]
    report.add_speedups(rows)
    return rows


def _order(rows):
    return sorted(rows, key=lambda r: (r["commit"], r["run"]))  # commits named in measurement order here


GPU_RUN = [_record("v5-eager", 4000.0), _record("v5-grouped_mm", 32000.0), _record("torch", 34000.0),
           _record("triton", 36000.0), _record("triton-fusedce", 50000.0, optimizer="adamw_triton"),
           _record("triton-graphs", 99000.0, env={"MOE_LAB_TRITON_TMA": "1"}),  # a flag: stands for no system
           _record("v5-grouped_mm", 46000.0, batch=6), _record("triton", 70000.0, batch=6),
           _record("v5-fsdp2-grouped_mm", 24000.0, nproc=2), _record("ep2-all2all-triton-fsdp", 30000.0, nproc=2),
           _record("ep2-deepep-te-cutlass", 20000.0, nproc=2)]
CPU_RUN = [_record(s, t, gpu="cpu", gpu_name="x86_64", model="tiny-qwen3-moe-L2", optimizer="adamw", peak=None)
           for s, t in (("v5-eager", 100.0), ("v5-grouped_mm", 300.0), ("eager", 90.0), ("torch", 310.0))]


def test_headline_per_gpu_and_model_never_mixes_cpu_and_gpu():
    rows = _rows({"gpu-a": GPU_RUN, "cpu-small": CPU_RUN})
    entries = {(e["gpu"], e["model"]): e for e in figures.headline_data(rows, _order)}
    assert set(entries) == {("h200", "qwen3-30b-a3b-L8"), ("cpu", "tiny-qwen3-moe-L2")}
    gpu, cpu = entries[("h200", "qwen3-30b-a3b-L8")], entries[("cpu", "tiny-qwen3-moe-L2")]
    assert {r["gpu"] for _, r in gpu["bars"]} == {"h200"} and {r["gpu"] for _, r in cpu["bars"]} == {"cpu"}
    # batch 1 has all four; the flagged graphs row is faster but stands for no system
    assert gpu["shape"] == (1, 4096, "bf16")
    assert [r["system"] for _, r in gpu["bars"]] == ["v5-eager", "v5-grouped_mm", "torch", "triton-fusedce"]
    assert [r["system"] for _, r in cpu["bars"]] == ["v5-eager", "v5-grouped_mm", "torch", "torch"]


def test_each_bar_is_the_latest_measurement_of_its_system():
    later = [_record("v5-grouped_mm", 31000.0, commit="c2"), _record("torch", 35000.0, commit="c2")]
    rows = _rows({"z-old": GPU_RUN, "a-new": later})  # run names sort the other way round
    (entry,) = [e for e in figures.headline_data(rows, _order) if e["gpu"] == "h200"]
    bars = dict((role.split("\n")[0], r) for role, r in entry["bars"])
    assert (bars["v5 grouped_mm"]["run"], bars["v5 grouped_mm"]["tokens_per_s_per_gpu"]) == ("a-new", 31000.0)
    assert bars["moe_lab default"]["run"] == "a-new"


def test_two_gpu_models_with_one_short_name_get_their_own_figures():
    other = [_record(s, t, gpu_name="NVIDIA H100 PCIe", gpu="h100") for s, t in (("v5-grouped_mm", 1.0), ("torch", 2.0))]
    sxm = [_record(s, t, gpu_name="NVIDIA H100 80GB HBM3", gpu="h100") for s, t in (("v5-grouped_mm", 1.0), ("torch", 3.0))]
    groups = figures.gpu_groups(_rows({"p": other, "s": sxm}))
    assert sorted(groups) == [("h100-nvidia-h100-80gb-hbm3", "NVIDIA H100 80GB HBM3"), ("h100-nvidia-h100-pcie", "NVIDIA H100 PCIe")]


def test_ep_scaling_sections_and_their_single_gpu_counterparts():
    assert figures.single_gpu_counterpart("ep8-deepep-triton_gather-fusedce-fsdp") == "triton_gather-fusedce"
    assert figures.single_gpu_counterpart("v5-ep") == "v5-grouped_mm"
    assert figures.single_gpu_counterpart("triton") is None
    (entry,) = figures.ep_data(_rows({"gpu-a": GPU_RUN, "cpu-small": CPU_RUN}), _order)
    one, two = entry["sections"]
    assert one["gpus"] == 1 and [r["system"] for r in one["bars"]] == ["v5-grouped_mm", "triton"]
    assert [r["system"] for r in two["bars"]] == ["v5-fsdp2-grouped_mm", "ep2-all2all-triton-fsdp", "ep2-deepep-te-cutlass"]
    assert one["baseline"]["system"] == "v5-grouped_mm" and two["baseline"]["system"] == "v5-fsdp2-grouped_mm"


def _block_row(system, ms, routing="real", gpu="h200", gpu_name="NVIDIA H200", flags=None, run="b"):
    key = f"{gpu}x1/moe-block/m/{system}{'' if routing == 'real' else '@' + routing}{report._flag_suffix(flags)}"
    return {"system": system, "routing": routing, "status": "ok", "ms": ms, "ms_forward": ms / 3, "tflops": 1.0,
            "activation_gib": 0.1 if "graphs" not in system else None, "tokens": 4096, "model": "m", "run": run,
            "gpu": gpu, "gpu_name": gpu_name, "flags": flags or {}, "key": key, "commit": "c1"}


def test_block_figure_data_per_gpu_v5_first_then_slowest_to_fastest():
    blocks = [_block_row("triton", 2.8), _block_row("v5-grouped_mm", 5.4), _block_row("torch", 4.5),
              _block_row("v5-eager", 210.0), _block_row("triton", 2.0, flags={"MOE_LAB_TRITON_TMA": "1"}),
              _block_row("triton", 3.1, routing="skewed"), _block_row("torch", 9.0, gpu="cpu", gpu_name="x86_64")]
    entries = {e["gpu"]: e for e in figures.block_data(blocks, _order)}
    assert set(entries) == {"h200", "cpu"}
    h200 = entries["h200"]
    assert h200["systems"] == ["v5-eager", "v5-grouped_mm", "torch", "triton"]
    assert h200["cells"][("triton", "real")]["ms"] == 2.8  # the flagged run is left out
    assert set(h200["cells"]) == {("triton", "real"), ("v5-grouped_mm", "real"), ("torch", "real"), ("v5-eager", "real"),
                                  ("triton", "skewed")}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figures_are_page_width_deterministic_and_replace_stale_ones(tmp_path):
    rows = _rows({"gpu-a": GPU_RUN, "cpu-small": CPU_RUN})
    blocks = [_block_row("v5-grouped_mm", 5.4), _block_row("triton", 2.8), _block_row("triton-graphs", 2.7),
              _block_row("v5-eager", 210.0), _block_row("triton", 3.1, routing="skewed")]
    (tmp_path / "throughput.png").write_bytes(b"old strip plot")
    (tmp_path / "headline-a100-gone.png").write_bytes(b"a GPU no run has any more")
    (tmp_path / "mine.png").write_bytes(b"not ours")
    written = report.plots(rows, tmp_path, blocks)
    names = sorted(p.name for p in written)
    assert names == ["ep-scaling-h200-qwen3-30b-a3b-L8.png", "headline-cpu-tiny-qwen3-moe-L2.png",
                     "headline-h200-qwen3-30b-a3b-L8.png", "moe-block-h200-m.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(names + ["mine.png"])
    first = {p.name: p.read_bytes() for p in written}
    for p in written:
        width, height = _png_size(p)
        assert 800 <= width <= figures.MAX_WIDTH_PX and height <= 1400, (p.name, width, height)
    again = report.plots(rows, tmp_path, blocks)
    assert {p.name: p.read_bytes() for p in again} == first


def test_the_committed_figures_are_those_of_the_committed_runs(tmp_path):
    committed = report.COMMITTED / "report"
    runs = report.COMMITTED / "runs"
    written = report.plots(report.collect_rows(report.find_runs(runs)), tmp_path, report.block_rows(runs))
    assert written, "no figure from the committed runs"
    assert sorted(p.name for p in written) == sorted(p.name for p in committed.glob("*.png"))
    for p in committed.glob("*.png"):
        assert _png_size(p)[0] <= figures.MAX_WIDTH_PX
