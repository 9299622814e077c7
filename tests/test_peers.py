"""Peer systems (experiments/peers.py): listed as systems, recorded ``unavailable`` with the reason
when their package is missing or they cannot run the geometry, device or routing regime, with their
versions in every record; and v5 + Liger Kernel (as the Trainer applies it) trains the same model as
vanilla v5: the same loss and gradients on a tiny model (Liger's Triton kernels under the interpreter)."""
import copy
import json
import sys

import pytest
import torch

from experiments import block_bench, cell, peers, systems

TINY = {"model": "tiny-qwen3-moe", "layers": 1, "seq": 16, "device": "cpu", "warmup": 1, "steps": 1,
        "dtype": "fp32", "optimizer": "adamw"}


@pytest.mark.parametrize("name", peers.PEERS)
def test_peers_are_systems_with_one_name_and_a_mapping(name):
    spec = systems.check_known(name)
    assert spec.name == name and spec.kind == "peer" and spec.peer == name
    assert spec.as_mapping() == {"library": "peer", "peer": name} and systems.parse(spec.as_mapping()) == spec
    assert cell.normalise({**TINY, "system": name})["system"] == name
    assert set(spec.to_dict()["peer_versions"]) >= set(peers.DISTRIBUTIONS[name])
    with pytest.raises(ValueError, match="one GPU"):
        systems.check_world(name, 2)


@pytest.mark.parametrize("mapping", [{"library": "peer"}, {"library": "peer", "peer": "megablocks"},
                                     {"peer": "sonicmoe"}, {"library": "peer", "peer": "sonicmoe", "ep": 2}])
def test_malformed_peer_mappings_are_refused(mapping):
    with pytest.raises(ValueError, match="a peer system is"):
        systems.parse(mapping)


def _hide(monkeypatch, *modules):
    """Make ``import <module>`` fail here, as where the package is not installed."""
    for m in list(sys.modules):
        if m.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, m)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


@pytest.mark.parametrize("name,hidden,reason", [
    ("v5-liger", "liger_kernel", "cannot import liger_kernel.transformers"),
    ("nemo-automodel", "nemo_automodel", "cannot import nemo_automodel"),
    ("sonicmoe", "sonicmoe", "cannot import sonicmoe"),
])
def test_a_missing_peer_is_an_unavailable_cell_with_the_reason_and_versions(name, hidden, reason, monkeypatch, tmp_path):
    _hide(monkeypatch, hidden)
    out = tmp_path / "cell.json"
    assert cell.main(["--spec", json.dumps({**TINY, "system": name}), "--out", str(out)]) == 3
    record = json.loads(out.read_text())
    assert record["status"] == "unavailable", record["error"]
    assert reason in record["error"] and peers.INSTALL[name] in record["error"]
    assert record["system_spec"]["name"] == name and record["system_spec"]["kind"] == "peer"
    assert set(record["system_spec"]["peer_versions"]) >= set(peers.DISTRIBUTIONS[name])


def test_a_peer_that_cannot_run_a_geometry_or_regime_says_why():
    from tests.tiny_models import tiny_config

    assert peers.sonic_reason(tiny_config("qwen3_moe")) is None
    assert peers.sonic_reason(tiny_config("mixtral")) is None
    assert "gpt_oss" in peers.sonic_reason(tiny_config("gpt_oss"))
    assert "norm_topk_prob" in peers.sonic_reason(tiny_config("qwen3_moe", norm_topk_prob=False))
    with pytest.raises(peers.PeerUnavailable, match="'gpt_oss' is not a family"):
        peers.build_model("sonicmoe", tiny_config("gpt_oss"), dtype=torch.float32, attn="sdpa", device="cpu")
    for name in ("nemo-automodel", "sonicmoe"):
        with pytest.raises(peers.PeerUnavailable, match="real routing only"):
            peers.check_routing(name, "skewed")
    peers.check_routing("v5-liger", "skewed")  # v5's routers are still there: the regimes apply


def test_block_bench_records_unavailable_peers_with_reasons(monkeypatch, tmp_path):
    _hide(monkeypatch, "nemo_automodel", "sonicmoe")
    out = tmp_path / "block.json"
    assert block_bench.main(["--model", "tiny-qwen3-moe", "--tokens", "16", "--systems", "nemo-automodel,sonicmoe",
                             "--routing", "real,skewed", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["system"], r["routing"], r["status"]) for r in rows] == [
        ("nemo-automodel", "real", "unavailable"), ("sonicmoe", "real", "unavailable"),
        ("nemo-automodel", "skewed", "unavailable"), ("sonicmoe", "skewed", "unavailable")]
    assert "cannot import nemo_automodel" in rows[0]["error"] and "cannot import sonicmoe" in rows[1]["error"]
    assert all("real routing only" in r["error"] for r in rows[2:])
    assert all(r["peer"]["peer"] == r["system"] and "versions" in r["peer"] for r in rows)


def _one_autotune_config(monkeypatch):
    """Liger's fused-MoE kernels autotune over several tiles, which needs a GPU timer: keep one."""
    import triton.runtime.autotuner as autotuner

    import liger_kernel.ops.fused_moe as fused_moe

    for kernel in vars(fused_moe).values():
        if isinstance(kernel, autotuner.Autotuner):
            monkeypatch.setattr(kernel, "configs", kernel.configs[:1])


def test_v5_liger_trains_the_same_model_as_v5(monkeypatch):
    pytest.importorskip("liger_kernel.transformers", reason="liger-kernel not installed (pip install 'moe_lab[peers]')")
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    from tests.tiny_models import tiny_config

    _one_autotune_config(monkeypatch)
    config = tiny_config("qwen3_moe", layers=1)
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    original = (modeling_qwen3_moe.Qwen3MoeExperts, modeling_qwen3_moe.apply_rotary_pos_emb)
    with peers.scope("qwen3_moe"):
        torch.manual_seed(0)
        v5 = systems.build_model("v5-grouped_mm", config, dtype=torch.float32, attn="sdpa", device="cpu", world=1)
        torch.manual_seed(0)
        # Liger's RMSNorm kernel does not run under Triton's interpreter (a float `eps` has no .to());
        # the harness's v5-liger applies Liger's defaults, RMSNorm included (LIGER_KERNEL_CONFIG = None)
        liger = peers._build_liger(config, dtype=torch.float32, attn="sdpa", device="cpu",
                                   kernel_config={"rms_norm": False})
        assert liger.forward.__func__.__module__.startswith("liger_kernel.")  # fused linear cross-entropy
        assert modeling_qwen3_moe.Qwen3MoeExperts is not original[0]  # Liger's experts, as the Trainer gets them
        assert liger.peer_info["peer"] == "v5-liger" and liger.peer_info["versions"]["liger-kernel"]
        for model in (v5, liger):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        loss_v5 = v5(input_ids=ids, labels=ids, use_cache=False).loss
        loss_liger = liger(input_ids=ids, labels=ids, use_cache=False).loss
    assert (modeling_qwen3_moe.Qwen3MoeExperts, modeling_qwen3_moe.apply_rotary_pos_emb) == original  # restored
    torch.testing.assert_close(loss_liger, loss_v5, rtol=1e-5, atol=1e-6)
    grads_v5 = dict(v5.named_parameters())
    for name, p in liger.named_parameters():
        torch.testing.assert_close(p.grad, grads_v5[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_default_liger_config_is_the_trainers():
    assert peers.LIGER_KERNEL_CONFIG is None  # TrainingArguments.liger_kernel_config's default
    assert peers.settings("v5-liger")["liger_kernel_config"] is None
    assert copy.deepcopy(peers.NEMO_BACKEND)["attn"] == "te"


def _cell(system, kind, status="ok", tokens=None, error=None, versions=None):
    spec = {"system": system, "model": "qwen3-30b-a3b", "routing": "real", "seq": 4096, "batch": 1, "dtype": "bf16",
            "optimizer": "adamw_fused"}
    metrics = {"tokens_per_s_per_gpu": tokens, "step_ms": 4096e3 / tokens, "peak_gib": 30.0} if tokens else {}
    return {"cell_id": system, "status": status, "spec": spec, "metrics": metrics, "model_label": "qwen3-30b-a3b-L8",
            "hardware": {"gpu": "h100"}, "versions": {"transformers": "5.17.0"}, "git": {"commit": "abc"},
            "system_kind": kind, "system_spec": {"kind": kind, **({"peer_versions": versions} if versions else {})},
            **({"error": error} if error else {})}


def test_the_report_puts_peers_beside_v5_and_moe_lab_with_ratios_and_reasons(tmp_path):
    from experiments import cite, report

    records = [_cell("v5-grouped_mm", "v5", tokens=1000), _cell("v5-liger", "peer", tokens=1250, versions={"liger-kernel": "0.8.5"}),
               _cell("nemo-automodel", "peer", status="unavailable", error="nemo-automodel: cannot import nemo_automodel"),
               _cell("auto", "moe_lab", tokens=1500), _cell("triton-fusedce", "moe_lab", tokens=1800)]
    rows = [report.to_row(r, "h100x1-peers-step-1") for r in records]
    blocks = [{"run": "h100x1-block-peers", "model": "qwen3-30b-a3b", "tokens": 4096, "gpu": "h100", "routing": "real",
               "system": s, "status": st, "ms": ms, "tflops": 100.0, "commit": "abc", "transformers": "5.17.0", "torch": "2.11",
               "triton": "3.6", **({"peer": {"peer": s, "versions": {"sonic-moe": "x"}}} if s == "sonicmoe" else {}),
               **({"error": "sonicmoe: cannot import sonicmoe"} if st != "ok" else {})}
              for s, st, ms in (("v5-grouped_mm", "ok", 6.0), ("sonicmoe", "unavailable", None), ("auto", "ok", 3.0))]
    text = report.peers_markdown(rows, blocks)
    step_part, block_part = text.split("(MoE block)")
    line = {ln.split(" | ")[0].strip("| "): ln for ln in step_part.splitlines() if ln.startswith("| ")}
    assert "| 1.25x |" in line["v5-liger"] and "liger-kernel 0.8.5" in line["v5-liger"]
    assert "unavailable" in line["nemo-automodel"] and "cannot import nemo_automodel" in line["nemo-automodel"]
    assert "| 1.50x | 1.20x |" in line["auto"] and "| 1.80x | 1.44x |" in line["triton-fusedce"]
    assert "cannot import sonicmoe" in block_part and "| auto | ok | 3.000 | 100.0 | 2.00x |  |" in block_part
    assert report.peers_markdown(rows[:1], blocks[:1]) is None  # no peer anywhere: no file
    (tmp_path / "peers.md").write_text(text)
    assert {t.key for t in cite.tables(tmp_path)} == {"peers/h100x1-peers-step-1", "peers/h100x1-block-peers"}
