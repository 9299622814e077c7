"""A transparent performance model of expert parallelism (issue 24, item 4).

From measured one-GPU times of a training step's parts and the all-to-all bandwidth, predict the
step time and tokens/s/GPU at EP = 1, 2, 4, 8 and at the published 8xH100 setup (NeMo AutoModel,
Qwen3-30B-A3B, 48 layers, EP 8), with no overlap (compute and communication one after the other)
and with perfect overlap (per layer and direction, the larger of the two).

    python -m experiments.ep_model                      # inputs.yaml -> table.md + prediction.json
    python -m experiments.ep_model --extract            # rebuild inputs.yaml from the committed runs
    python -m experiments.ep_model --check results/runs/h200x2-3   # prediction vs a measured EP run

The model, for one rank (times in ms, bytes in B, bandwidths in GB/s = 1e9 B/s):
- A "unit" is one decoder layer, or the LM head + loss. Each has compute and communication, forward
  and backward. Step = grad_accum x micro-batch + optimizer; serial adds compute and communication,
  overlap takes max(compute, communication) per unit and direction.
- Compute per layer = the one-GPU breakdown's parts (attention/norms/rest, and the MoE block split into
  router / permutation / experts / combine by the kernel profile's shares), times the micro-batch size
  in sequences (linear in tokens: assumed), times the GPU's compute factor. Under EP the experts stage
  runs on the rows the busiest rank receives (imbalance x the mean: T*k rows), and the rows received
  are reordered by local expert and back (EP_EXTRA_COPIES passes of [T*k, H] bf16 at the copy bandwidth).
- Communication per layer: dispatch and combine move rows_per_token x T x H x 2 B per rank each way,
  forward and again backward; all2all sends one row per (token, remote expert): k (EP-1)/EP rows a
  token; DeepEP one per (token, remote rank). The busiest rank's receive sets the time (x imbalance).
  Non-expert parameters: without FSDP their gradients are all-reduced once per step (2(n-1)/n x bytes);
  with FSDP each unit's are all-gathered forward and backward and reduce-scattered ((n-1)/n x bytes).
- Optimizer = one-GPU optimizer time x local parameters / one-GPU parameters x the GPU's memory factor
  (experts shrink by EP, non-expert parameters by the FSDP degree).
Every input number lives in inputs.yaml with its source (a committed run file, or "assumed: ...").
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import yaml

from experiments import provenance, store

ROOT = provenance.REPO_ROOT
INPUTS = ROOT / "results" / "ep-model" / "inputs.yaml"
OUT = ROOT / "results" / "ep-model"
STAGES = ("router", "permutation", "experts", "combine", "other")
CHECK_TOLERANCE = 0.15  # |predicted / measured - 1| allowed by --check

# Which MoE stage (and direction) each profiled kernel's calls belong to, in call order: the
# forward gathers rows by expert (permutation) and its backward scatter-adds them (a reduce); the
# combine reduces forward and gathers backward; the 3 cuBLAS GEMMs are the router's (1 fwd, 2 bwd).
KERNEL_STAGES = {
    "_router_fwd_kernel": [("router", "fwd")], "_router_bwd_kernel": [("router", "bwd")],
    "_chunk_hist_kernel": [("permutation", "fwd")], "_chunk_bases_kernel": [("permutation", "fwd")],
    "_chunk_scatter_kernel": [("permutation", "fwd")],
    "_gather_kernel": [("permutation", "fwd"), ("combine", "bwd")],
    "_reduce_kernel": [("combine", "fwd"), ("permutation", "bwd")],
    "_combine_dw_kernel": [("combine", "bwd")],
    "_gate_up_act_kernel": [("experts", "fwd")], "_grouped_mm_kernel": [("experts", "fwd"), ("experts", "bwd")],
    "_down_bwd_act_kernel": [("experts", "bwd")], "_grouped_mm_dw_kernel": [("experts", "bwd")],
}
EP_EXTRA_COPIES = 4  # all2all's reorder of received rows: received[order], y[inverse], and their backward


def v(x):
    """The number of an input entry ({value, source} or a bare number)."""
    return x["value"] if isinstance(x, dict) else x


def src(x) -> str:
    """The source of an input entry ("" for a bare number)."""
    return x.get("source", "") if isinstance(x, dict) else ""


def _rel(path) -> str:
    return str(Path(path).resolve().relative_to(ROOT))


# ---- extraction: inputs.yaml from the committed run files ---------------------------------------

def _breakdown_row(path: Path, system: str) -> dict:
    for row in store.read_json(path)["rows"]:
        if row["system"] == system and row["routing"] == "real" and row["status"] == "ok":
            return row
    raise KeyError(f"{path}: no ok real-routing row of system {system!r}")


def stage_shares(block_json: Path, system: str = "triton") -> dict:
    """{fwd|bwd: {stage: share of that direction's profiled kernel time}} from a block profile."""
    row = next(r for r in store.read_json(block_json)["rows"]
               if r["system"] == system and r["routing"] == "real" and r.get("profile"))
    ms = {d: dict.fromkeys(STAGES, 0.0) for d in ("fwd", "bwd")}
    for k in row["profile"]["kernels"]:
        calls = KERNEL_STAGES.get(k["name"])
        if calls is None and k["class"] == "gemm":  # the router's cuBLAS GEMMs: 1 fwd, 2 bwd
            ms["fwd"]["router"] += k["ms"] / 3
            ms["bwd"]["router"] += 2 * k["ms"] / 3
        elif calls is None:  # small torch kernels (adds, casts, asserts)
            ms["fwd"]["other"] += k["ms"] / 2
            ms["bwd"]["other"] += k["ms"] / 2
        else:
            for stage, d in calls:
                ms[d][stage] += k["ms"] / len(calls)
    return {d: {s: t / sum(ms[d].values()) for s, t in ms[d].items()} for d in ms}


def routing_stats(trace_path: Path | None, experts: int, k: int, eps=(2, 4, 8)) -> dict:
    """{ep: {"imbalance": busiest rank's rows / mean, "ranks_per_token": remote ranks a token visits}}.

    Rank r owns experts [r E/EP, (r+1) E/EP). With no trace: uniform routing (imbalance 1, remote
    ranks (EP-1)(1 - C(E - E/EP, k) / C(E, k)))."""
    out = {}
    if trace_path is None:
        for ep in eps:
            miss = math.comb(experts - experts // ep, k) / math.comb(experts, k)
            out[ep] = {"imbalance": 1.0, "ranks_per_token": (ep - 1) * (1 - miss)}
        return out
    from safetensors import safe_open  # the trace format (moe_lab.analysis)
    with safe_open(str(trace_path), "pt") as f:
        ids = [f.get_tensor(key).long() for key in sorted(f.keys()) if key.endswith(".ids")]
    for ep in eps:
        imb, ranks = [], []
        for t in ids:  # [T, k] of one layer and step
            rank = t // (experts // ep)
            load = rank.flatten().bincount(minlength=ep).double()
            imb.append(float(load.max() / load.mean()))
            hit = (rank[:, :, None] == rank.new_tensor(range(ep))).any(1).sum(1).double()
            ranks.append(float(hit.mean()) * (ep - 1) / ep)  # the source rank is any of the ep, uniformly
        out[ep] = {"imbalance": sum(imb) / len(imb), "ranks_per_token": sum(ranks) / len(ranks)}
    return out


def skewed_stats(experts: int, k: int, tokens: int, layers: int, eps=(2, 4, 8)) -> dict:
    """routing_stats for the harness's own `skewed` regime (experiments.regimes, seed 0), per layer."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from experiments import regimes
    ids = {}
    for layer in range(layers):
        hook = regimes.RegimeHook("skewed", layer, seed=0)
        ids[f"l{layer:03d}.ids"] = hook.ids(tokens, k, experts, "cpu").to(torch.int16)
    with tempfile.TemporaryDirectory() as d:
        save_file(ids, f"{d}/skewed.safetensors")
        return routing_stats(Path(d) / "skewed.safetensors", experts, k, eps)


def param_counts(g: dict) -> dict:
    """{"expert", "layer_non_expert", "head_embed"} parameter counts of a Qwen3-MoE geometry (per layer
    for the first two; norms included)."""
    H, hd = g["hidden"], g["head_dim"]
    attn = H * g["heads"] * hd * 2 + H * g["kv_heads"] * hd * 2 + 2 * hd + 2 * H
    return {"expert": g["experts"] * 3 * H * g["expert_width"],
            "layer_non_expert": attn + g["experts"] * H,
            "head_embed": g["vocab"] * H * (1 if g.get("tied_embeddings") else 2) + H}


def _src(value, source):
    return {"value": value, "source": source}


def extract(root: Path = ROOT) -> dict:
    """Rebuild every input from the committed run files (and the stated assumptions)."""
    runs = root / "results" / "runs"
    geometry_src = "experiments/models.py (Qwen3-30B-A3B config) as recorded by results/runs/h200x2-3 cells"
    geometry = {"hidden": 2048, "experts": 128, "top_k": 8, "expert_width": 768, "heads": 32, "kv_heads": 4,
                "head_dim": 128, "vocab": 151936, "tied_embeddings": False, "seq": 4096, "bytes_per_element": 2}
    baselines = {}
    for name, run, system, note in (
            ("triton", "h200x1-breakdown", "triton",
             "the configuration of h200x2-3's ep2-*-triton cells (commit a93c99d, fused AdamW)"),
            ("best", "h200x1-breakdown-5", "triton_gather-fusedce-fusednorm:adamw_triton",
             "the fastest broken-down step (fused loss, fused norms, Triton AdamW; commit 4d73b7a)")):
        path = runs / run / "breakdown.json"
        row, doc = _breakdown_row(path, system), store.read_json(path)
        p, layers, src = row["parts_ms"], doc["layers"], f"{_rel(path)}: row {system}, real"
        parts = sum(p.values())
        baselines[name] = {
            "note": note, "layers": layers,
            "non_moe_fwd_ms": _src(p["fwd_decoder_rest"] / layers, src + ": fwd_decoder_rest / layers"),
            "non_moe_bwd_ms": _src(p["bwd_decoder_rest"] / layers, src + ": bwd_decoder_rest / layers"),
            "moe_fwd_ms": _src(p["fwd_moe"] / layers, src + ": fwd_moe / layers"),
            "moe_bwd_ms": _src(p["bwd_moe"] / layers, src + ": bwd_moe / layers"),
            "head_loss_fwd_ms": _src(p["fwd_head_loss"], src + ": fwd_head_loss"),
            "head_loss_bwd_ms": _src(p["bwd_head_loss"], src + ": bwd_head_loss"),
            "optimizer_ms": _src(p["optimizer"], src + ": optimizer"),
            "other_ms": _src(row["step_ms"] - parts, src + ": step_ms - sum of parts (zero_grad, gaps)"),
        }
    block = runs / "h200x1-block-11" / "block.json"
    shares = stage_shares(block)
    trace = root / "results" / "traces" / "h200x1-qwen3-30b-a3b.safetensors"
    E, k = geometry["experts"], geometry["top_k"]
    routing = {"uniform": {"source": "computed: uniform routing (hypergeometric remote ranks)",
                           "by_ep": routing_stats(None, E, k)},
               "real": {"source": f"computed from {_rel(trace)} (8 layers x 3 steps, one GPU, 4096 tokens)",
                        "by_ep": routing_stats(trace, E, k)},
               "skewed": {"source": "computed from experiments.regimes skewed (Zipf 1.2, seed 0, 8 layers, 4096 tokens)",
                          "by_ep": skewed_stats(E, k, geometry["seq"], 8)}}
    cell = lambda run, sys_: store.read_json(glob.glob(str(runs / run / "cells" / f"*__{sys_}__real__*.json"))[0])
    h100, h200 = cell("h100x1-check-1", "v5-grouped_mm"), cell("h200x1-options", "v5-grouped_mm")
    return {
        "geometry": {"value": geometry, "source": geometry_src},
        "baselines": baselines,
        "moe_stage_shares": {"value": shares, "source": f"{_rel(block)}: profile of triton, real (kernel ms by "
                             "stage via experiments.ep_model.KERNEL_STAGES); commit 85f0574, shares only"},
        "routing": routing,
        "bandwidth_GBps": {
            "all2all": _src(246.0, "assumed: NCCL all_to_all_single per rank, 2 H200 NVLink, as issue 24 states "
                            "it measured; no committed run file holds this measurement"),
            "deepep_dispatch": _src(174.0, "assumed: DeepEP dispatch per rank, 2 H200, as issue 24 states; "
                                    "not in a committed run file"),
            "deepep_combine": _src(215.0, "assumed: DeepEP combine per rank, 2 H200, as issue 24 states; "
                                   "not in a committed run file"),
            "collective": _src(246.0, "assumed: NCCL all-reduce / all-gather / reduce-scatter bus bandwidth per "
                               "rank = the all-to-all's (same NVLink)"),
            "ep_4_8_note": "assumed: EP 4 and 8 keep the EP=2 per-rank rates (NVSwitch gives each GPU 450 GB/s "
                           "per direction whatever the peer count; HGX H100/H200 both NVLink 4)",
            "copy": _src(2500.0, "assumed: on-GPU row reorder (torch indexing) at ~half of the H200's 4.8 TB/s; the "
                         "Triton gather kernel measured 2.36 TB/s (results/NOTES.md, kernels)"),
        },
        "gpus": {
            "h200": {"compute_factor": _src(1.0, "reference: the baselines ran on one H200"),
                     "memory_factor": _src(1.0, "reference")},
            "h100": {"compute_factor": _src(round(h100["metrics"]["step_ms"] / h200["metrics"]["step_ms"], 4),
                                            "v5-grouped_mm step ms: results/runs/h100x1-check-1 / results/runs/"
                                            "h200x1-options (same transformers 5.17, torch 2.11)"),
                     "memory_factor": _src(round(4.8 / 3.35, 4), "assumed: HBM bandwidth H200 4.8 / H100 3.35 TB/s "
                                           "(datasheets); the optimizer is bandwidth-bound")},
        },
        "published": {
            "source": "https://docs.nvidia.com/nemo/automodel/latest/performance-summary.html (Qwen3 MoE 30B: 8 "
                      "H100, GBS 512, MBS 4, GA 16, seq 4096, EP 8, FSDP 8, TE + DeepEP, 21.773 s/step, 12,040 "
                      "tokens/s/GPU); 11,340 from NVIDIA's Transformers v5 fine-tuning blog (8xH100)",
            "tokens_per_s_per_gpu": [11340, 12040],
        },
        "scenarios": _scenarios(),
    }


def _scenarios() -> list[dict]:
    """The table's rows: (baseline x EP x dispatcher x routing) on H200 at 8 layers, and the published setup."""
    rows = []
    for base in ("triton", "best"):
        rows.append(dict(name=f"{base} EP1", baseline=base, ep=1))
        for ep in (2, 4, 8):
            for disp in ("all2all", "deepep"):
                rows.append(dict(name=f"{base} EP{ep} {disp}", baseline=base, ep=ep, dispatcher=disp))
        if base == "triton":
            for ep in (2, 4, 8):
                rows.append(dict(name=f"{base} EP{ep} all2all, real routing", baseline=base, ep=ep, routing="real"))
            rows.append(dict(name=f"{base} EP8 all2all, skewed routing", baseline=base, ep=8, routing="skewed"))
        rows.append(dict(name=f"{base} published setup: 48 layers, 8xH100, EP8, FSDP8, 4x4096 x GA16, deepep",
                         baseline=base, ep=8, dispatcher="deepep", layers=48, gpu="h100", micro_batch=4,
                         grad_accum=16, fsdp=8, published=True))
    return rows


# ---- the model -----------------------------------------------------------------------------------

def predict_one(inp: dict, sc: dict) -> dict:
    """One scenario -> times in ms and tokens/s/GPU (serial and perfect overlap)."""
    g, b = v(inp["geometry"]), inp["baselines"][sc["baseline"]]
    ep, disp = sc.get("ep", 1), sc.get("dispatcher", "all2all")
    layers, mb, ga, fsdp = sc.get("layers", b["layers"]), sc.get("micro_batch", 1), sc.get("grad_accum", 1), sc.get("fsdp", 1)
    gpu, bw = inp["gpus"][sc.get("gpu", "h200")], inp["bandwidth_GBps"]
    cf, mf = v(gpu["compute_factor"]), v(gpu["memory_factor"])
    stats = inp["routing"][sc.get("routing", "uniform")]["by_ep"]
    st = stats.get(ep, stats.get(str(ep))) if ep > 1 else {"imbalance": 1.0, "ranks_per_token": 0.0}
    imb = st["imbalance"]
    tokens = g["seq"] * mb
    row_bytes = g["hidden"] * g["bytes_per_element"]
    shares = v(inp["moe_stage_shares"])

    # compute per layer (ms)
    moe = {d: {s: v(b[f"moe_{d}_ms"]) * shares[d][s] * mb * cf for s in STAGES} for d in ("fwd", "bwd")}
    for d in moe:
        moe[d]["experts"] *= imb if ep > 1 else 1.0
    extra = 0.0
    if ep > 1 and disp == "all2all":  # reorder of the received rows by local expert, and back
        extra = EP_EXTRA_COPIES * 2 * tokens * g["top_k"] * imb * row_bytes / (v(bw["copy"]) * 1e9) * 1e3
    comp_f = v(b["non_moe_fwd_ms"]) * mb * cf + sum(moe["fwd"].values()) + extra / 2
    comp_b = v(b["non_moe_bwd_ms"]) * mb * cf + sum(moe["bwd"].values()) + extra / 2

    # communication per layer (ms): dispatch + combine forward, their transposes backward
    if ep == 1:
        a2a = 0.0
        a2a_bytes = 0.0
    else:
        rows = g["top_k"] * (ep - 1) / ep if disp == "all2all" else st["ranks_per_token"]
        a2a_bytes = tokens * rows * row_bytes * imb
        if disp == "all2all":
            a2a = 2 * a2a_bytes / (v(bw["all2all"]) * 1e9) * 1e3
        else:
            a2a = a2a_bytes / (v(bw["deepep_dispatch"]) * 1e9) * 1e3 + a2a_bytes / (v(bw["deepep_combine"]) * 1e9) * 1e3
    pc = param_counts(g)
    nbytes = g["bytes_per_element"]
    coll = lambda params, factor: factor * params * nbytes / (v(bw["collective"]) * 1e9) * 1e3
    n = ep * sc.get("dp", 1) if fsdp == 1 else fsdp  # ranks holding copies of the non-expert parameters
    if fsdp > 1:  # FSDP: all-gather forward and backward, reduce-scatter backward, every micro-batch
        f_ = (fsdp - 1) / fsdp
        fs_layer_f, fs_layer_b = coll(pc["layer_non_expert"], f_), 2 * coll(pc["layer_non_expert"], f_)
        fs_head_f, fs_head_b = coll(pc["head_embed"], f_), 2 * coll(pc["head_embed"], f_)
        ar_layer = ar_head = 0.0
    else:  # replicated: one all-reduce of the gradients per step (none at one GPU)
        fs_layer_f = fs_layer_b = fs_head_f = fs_head_b = 0.0
        f_ = 2 * (n - 1) / n
        ar_layer, ar_head = coll(pc["layer_non_expert"], f_), coll(pc["head_embed"], f_)
    comm_f, comm_b = a2a + fs_layer_f, a2a + fs_layer_b

    head_f = v(b["head_loss_fwd_ms"]) * mb * cf
    head_b = v(b["head_loss_bwd_ms"]) * mb * cf

    def micro(last: bool, overlap: bool) -> float:
        red_l, red_h = (ar_layer, ar_head) if last else (0.0, 0.0)
        units = [(comp_f, comm_f), (comp_b, comm_b + red_l)] * layers + [(head_f, fs_head_f), (head_b, fs_head_b + red_h)]
        return sum(max(c, m) if overlap else c + m for c, m in units)

    local_params = layers * (pc["expert"] / ep + pc["layer_non_expert"] / fsdp) + pc["head_embed"] / fsdp
    base_params = b["layers"] * (pc["expert"] + pc["layer_non_expert"]) + pc["head_embed"]
    opt = v(b["optimizer_ms"]) * local_params / base_params * mf
    other = v(b["other_ms"])
    out = {"scenario": sc, "tokens_per_gpu_step": tokens * ga, "optimizer_ms": opt,
           "compute_ms": ga * ((comp_f + comp_b) * layers + head_f + head_b) + opt + other,
           "comm_ms": ga * ((comm_f + comm_b) * layers + fs_head_f + fs_head_b) + layers * ar_layer + ar_head,
           "a2a_bytes_per_rank_layer_direction": a2a_bytes, "local_params": local_params}
    for mode, ov in (("serial", False), ("overlap", True)):
        step = (ga - 1) * micro(False, ov) + micro(True, ov) + opt + other
        out[f"step_ms_{mode}"] = step
        out[f"tokens_per_s_per_gpu_{mode}"] = tokens * ga / step * 1e3
    out["comm_share_serial"] = out["comm_ms"] / out["step_ms_serial"]
    return out


def predict(inp: dict) -> list[dict]:
    return [predict_one(inp, sc) for sc in inp["scenarios"]]


# ---- check against a measured run ------------------------------------------------------------------

def check(inp: dict, run_dir: Path, baseline: str | None = None) -> list[dict]:
    """Each ok cell of an EP run with a `triton` experts system -> predicted vs measured tokens/s/GPU.

    `baseline`: the one-GPU breakdown to start from (default: the first of inputs.yaml, `triton`: the
    same code and step options as h200x2-3's cells).
    The prediction uses the serial mode (the `all2all` and `deepep` dispatchers do not overlap their
    all-to-alls; `all2all_overlap`, which pipelines chunks of tokens, is bounded by the overlap mode
    and has not been measured on two GPUs yet) and the cell's routing (`real` from the committed trace, `skewed` from the harness's regime)."""
    baseline = baseline or next(iter(inp["baselines"]))
    out = []
    for path in sorted(glob.glob(str(Path(run_dir) / "cells" / "*.json"))):
        c = store.read_json(path)
        spec, system = c["spec"], c["spec"]["system"]
        parts = system.split("-")
        if c.get("status") != "ok" or not system.startswith("ep") or parts[2:] != ["triton"]:
            continue
        sc = dict(name=system, baseline=baseline, ep=int(parts[0][2:]), dispatcher=parts[1],
                  layers=spec["layers"], micro_batch=spec["batch"], routing=spec["routing"])
        p = predict_one(inp, sc)
        measured = c["metrics"]["tokens_per_s_per_gpu"]
        ratio = p["tokens_per_s_per_gpu_serial"] / measured
        out.append({"cell": Path(path).name, "system": system, "routing": spec["routing"], "commit": c["git"]["commit"][:7],
                    "measured_tokens_per_s_per_gpu": measured, "measured_step_ms": c["metrics"]["step_ms"],
                    "predicted_tokens_per_s_per_gpu": p["tokens_per_s_per_gpu_serial"],
                    "predicted_step_ms": p["step_ms_serial"], "ratio": ratio,
                    "within": abs(ratio - 1) <= CHECK_TOLERANCE})
    if not out:
        raise SystemExit(f"{run_dir}: no ok cell of an ep<N>-<dispatcher>-triton system to check")
    return out


# ---- output -------------------------------------------------------------------------------------

def table_md(inp: dict, rows: list[dict], checks: list[dict] | None, run_dir: str | None) -> str:
    f = lambda x: f"{x:,.0f}"
    lines = ["# Expert parallelism: predicted step time and tokens/s/GPU (`python -m experiments.ep_model`)", "",
             "Qwen3-30B-A3B geometry (hidden 2048, 128 experts, top-8, width 768), 4096 tokens per sequence, bf16. "
             "Rows without a note: 8 layers, one H200 per rank, batch 1 x 4096 per GPU, uniform routing, optimizer "
             "every step, non-expert parameters replicated (gradients all-reduced once per step). `serial`: no "
             "overlap; `overlap`: per layer and direction max(compute, communication). Inputs and their sources: "
             "`inputs.yaml`; the model: the docstring of `experiments/ep_model.py`.", "",
             "| scenario | step ms serial | tokens/s/GPU serial | step ms overlap | tokens/s/GPU overlap | comm share (serial) | optimizer ms | a2a MB / rank / layer / direction |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']['name']} | {r['step_ms_serial']:.1f} | {f(r['tokens_per_s_per_gpu_serial'])} | "
                     f"{r['step_ms_overlap']:.1f} | {f(r['tokens_per_s_per_gpu_overlap'])} | {r['comm_share_serial']:.1%} | "
                     f"{r['optimizer_ms']:.1f} | {r['a2a_bytes_per_rank_layer_direction'] / 1e6:.1f} |")
    pub = inp["published"]["tokens_per_s_per_gpu"]
    lines += ["", f"Published (NeMo AutoModel, 8xH100, EP 8, TE + DeepEP): {pub[0]:,}-{pub[1]:,} tokens/s/GPU "
              f"({inp['published']['source']})."]
    for r in rows:
        if r["scenario"].get("published"):
            lines.append(f"- `{r['scenario']['baseline']}` in that setup: serial / overlap = "
                         f"{r['tokens_per_s_per_gpu_serial'] / pub[1]:.2f} / {r['tokens_per_s_per_gpu_overlap'] / pub[1]:.2f} "
                         f"of {pub[1]:,}.")
    if checks:
        lines += ["", f"## Check against `{run_dir}` (serial prediction, baseline `{next(iter(inp['baselines']))}`; within {CHECK_TOLERANCE:.0%}?)", "",
                  "| cell system | routing | commit | measured tokens/s/GPU | predicted | predicted / measured | within |",
                  "|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['system']} | {c['routing']} | {c['commit']} | {f(c['measured_tokens_per_s_per_gpu'])} | "
                         f"{f(c['predicted_tokens_per_s_per_gpu'])} | {c['ratio']:.3f} | {'yes' if c['within'] else 'NO'} |")
        miss = [c for c in checks if not c["within"]]
        lines += ["", f"{len(checks) - len(miss)} of {len(checks)} cells within {CHECK_TOLERANCE:.0%}" + "".join(
            f"; {c['system']} {c['routing']} over-predicted by {c['ratio'] - 1:.1%}" if c["ratio"] > 1 else
            f"; {c['system']} {c['routing']} under-predicted by {1 - c['ratio']:.1%}" for c in miss)
            + ". What the misses mean: `results/ep-model/README.md`."]
    lines += ["", "## Inputs (per layer, one H200, batch 1 x 4096; ms)", "",
              "| baseline | non-MoE fwd / bwd | MoE fwd / bwd | LM head + loss fwd / bwd | optimizer | other | source |",
              "|---|---|---|---|---|---|---|"]
    for name, b in inp["baselines"].items():
        lines.append(f"| {name} | {v(b['non_moe_fwd_ms']):.2f} / {v(b['non_moe_bwd_ms']):.2f} | {v(b['moe_fwd_ms']):.2f} / "
                     f"{v(b['moe_bwd_ms']):.2f} | {v(b['head_loss_fwd_ms']):.1f} / {v(b['head_loss_bwd_ms']):.1f} | "
                     f"{v(b['optimizer_ms']):.1f} | {v(b['other_ms']):.1f} | `{src(b['optimizer_ms']).split(':')[0]}` |")
    sh = v(inp["moe_stage_shares"])
    lines += ["", "MoE stage shares (" + src(inp["moe_stage_shares"]) + "): " + "; ".join(
        f"{d} " + ", ".join(f"{s} {sh[d][s]:.0%}" for s in STAGES) for d in ("fwd", "bwd")), ""]
    lines += ["Routing (busiest rank's rows / mean; remote ranks a token visits, DeepEP): " + "; ".join(
        f"{name} " + ", ".join(f"EP{ep} {s['imbalance']:.2f} / {s['ranks_per_token']:.2f}" for ep, s in r["by_ep"].items())
        for name, r in inp["routing"].items()), ""]
    lines += ["Bandwidths and factors:"] + [
        f"- {k}: {v(x)} ({src(x)})" if isinstance(x, (dict, float, int)) else f"- {k}: {x}" for k, x in inp["bandwidth_GBps"].items()]
    for gname, gx in inp["gpus"].items():
        lines += [f"- {gname} {k}: {v(x)} ({src(x)})" for k, x in gx.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=Path, default=INPUTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--extract", action="store_true", help="rebuild --inputs from the committed run files first")
    ap.add_argument("--check", type=Path, metavar="RUN_DIR", help="compare with a measured EP run")
    a = ap.parse_args(argv)
    if a.extract:
        store.write_text(a.inputs, "# made by: python -m experiments.ep_model --extract (every number with its source)\n"
                         + yaml.safe_dump(extract(), sort_keys=False, width=200))
    inp = yaml.safe_load(a.inputs.read_text())
    rows = predict(inp)
    checks = check(inp, a.check) if a.check else None
    run_dir = _rel(a.check) if a.check and Path(a.check).resolve().is_relative_to(ROOT) else (str(a.check) if a.check else None)
    md = table_md(inp, rows, checks, run_dir)
    store.write_text(a.out / "table.md", md)
    store.write_json(a.out / "prediction.json", {"kind": "ep-model", "provenance": provenance.collect(argv),
                                                 "inputs": inp, "rows": rows, "check": checks, "check_run": run_dir})
    print(md)
    if checks is not None:
        for c in checks:
            print(f"check {c['system']} {c['routing']}: predicted {c['predicted_tokens_per_s_per_gpu']:,.0f} vs measured "
                  f"{c['measured_tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, ratio {c['ratio']:.3f}, "
                  f"{'within' if c['within'] else 'OUTSIDE'} {CHECK_TOLERANCE:.0%}")
        return 0 if all(c["within"] for c in checks) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
