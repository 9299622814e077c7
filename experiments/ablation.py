"""Training-quality ablations: a small MoE trained from scratch on real text, one routing setting per cell.

    python -m experiments.ablation                                   # preset cpu-ablation (CPU, a few minutes) -> runs/cpu-ablation
    python -m experiments.ablation --preset h100x1-ablation --out $OUT/runs/h100x1-ablation --jobs 8
    python -m experiments.ablation --list                            # the cells of a preset
    python -m experiments.ablation --report runs/cpu-ablation         # table + curves of a run -> <run>/report/
    python -m experiments.ablation --report results/runs/X --results  # maintainers: -> results/report/ablation-X.md, ablation/X.png

Data: the Python standard library's own sources as bytes (``text_data.py``: no download, a
deterministic train / held-out split by file). Model: a tiny v5 Qwen3-MoE (softmax family) or
DeepSeek-V3 (sigmoid family, shared experts) from ``from_config`` with a byte vocabulary, run
through moe_lab; its routing options come from ``moe_lab.stages.balancing`` (score override,
DeepSeek-V3's aux-loss-free bias, v5's aux loss, capacity with dropping). Every cell with the same
seed starts from the same data order (step s reads the same bytes); model initialisation depends on
the seed and the geometry.

Per step the record keeps (columnar, ``samples``): loss (LM loss, without the aux term), aux loss,
step time and tokens/s (on CUDA from events at the step's first and last launch: the loop reads
nothing back between evaluations and checkpoints), and per MoE layer: max/mean expert load and coefficient of variation (of the
routed (token, slot) pairs, before dropping), dropped slots (fraction of T*k), router entropy (nats,
mean per token), the largest |bias|. Held-out loss every ``eval_every`` steps and at the end; a
routing trace (``moe_lab.analysis.trace``, with logits) at ``trace_steps``.

Sweep files (``experiments/ablations/*-ablation.yaml``, apart from the throughput sweeps; keys checked, unknown keys refused)::

    name: cpu-ablation
    description: one line
    defaults: {steps: 60, batch: 8, ...}     # cell keys (DEFAULTS below)
    settings:                                # one entry per routing setting; `name` labels it
      - {name: softmax-aux, balancing: aux_loss}
      - {name: sigmoid-auxfree, score: sigmoid, balancing: aux_free}
    seeds: [0, 1]                            # every setting runs with every seed
    cell_timeout_s: 600
    env: {OMP_NUM_THREADS: "1"}              # set (if unset) in each cell process

Robustness, as ``experiments.sweep``: each cell runs in its own process (``--in-process`` runs them
here: the notebook does), a failed, out-of-memory or timed-out cell is recorded with its status and
the sweep goes on; a rerun skips cells with a record (``--retry-failed`` reruns those not ok,
``--fresh`` all); SIGINT / SIGTERM kill the running cells, record them ``interrupted`` and the manifest
says so; every JSON is written atomically (``store.py``). ``--jobs N`` runs N isolated cells at once
(a model this small leaves a GPU mostly idle); the curves do not depend on it, tokens/s does, and the
records and the report say how many cells shared the device. ``checkpoint_every: N`` saves a cell's
training state (model, optimizer, balancing biases, the samples so far, the trace) every N steps
under ``<run>/state/``; a rerun of an interrupted or timed-out cell continues from it, so one cell
can span several calls of a time-limited machine (the record says ``resumed_from_step``).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

from . import provenance, store

log = logging.getLogger(__name__)

SWEEPS_DIR = Path(__file__).resolve().parent / "ablations"
DEFAULT_PRESET = "cpu-ablation"
FAMILIES = ("qwen3_moe", "deepseek_v3")
BALANCING = ("none", "aux_loss", "aux_free", "aux_loss+aux_free")
STATUSES = ("ok", "failed", "oom", "timeout", "interrupted")
DEFAULTS = {
    "name": None,  # the setting's label (required)
    "family": "qwen3_moe",
    "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
    "num_experts": 8, "top_k": 2, "expert_width": 64, "shared_experts": 0,
    "score": None,  # None: the family's (qwen3_moe softmax, deepseek_v3 sigmoid)
    "balancing": "none", "aux_loss_coef": 0.01, "bias_update_rate": 0.001,
    "capacity_factor": None, "capacity_priority": "slot",
    "batch": 8, "seq": 128, "steps": 100, "lr": 3.0e-3, "warmup_steps": 10, "weight_decay": 0.0, "grad_clip": 1.0,
    "eval_every": 0, "eval_batches": 4, "trace_steps": [], "trace_logits": True,
    "seed": 0, "device": "auto", "dtype": "fp32", "backend": "auto", "matmul_precision": "highest",
    "max_train_bytes": 4_000_000, "max_heldout_bytes": 400_000,
    "checkpoint_every": 0,  # save the cell's training state every N steps (0: never); a rerun resumes from it
    "fail_at": None,  # test hook: "build" / "step" raise there, "crash" exits without a record
}
NOT_HASHED = ("checkpoint_every",)  # keys that do not change what a cell computes (not in its id)
TOP_KEYS = ("name", "description", "defaults", "settings", "seeds", "cell_timeout_s", "env")


# ---- cell specs ----------------------------------------------------------------------------------
def _pos_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _nonneg_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _num(v, lo=0.0, strict=False):
    return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            and (v > lo if strict else v >= lo))


CHECKS = {
    "name": (lambda v: isinstance(v, str) and v and all(c.isalnum() or c in "-_.+" for c in v),
             "a label of letters, digits, - _ . +"),
    "family": (lambda v: v in FAMILIES, f"one of {FAMILIES}"),
    "layers": (_pos_int, "an integer >= 1"), "hidden": (_pos_int, "an integer >= 1"), "heads": (_pos_int, "an integer >= 1"),
    "kv_heads": (_pos_int, "an integer >= 1"), "head_dim": (_pos_int, "an integer >= 1"),
    "num_experts": (_pos_int, "an integer >= 1"), "top_k": (_pos_int, "an integer >= 1"),
    "expert_width": (_pos_int, "an integer >= 1"), "shared_experts": (_nonneg_int, "an integer >= 0"),
    "score": (lambda v: v in (None, "softmax", "sigmoid"), "null, softmax or sigmoid"),
    "balancing": (lambda v: v in BALANCING, f"one of {BALANCING}"),
    "aux_loss_coef": (_num, "a number >= 0"), "bias_update_rate": (_num, "a number >= 0"),
    "capacity_factor": (lambda v: v is None or _num(v, 0, strict=True), "null or a number > 0"),
    "capacity_priority": (lambda v: v in ("slot", "token"), "slot or token"),
    "batch": (_pos_int, "an integer >= 1"), "seq": (_pos_int, "an integer >= 1"), "steps": (_pos_int, "an integer >= 1"),
    "lr": (lambda v: _num(v, 0, strict=True), "a number > 0 (YAML: write 3.0e-3, not 3e-3)"),
    "warmup_steps": (_nonneg_int, "an integer >= 0"), "weight_decay": (_num, "a number >= 0"),
    "grad_clip": (_num, "a number >= 0 (0: no clipping)"),
    "eval_every": (_nonneg_int, "an integer >= 0 (0: only at the end)"), "eval_batches": (_pos_int, "an integer >= 1"),
    "trace_steps": (lambda v: isinstance(v, list) and all(_nonneg_int(s) for s in v), "a list of step indices"),
    "trace_logits": (lambda v: isinstance(v, bool), "true or false (keep the router logits in traces, float16)"),
    "seed": (_nonneg_int, "an integer >= 0"), "device": (lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    "dtype": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16"),
    "backend": (lambda v: isinstance(v, str) and v, "a moe_lab backend word (auto, torch, eager, triton, ...)"),
    "matmul_precision": (lambda v: v in ("highest", "high", "medium"), "highest, high or medium"),
    "max_train_bytes": (_pos_int, "an integer >= 1"), "max_heldout_bytes": (_pos_int, "an integer >= 1"),
    "checkpoint_every": (_nonneg_int, "an integer >= 0 (0: no checkpoints)"),
    "fail_at": (lambda v: v in (None, "build", "step", "crash"), "null, build, step or crash"),
}
assert set(CHECKS) == set(DEFAULTS)


def normalise(spec: dict) -> dict:
    """The cell spec with defaults filled in, every value checked (ValueError naming the key)."""
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown cell key(s) {unknown}; known: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **spec}
    for key, value in out.items():
        ok, what = CHECKS[key]
        if key == "name" and value is None:
            raise ValueError("name: every setting needs a name")
        if not ok(value):
            raise ValueError(f"{key}: must be {what}, got {value!r}")
    if out["top_k"] > out["num_experts"]:
        raise ValueError(f"top_k={out['top_k']} > num_experts={out['num_experts']}")
    if out["shared_experts"] and out["family"] != "deepseek_v3":
        raise ValueError(f"shared_experts={out['shared_experts']}: only the deepseek_v3 family has shared experts")
    if out["heads"] % out["kv_heads"]:
        raise ValueError(f"heads={out['heads']} is not a multiple of kv_heads={out['kv_heads']}")
    out["trace_steps"] = sorted(set(s for s in out["trace_steps"] if s < out["steps"]))
    return out


def cell_id(spec: dict) -> str:
    hashed = {k: v for k, v in spec.items() if k not in NOT_HASHED}
    digest = hashlib.sha1(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:8]
    return f"{spec['name']}__s{spec['seed']}__{digest}"


def balancing_spec(spec: dict):
    from moe_lab.stages.balancing import BalancingSpec

    b = spec["balancing"]
    return BalancingSpec(score=spec["score"],
                         bias_update_rate=spec["bias_update_rate"] if "aux_free" in b else 0.0,
                         aux_loss_coef=spec["aux_loss_coef"] if "aux_loss" in b else 0.0,
                         capacity_factor=spec["capacity_factor"], capacity_priority=spec["capacity_priority"])


# ---- sweep files ----------------------------------------------------------------------------------
def presets() -> list[str]:
    return sorted(p.stem[:-len("-ablation")] + "-ablation" for p in SWEEPS_DIR.glob("*-ablation.yaml"))


def load(preset: str | None = None, path: str | os.PathLike | None = None) -> dict:
    """Read and check a sweep file (ValueError listing every problem); returns it plus ``_path``."""
    if path is None:
        path = SWEEPS_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ValueError(f"unknown ablation preset {preset!r}; known: {', '.join(presets())}")
    conf = yaml.safe_load(Path(path).read_text()) or {}
    conf.setdefault("name", Path(path).stem)
    check(conf, str(path))
    conf["_path"] = str(path)
    return conf


def check(conf: dict, source: str = "<sweep>") -> None:
    problems = []
    if not isinstance(conf, dict):
        raise ValueError(f"{source}: a sweep file is a mapping of {', '.join(TOP_KEYS)}")
    problems += [f"unknown key {k!r}; allowed: {', '.join(TOP_KEYS)}" for k in conf if k not in TOP_KEYS and k != "_path"]
    if not isinstance(conf.get("settings"), list) or not conf["settings"]:
        problems.append("settings: a non-empty list of mappings, each with a name")
    seeds = conf.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_nonneg_int(s) for s in seeds):
        problems.append(f"seeds: a non-empty list of integers >= 0, got {seeds!r}")
    t = conf.get("cell_timeout_s", 600)
    if not _num(t, 0, strict=True):
        problems.append(f"cell_timeout_s: a positive number, got {t!r}")
    if not problems:
        names = set()
        for i, setting in enumerate(conf["settings"]):
            try:
                if not isinstance(setting, dict):
                    raise ValueError("must be a mapping")
                if "seed" in setting:
                    raise ValueError("seed: give seeds at the top level (every setting runs every seed)")
                spec = normalise({**(conf.get("defaults") or {}), **setting})
                if spec["name"] in names:
                    raise ValueError(f"name {spec['name']!r} used twice")
                names.add(spec["name"])
            except ValueError as e:
                problems.append(f"settings[{i}]: {e}")
    if problems:
        raise ValueError(f"invalid ablation sweep file {source}:\n  " + "\n  ".join(problems))


def expand(conf: dict) -> list[dict]:
    """Normalised cell specs: settings (file order) x seeds."""
    defaults = conf.get("defaults") or {}
    return [normalise({**defaults, **setting, "seed": seed})
            for setting, seed in itertools.product(conf["settings"], conf.get("seeds", [0]))]


# ---- one cell -------------------------------------------------------------------------------------
def build_config(spec: dict):
    import transformers

    common = dict(vocab_size=256, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                  num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                  max_position_embeddings=spec["seq"], tie_word_embeddings=False, initializer_range=0.02,
                  num_experts_per_tok=spec["top_k"], norm_topk_prob=True)
    if spec["family"] == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=spec["head_dim"], intermediate_size=4 * spec["hidden"],
                                           moe_intermediate_size=spec["expert_width"], num_experts=spec["num_experts"],
                                           decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0)
    hd = spec["head_dim"]
    common["num_key_value_heads"] = spec["heads"]  # MLA: one key/value head per query head
    return transformers.DeepseekV3Config(
        **common, intermediate_size=4 * spec["hidden"], moe_intermediate_size=spec["expert_width"],
        n_routed_experts=spec["num_experts"], n_shared_experts=spec["shared_experts"], first_k_dense_replace=0,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, kv_lora_rank=max(hd, 16), q_lora_rank=None,
        qk_nope_head_dim=hd, qk_rope_head_dim=hd, v_head_dim=hd)


def build_model(spec: dict, device):
    import torch

    import moe_lab

    config = build_config(spec)
    torch.manual_seed(spec["seed"])
    kwargs = {} if spec["backend"] == "auto" else {"moe_backend": spec["backend"]}
    model = moe_lab.AutoModelForCausalLM.from_config(config, **kwargs)
    if spec["family"] == "deepseek_v3" and not spec["shared_experts"]:
        for layer in model.model.layers:  # v5 builds a zero-width MLP for n_shared_experts=0; drop it
            mlp = layer.mlp
            if getattr(mlp, "shared_experts", None) is not None and hasattr(mlp, "family"):
                mlp.family = _without_shared(mlp.family)
    model.to(device=device, dtype=torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32)
    return model


def _without_shared(family):
    from dataclasses import replace

    return replace(family, shared_attr=None)


def _lr_at(spec: dict, step: int) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine down to lr/10 at the last step."""
    lr, warm, total = spec["lr"], spec["warmup_steps"], spec["steps"]
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(total - warm - 1, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _layer_stats(stats: dict, top_k: int) -> dict:
    """Balancer.step() output -> per-layer lists of the recorded metrics."""
    import numpy as np

    from moe_lab.analysis import stats as st

    counts = np.asarray(stats["counts"], dtype=np.int64)  # [L, E]
    imb = st.imbalance(counts)
    tokens = np.maximum(np.asarray(stats["tokens"], dtype=np.float64), 1)
    return {"max_over_mean": [round(float(x), 5) for x in imb["max_over_mean"]],
            "cv": [round(float(x), 5) for x in imb["cv"]],
            "dropped_frac": [round(float(d) / (t * top_k), 6) for d, t in zip(stats["dropped"], tokens)],
            "entropy": [round(float(x), 5) for x in stats["entropy"]],
            "bias_absmax": [round(float(x), 6) for x in stats["bias_absmax"]]}


class _StepLog:
    """The training steps not yet read back: loss, aux loss, gradient norm and the routing statistics
    (`Balancer.step_tensors`) as device tensors, and each step's time. ``step_s`` on CUDA is the time
    between two events recorded at the step's first and last launch (read when the events are done);
    on the CPU the step's wall time. `flush_into` reads every pending step back with one wait."""

    MOST_PENDING = 50  # steps read back at least this often: a non-finite loss stops the cell within 50 steps

    def __init__(self, device, tokens_per_step: int):
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        self.event = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None
        self.tokens_per_step = tokens_per_step
        self.pending: list[tuple] = []

    def to_device(self, batch):
        """The step's batch on the device; on CUDA through pinned memory without waiting for the GPU (a
        copy from pageable memory waits for the stream)."""
        return batch.pin_memory().to(self.device, non_blocking=True) if self.cuda else batch.to(self.device)

    def start(self):
        if self.cuda:
            begin = self.event()
            begin.record()
            return begin
        return time.perf_counter()

    def add(self, step: int, timer, loss, aux, lr: float, grad_norm, routed: dict) -> None:
        if self.cuda:
            end = self.event()
            end.record()
            timer = (timer, end)
        else:
            timer = time.perf_counter() - timer
        self.pending.append((step, timer, loss, aux, lr, grad_norm, routed))

    def flush_into(self, cols: dict, top_k: int) -> None:
        """Append the pending steps to the record's columns; a non-finite loss raises with its step."""
        import torch

        from moe_lab.stages.balancing import statistics_as_numbers

        if self.cuda and self.pending:
            torch.cuda.synchronize()
        for step, timer, loss, aux, lr, grad_norm, routed in self.pending:
            lossf = float(loss)
            if not math.isfinite(lossf):
                raise FloatingPointError(f"loss is {lossf} at step {step}")
            dt = timer[0].elapsed_time(timer[1]) / 1e3 if self.cuda else timer
            cols["step"].append(step)
            cols["loss"].append(round(lossf, 6))
            cols["aux_loss"].append(round(float(aux), 7))
            cols["lr"].append(lr)
            cols["step_s"].append(round(dt, 6))
            cols["tokens_per_s"].append(round(self.tokens_per_step / dt, 1))
            cols["grad_norm"].append(round(float(grad_norm), 5))
            for k, v in _layer_stats(statistics_as_numbers(routed), top_k).items():
                cols[k].append(v)
        self.pending.clear()


def _evaluate(model, batches, device) -> float:
    import torch

    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            total += float(model(input_ids=ids, labels=ids).loss)
    model.train(was)
    return total / len(batches)


def run_cell(spec: dict, out_dir: Path | None = None, corpus=None) -> dict:
    """Train one cell; return its record (status ok) or raise. ``out_dir``: where a trace goes."""
    import torch

    from moe_lab.analysis.trace import RoutingTracer
    from moe_lab.stages.balancing import Balancer

    from . import text_data

    spec = normalise(spec)
    cid = cell_id(spec)
    device = torch.device("cuda" if spec["device"] == "auto" and torch.cuda.is_available() else
                          "cpu" if spec["device"] == "auto" else spec["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this cell asks for device cuda and no CUDA GPU is visible")
    torch.set_float32_matmul_precision(spec["matmul_precision"])
    if spec["fail_at"] == "build":
        raise RuntimeError("injected failure at build (fail_at: build)")
    if spec["fail_at"] == "crash":
        os._exit(17)
    corpus = corpus or text_data.load_corpus(spec["max_train_bytes"], spec["max_heldout_bytes"])
    data = text_data.Batches(corpus, spec["batch"], spec["seq"], spec["seed"])
    heldout = data.heldout_batches(spec["eval_batches"])
    model = build_model(spec, device)
    model.train()
    bal = balancing_spec(spec)
    balancer = Balancer(model, bal)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                             {"params": other, "weight_decay": 0.0}], lr=spec["lr"], betas=(0.9, 0.95))
    n_params = sum(p.numel() for p in model.parameters())
    tracer = RoutingTracer(model, logits=spec["trace_logits"], logits_dtype="float16", auto_step=False) if spec["trace_steps"] else None
    cols = {k: [] for k in ("step", "loss", "aux_loss", "lr", "step_s", "tokens_per_s", "grad_norm",
                            "max_over_mean", "cv", "dropped_frac", "entropy", "bias_absmax")}
    evals = []
    tokens_per_step = spec["batch"] * spec["seq"]
    state_path = state_path_of(out_dir, cid) if out_dir is not None and spec["checkpoint_every"] else None
    start = _resume(state_path, model, opt, balancer, tracer, cols, evals, device) if state_path else 0
    # each step's numbers stay on the device until an evaluation, a checkpoint or the end reads them all
    # back at once (`_StepLog`): the loop never waits for the GPU between steps
    steps = _StepLog(device, tokens_per_step)
    t_start = time.perf_counter()
    for step in range(start, spec["steps"]):
        if spec["fail_at"] == "step" and step == 1:
            raise RuntimeError("injected failure at step 1 (fail_at: step)")
        ids = steps.to_device(data.train_batch(step))
        for group in opt.param_groups:
            group["lr"] = _lr_at(spec, step)
        tracing = tracer is not None and step in spec["trace_steps"]
        if tracing:
            tracer.step = step
            tracer.__enter__()
        timer = steps.start()
        loss = model(input_ids=ids, labels=ids).loss
        aux = balancer.aux_loss()
        (loss + aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"] if spec["grad_clip"] else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        routed = balancer.step_tensors()
        lr = float(f"{opt.param_groups[0]['lr']:.6g}")
        steps.add(step, timer, loss.detach(), aux.detach() if hasattr(aux, "detach") else aux, lr, gnorm, routed)
        if tracing:
            tracer.__exit__(None, None, None)
        evaluating = spec["eval_every"] and (step + 1) % spec["eval_every"] == 0 and step + 1 < spec["steps"]
        saving = state_path is not None and (step + 1) % spec["checkpoint_every"] == 0 and step + 1 < spec["steps"]
        if evaluating or saving or step + 1 == spec["steps"] or len(steps.pending) >= _StepLog.MOST_PENDING:
            steps.flush_into(cols, spec["top_k"])
        if evaluating:
            evals.append({"step": step + 1, "heldout_loss": round(_evaluate(model, heldout, device), 6)})
            print(f"step {step + 1}/{spec['steps']}: held-out loss {evals[-1]['heldout_loss']:.4f}, "
                  f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)  # the cell's log
        if saving:
            _save_state(state_path, step + 1, model, opt, balancer, tracer, cols, evals)
    final_eval = _evaluate(model, heldout, device)
    evals.append({"step": spec["steps"], "heldout_loss": round(final_eval, 6)})
    trace_path = None
    if tracer is not None and out_dir is not None:
        trace_path = Path(out_dir) / "traces" / f"{cid}.safetensors"
        tracer.save(trace_path)
        trace_path = str(trace_path.relative_to(out_dir))
    tail = max(1, spec["steps"] // 10)  # the last 10% of steps

    def tail_mean(name):
        rows = cols[name][-tail:]
        return round(statistics.fmean(statistics.fmean(r) if isinstance(r, list) else r for r in rows), 6)

    plan = {name: dict(model.moe_lab_plan[name]) for name in list(model.moe_lab_plan)[:1]}
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    return {
        "status": "ok", "cell_id": cid, "spec": spec, "setting": spec["name"], "device": str(device),
        "resumed_from_step": start or None,
        "balancing": bal.describe(), "plan_first_layer": plan, "parameters": n_params,
        "samples": cols, "evals": evals,
        "final": {"heldout_loss": round(final_eval, 6), "train_loss_tail": tail_mean("loss"),
                  "max_over_mean_tail": tail_mean("max_over_mean"), "cv_tail": tail_mean("cv"),
                  "dropped_frac_tail": tail_mean("dropped_frac"), "entropy_tail": tail_mean("entropy"),
                  "tokens_per_s_median": round(statistics.median(cols["tokens_per_s"]), 1),
                  "tail_steps": tail},
        "data": corpus.describe(), "trace": trace_path, "wall_s": round(time.perf_counter() - t_start, 3),
    }


def state_path_of(run_dir, cid: str) -> Path:
    """Where a cell keeps its training state between checkpoints (deleted when the cell finishes)."""
    return Path(run_dir) / "state" / f"{cid}.pt"


def _save_state(path: Path, next_step: int, model, opt, balancer, tracer, cols, evals) -> None:
    """Everything step ``next_step`` needs to continue as if never stopped (the data of a step
    depends on its index alone), written atomically."""
    import torch

    state = {"next_step": next_step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "bias": [None if layer.bias is None else layer.bias.detach().clone() for layer in balancer.layers],
             "cols": cols, "evals": evals, "trace": tracer.trace if tracer is not None else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path, model, opt, balancer, tracer, cols, evals, device) -> int:
    """Load a saved state into the fresh model, optimizer, balancer and tracer; the step to start at."""
    import torch

    if not path.exists():
        return 0
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    for layer, bias in zip(balancer.layers, state["bias"]):
        if bias is not None:
            layer.bias.copy_(bias)
    for key, values in state["cols"].items():
        cols[key][:] = values
    evals[:] = state["evals"]
    if tracer is not None and state["trace"] is not None:
        tracer.trace = state["trace"]
    print(f"resumed at step {state['next_step']} from {path.name}", file=sys.stderr, flush=True)
    return state["next_step"]


def failure_record(spec: dict, status: str, error: str) -> dict:
    return {"status": status, "cell_id": cell_id(spec), "spec": spec, "setting": spec["name"], "error": error}


def _status_of(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "oom" if "out of memory" in text or type(exc).__name__ == "OutOfMemoryError" else "failed"


def run_cell_safely(spec: dict, out_dir: Path, corpus=None) -> dict:
    """`run_cell`, with any exception turned into a failed / oom record (the sweep goes on)."""
    try:
        return run_cell(spec, out_dir, corpus)
    except Exception as e:  # noqa: BLE001 - recorded, not swallowed
        record = failure_record(spec, _status_of(e), "".join(traceback.format_exception(e))[-4000:])
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
        return record


# ---- the sweep ------------------------------------------------------------------------------------
class _IsolatedCell:
    """One cell in its own process (its own session); ``finish`` gives a record even when the process
    died without one. ``sharing``: how many cells the sweep runs at once (recorded: with more than one,
    tokens/s is measured on a shared device)."""

    def __init__(self, spec: dict, run_dir: Path, env: dict, sharing: int = 1):
        self.spec, self.run_dir, self.sharing = spec, run_dir, sharing
        cid = cell_id(spec)
        self.out_path = run_dir / "cells" / f"{cid}.json"
        self.log_path = run_dir / "logs" / f"{cid}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.out_path.exists():
            self.out_path.unlink()
        self.cmd = [sys.executable, "-m", "experiments.ablation", "--cell", json.dumps(spec, sort_keys=True),
                    "--out", str(self.out_path)]
        self.t0 = time.perf_counter()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=provenance.REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def kill(self, why: str) -> None:
        """End the process and record the cell ``interrupted`` (the sweep was stopped)."""
        from .sweep import kill_group

        kill_group(self.proc)
        self._log.close()
        store.write_json(self.out_path, {**failure_record(self.spec, "interrupted", f"the sweep was interrupted ({why})"),
                                         "launcher": {"command": self.cmd, "wall_s": self.elapsed()}})

    def finish(self, timed_out_after: float | None = None) -> dict:
        """The cell's record, once its process has exited (or, with ``timed_out_after``, killed)."""
        from .sweep import kill_group

        status = None
        if timed_out_after is not None:
            kill_group(self.proc)
            status = "timeout"
        rc = self.proc.wait()
        self._log.close()
        record = store.read_json(self.out_path) if self.out_path.exists() and status is None else None
        if record is None:
            try:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
            except OSError:
                tail = ""
            status = status or ("oom" if "out of memory" in tail.lower() else "failed")
            why = f"timed out after {timed_out_after:.0f}s" if status == "timeout" else f"cell process exited with {rc}"
            record = failure_record(self.spec, status, f"{why} without a record; log tail:\n{tail}")
        record["launcher"] = {"command": self.cmd, "returncode": rc, "wall_s": round(self.elapsed(), 3),
                              "log": str(self.log_path.relative_to(self.run_dir)), "cells_at_once": self.sharing}
        store.write_json(self.out_path, record)
        return record


def _run_isolated(specs: list[dict], run_dir: Path, timeout_s: float, env: dict, jobs: int, on_start) -> list[dict]:
    """Every spec in its own process, at most ``jobs`` at a time; the records in ``specs``' order.
    On an interrupt the running cells are killed and recorded ``interrupted`` before it propagates."""
    pending, running, records = list(enumerate(specs)), {}, {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, spec = pending.pop(0)
                on_start(spec)
                running[i] = _IsolatedCell(spec, run_dir, env, sharing=min(jobs, len(specs)))
            for i, cell in list(running.items()):
                if cell.proc.poll() is not None:
                    records[i] = cell.finish()
                elif cell.elapsed() > timeout_s:
                    records[i] = cell.finish(timed_out_after=timeout_s)
                else:
                    continue
                del running[i]
            if running:
                time.sleep(0.2)
    except BaseException as e:
        from .sweep import SweepInterrupted

        why = signal.Signals(e.signum).name if isinstance(e, SweepInterrupted) else type(e).__name__
        for cell in running.values():
            cell.kill(why)
        raise
    return [records[i] for i in range(len(specs))]


def _done(rec: dict | None, retry_failed: bool) -> bool:
    if rec is None or rec.get("status") == "interrupted":
        return False
    return rec.get("status") == "ok" or not retry_failed


def run_sweep(conf: dict, run_dir: str | os.PathLike, *, isolate: bool = True, retry_failed: bool = False,
              fresh: bool = False, only: str | None = None, progress: bool = True, jobs: int = 1) -> list[dict]:
    """Run (or resume) every cell of ``conf`` under ``run_dir``; the records in file order.
    ``jobs``: isolated cells run at once (small models leave a GPU mostly idle; the learning curves do
    not depend on it, the tokens/s column does: each record says ``launcher.cells_at_once``).

    ``run_dir``: ``manifest.json`` (command, provenance, the sweep file, each cell's status, state),
    ``cells/<cell_id>.json``, ``logs/<cell_id>.log`` (isolated cells), ``traces/``."""
    from .sweep import SweepInterrupted, stop_on_signals

    run_dir = Path(run_dir).resolve()
    specs = expand(conf)
    if only:
        specs = [s for s in specs if only in cell_id(s)]
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    prov = provenance.collect()
    manifest = {"run": run_dir.name, "kind": "ablation", "sweep": {k: v for k, v in conf.items() if not k.startswith("_")},
                "sweep_file": conf.get("_path"), "provenance": prov, "seeds": sorted({s["seed"] for s in specs}),
                "cells": [], "state": "running"}
    if manifest_path.exists():
        old = store.read_json(manifest_path)
        manifest["previous_invocations"] = old.get("previous_invocations", []) + [old.get("provenance")]
    existing = {}
    for spec in specs:
        path = run_dir / "cells" / f"{cell_id(spec)}.json"
        if fresh:
            state_path_of(run_dir, cell_id(spec)).unlink(missing_ok=True)
        elif path.exists():
            existing[cell_id(spec)] = store.read_json(path)
    done = [c for c, r in existing.items() if _done(r, retry_failed)]
    if done:
        log.warning("%d of %d cells already done in %s; --fresh to rerun%s", len(done), len(specs), run_dir,
                    " them" if len(done) == len(specs) else "")
    store.write_json(manifest_path, manifest)
    env = dict(os.environ)
    for k, v in (conf.get("env") or {}).items():
        env.setdefault(k, str(v))
    timeout_s = float(conf.get("cell_timeout_s", 600))
    corpus = None
    by_id: dict[str, dict] = {cid: rec for cid, rec in existing.items() if _done(rec, retry_failed)}
    todo = [s for s in specs if cell_id(s) not in by_id]
    position = {cell_id(s): i for i, s in enumerate(specs)}

    def announce(spec):
        if progress:
            print(f"[{position[cell_id(spec)] + 1}/{len(specs)}] {cell_id(spec)}", file=sys.stderr, flush=True)

    def keep(rec):
        if rec["status"] != "ok":
            log.warning("cell %s: %s: %s", rec["cell_id"], rec["status"],
                        (rec.get("error") or "").strip().splitlines()[-1:])
        by_id[rec["cell_id"]] = rec

    try:
        with stop_on_signals():
            if isolate:
                for rec in _run_isolated(todo, run_dir, timeout_s, env, max(1, jobs), announce):
                    keep(rec)
            else:
                for spec in todo:
                    announce(spec)
                    if corpus is None:
                        from . import text_data

                        corpus = text_data.load_corpus(spec["max_train_bytes"], spec["max_heldout_bytes"])
                    use = corpus if (corpus.info["train_bytes"], corpus.info["heldout_bytes"]) == (
                        spec["max_train_bytes"], spec["max_heldout_bytes"]) else None
                    rec = run_cell_safely(spec, run_dir, use)
                    rec.setdefault("provenance", prov)
                    store.write_json(run_dir / "cells" / f"{cell_id(spec)}.json", rec)
                    keep(rec)
    except KeyboardInterrupt as e:
        statuses = {}
        for spec in specs:
            cid = cell_id(spec)
            path = run_dir / "cells" / f"{cid}.json"
            statuses[cid] = by_id[cid]["status"] if cid in by_id else (
                store.read_json(path).get("status") if path.exists() else "not_run")
        manifest["cells"] = [{"cell_id": c, "status": s} for c, s in statuses.items()]
        manifest["state"] = "interrupted"
        manifest["interrupted_by"] = signal.Signals(e.signum).name if isinstance(e, SweepInterrupted) else "KeyboardInterrupt"
        store.write_json(manifest_path, manifest)
        raise
    records = [by_id[cell_id(s)] for s in specs]
    manifest["cells"] = [{"cell_id": r["cell_id"], "status": r["status"]} for r in records]
    manifest["state"] = "finished"
    store.write_json(manifest_path, manifest)
    return records


# ---- reading runs: table and curves ---------------------------------------------------------------
def load_run(run_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(manifest, records in the manifest's order) of an ablation run directory."""
    run_dir = Path(run_dir)
    manifest = store.read_json(run_dir / "manifest.json")
    records = []
    for entry in manifest.get("cells", []):
        path = run_dir / "cells" / f"{entry['cell_id']}.json"
        if path.exists():
            records.append(store.read_json(path))
    return manifest, records


def _by_setting(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["setting"], []).append(r)
    return out


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(records: list[dict]) -> str:
    """Markdown: one row per setting (mean ± sd over seeds of the ok cells)."""
    head = ("| setting | routing | ok / cells | held-out loss | train loss (last 10%) | max/mean load | CV | "
            "dropped | router entropy | tok/s |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, recs in _by_setting(records).items():
        ok = [r for r in recs if r["status"] == "ok"]
        f = [r["final"] for r in ok]
        s = recs[0]["spec"]
        routing = (f"{s['family']}, {s['score'] or 'family score'}, E{s['num_experts']} k{s['top_k']} "
                   f"w{s['expert_width']}" + (f" +{s['shared_experts']} shared" if s["shared_experts"] else "")
                   + f", {recs[0].get('balancing') or s['balancing']}")
        if not ok:
            rows.append(f"| {name} | {routing} | 0 / {len(recs)} ({', '.join(sorted({r['status'] for r in recs}))}) "
                        "| - | - | - | - | - | - | - |")
            continue
        rows.append(f"| {name} | {routing} | {len(ok)} / {len(recs)} | {_mean_sd([x['heldout_loss'] for x in f], 4)} | "
                    f"{_mean_sd([x['train_loss_tail'] for x in f], 4)} | {_mean_sd([x['max_over_mean_tail'] for x in f], 3)} | "
                    f"{_mean_sd([x['cv_tail'] for x in f], 3)} | {_mean_sd([100 * x['dropped_frac_tail'] for x in f], 2)}% | "
                    f"{_mean_sd([x['entropy_tail'] for x in f], 3)} | {_mean_sd([x['tokens_per_s_median'] for x in f], 0)} |")
    return head + "\n" + "\n".join(rows) + "\n"


def _sharing_note(records: list[dict]) -> str:
    at_once = max((r.get("launcher", {}).get("cells_at_once", 1) for r in records), default=1)
    return (f" The cells ran {at_once} cells at once on one device (`--jobs {at_once}`): tok/s is a share of the "
            "device, not one cell's speed." if at_once > 1 else "")


def report_markdown(manifest: dict, records: list[dict], run_name: str) -> str:
    prov = manifest.get("provenance", {})
    hw, ver, git = prov.get("hardware", {}), prov.get("versions", {}), prov.get("git", {})
    ok = [r for r in records if r["status"] == "ok"]
    s = ok[0]["spec"] if ok else (records[0]["spec"] if records else {})
    on_gpu = bool(hw.get("gpu_count")) and any(r.get("device", "").startswith("cuda") for r in ok)
    device = f"{hw.get('gpu_count')}x {hw.get('gpu_name')}" if on_gpu else f"CPU ({hw.get('cpu_count')} cores)"
    data = ok[0]["data"] if ok else {}
    lines = [
        f"## {run_name}: routing ablation, {s.get('family')} L{s.get('layers')} H{s.get('hidden')}, "
        f"{s.get('steps')} steps x {s.get('batch')} x {s.get('seq')} bytes, {device}",
        "",
        ("GPU run." if on_gpu else
         "**CPU run**: a small smoke-size ablation, not a result to cite as a finding."),
        f"Data: Python {data.get('python')} standard library sources as bytes ({data.get('train_bytes')} train / "
        f"{data.get('heldout_bytes')} held-out bytes, digest {data.get('digest')}); seeds {manifest.get('seeds')}; "
        f"held-out loss at the last step, the other columns averaged over the last 10% of steps and all MoE layers; "
        "mean ± sd over seeds." + _sharing_note(records),
        "",
        table(records),
        f"Versions: transformers {ver.get('transformers')}, torch {ver.get('torch')}, python {ver.get('python')}, "
        f"{device}, commit {str(git.get('commit'))[:12]}{' (dirty)' if git.get('dirty') else ''}. "
        f"Command: `{' '.join(['python -m experiments.ablation', *prov.get('command', [])[1:]])}`",
        "",
    ]
    return "\n".join(lines)


def plot(records: list[dict], path=None, smooth: int = 0):
    """Loss and balance curves per setting (mean over seeds): train loss, max/mean load, CV, dropped
    fraction, router entropy; returns the figure (saved to ``path`` when given)."""
    import matplotlib

    if path is not None and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("loss", "train loss (bytes, nats)"), ("max_over_mean", "max / mean expert load"),
              ("cv", "load CV"), ("dropped_frac", "dropped slots"), ("entropy", "router entropy (nats)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), constrained_layout=True)
    for name, recs in _by_setting(records).items():
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            continue
        steps = np.asarray(ok[0]["samples"]["step"])
        for ax, (key, label) in zip(axes, panels):
            ys = []
            for r in ok:
                col = r["samples"][key]
                ys.append([np.mean(v) if isinstance(v, list) else v for v in col])
            y = np.mean(np.asarray(ys, dtype=float), axis=0)
            window = smooth or max(1, len(y) // 50)
            if window > 1:
                y = np.convolve(y, np.ones(window) / window, mode="valid")
            ax.plot(steps[len(steps) - len(y):], y, label=name)
            ax.set(xlabel="step", ylabel=label)
    axes[0].legend(fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, name: str | None = None) -> list[Path]:
    """``ablation-<run>.md`` and ``ablation/<run>.png`` for the run at ``run_dir`` under ``out_dir``
    (default <run>/report)."""
    run_dir = Path(run_dir)
    name = name or run_dir.name
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    manifest, records = load_run(run_dir)
    md = out_dir / f"ablation-{name}.md"
    text = report_markdown(manifest, records, name)
    store.write_text(md, f"# Routing ablation `{name}` (`python -m experiments.ablation --report`)\n\n"
                         f"Generated from `{run_dir.as_posix()}` (do not edit). Curves: `ablation/{name}.png`.\n\n{text}")
    png = out_dir / "ablation" / f"{name}.png"  # a folder of its own: experiments.report owns report/*.png
    png.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".png", dir=png.parent, delete=False) as tmp:
        pass
    fig = plot(records, tmp.name)
    os.replace(tmp.name, png)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return [md, png]


# ---- command line ---------------------------------------------------------------------------------
def _jobs_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--jobs takes a whole number >= 1 (cells at once), not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help=f"ablation preset ({', '.join(presets())}); default {DEFAULT_PRESET}")
    src.add_argument("--config", default=None, help="path to an ablation sweep YAML file")
    src.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # one cell (JSON spec), run by the sweep
    src.add_argument("--report", default=None, metavar="RUN_DIR", help="table and curves of a finished run")
    ap.add_argument("--out", default=None, help="run directory (default runs/<name>); with --cell: the record path")
    ap.add_argument("--results", action="store_true", help="with --report: write into results/report/")
    again = ap.add_mutually_exclusive_group()
    again.add_argument("--retry-failed", action="store_true")
    again.add_argument("--fresh", action="store_true")
    ap.add_argument("--only", default=None, help="run only cells whose id contains this string")
    ap.add_argument("--steps", type=int, default=None, help="override every cell's steps (a smoke test of a preset)")
    ap.add_argument("--in-process", action="store_true", help="run the cells in this process (no isolation)")
    ap.add_argument("--jobs", type=_jobs_arg, default=1,
                    help="cells run at once, each in its own process (tokens/s is then shared; records say so)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--log-level", default=provenance.log_level("WARNING"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.cell:
        spec = json.loads(args.cell)
        out = Path(args.out)
        rec = run_cell_safely(spec, out.parent.parent)
        rec["provenance"] = provenance.collect()
        store.write_json(out, rec)
        return 0 if rec["status"] == "ok" else 3
    if args.report:
        target = provenance.REPO_ROOT / "results" / "report" if args.results else args.out
        for p in write_report(args.report, target):
            print(p)
        return 0
    try:
        conf = load(preset=None if args.config else (args.preset or DEFAULT_PRESET), path=args.config)
        if args.steps:
            conf["defaults"] = {**(conf.get("defaults") or {}), "steps": args.steps}
            conf["settings"] = [{**s, "steps": args.steps} if "steps" in s else s for s in conf["settings"]]
        specs = expand(conf)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for s in specs:
            print(cell_id(s))
        return 0
    run_dir = Path(args.out) if args.out else Path.cwd() / "runs" / conf["name"]
    try:
        records = run_sweep(conf, run_dir, isolate=not args.in_process, retry_failed=args.retry_failed,
                            fresh=args.fresh, only=args.only, progress=not args.no_progress,
                            jobs=args.jobs)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted: {run_dir}/manifest.json says state: interrupted; run the same command to resume",
              file=sys.stderr)
        return 128 + signum
    print(table(records))
    print(f"Records: {run_dir}. Table and curves: python -m experiments.ablation --report {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
