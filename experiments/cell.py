"""One cell: build a model, run full training steps, measure, and write one JSON record.

A cell is a dict (see ``DEFAULTS``): model geometry + layer count, system (``systems.py``: a short
name or a mapping, kept as its canonical short name), number of processes, batch and sequence
length, routing regime (``regimes.py``), recipe (dtype, optimizer, activation checkpointing),
warm-up and measured step counts, seed.

Per step it runs forward, backward, optimizer step and zero_grad between two device
synchronisations and records wall time and loss. Metrics (over the measured steps): median step
time, tokens/s/GPU, analytic model TFLOP/s/GPU and MFU (``flops.py``), peak memory
(``torch.cuda.max_memory_allocated`` since the model was built, max over ranks) and activation
memory = peak - (parameters + gradients + optimizer state), the three counted from the tensors
themselves (local shards under FSDP/EP).

A trainer system (``v5-trainer``, ``trainer``, ``trainer-max``) runs the unmodified Trainer script
of ``trainer_script.py`` instead of this loop (``trainer_cell.py``), with the same metrics and record.

Run as ``python -m experiments.cell --spec '<json>' --out cell.json`` (or under ``torchrun`` for
several GPUs; rank 0 writes). The record says what ran: ``system_spec`` (the resolved
``systems.SystemSpec``), ``options`` (the moe_lab ``Options`` the model was built with: the
system's, under the documented ``MOE_LAB_*`` overrides of ``Options.from_environment``) and
``options_changed`` (those away from their defaults; the summary key's suffix). It is written even
when the cell fails: status ``oom``, ``not_implemented`` (a system the installed library cannot
build at all), ``unavailable`` (a device, package or dispatcher missing here) or ``failed`` with
the error (a backend or implementation name moe_lab does not know among them); the exit code is then 3.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Mapping

from . import flops, models, provenance, regimes, store, systems

log = logging.getLogger(__name__)

DEFAULTS = {
    "model": "tiny-qwen3-moe",
    "layers": None,  # None = the geometry's full depth
    "system": "v5-grouped_mm",
    "nproc": 1,
    "batch": 1,
    "seq": 512,
    "routing": "real",
    "dtype": "bf16",  # bf16 | fp32: parameter dtype (pure bf16 training when bf16)
    "optimizer": "adamw_fused",  # adamw_fused | adamw | adamw_triton (moe_lab.training.optim.TritonAdamW) | sgd
    "lr": 1.0e-4,
    "ckpt": False,  # activation checkpointing (non-reentrant)
    "attn": None,  # None = the geometry's choice (sdpa unless the file says otherwise)
    "warmup": 3,
    "steps": 10,
    "seed": 0,
    "trace": None,  # a path: after the measured steps, run `trace_steps` more (untimed) and save their routing
    "trace_steps": 3,
    "device": "auto",  # auto | cuda | cpu
    "transformers_version": None,  # a pin: the cell fails if another version is imported
    "fail_at": None,  # test hook: "build"/"step" raise an injected error there, "crash" exits without a record, "hang" sleeps
}
OPTIMIZERS = ("adamw_fused", "adamw", "adamw_triton", "sgd")
DEVICES = ("auto", "cuda", "cpu")
FAIL_AT = ("build", "step", "crash", "hang")
# "interrupted": the sweep was stopped (Ctrl-C, SIGTERM) while the cell ran; written by the sweep
STATUSES = ("ok", "failed", "oom", "not_implemented", "unavailable", "timeout", "interrupted")
_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_at_least(lo: int):
    def check(v):
        if not _is_int(v) or v < lo:
            raise ValueError(f"must be an integer >= {lo}, got {v!r}")
    return check


def _one_of(choices, optional=False):
    def check(v):
        if not (optional and v is None) and v not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}{' (or null)' if optional else ''}, got {v!r}")
    return check


def _text(optional=True, hint=""):
    def check(v):
        if optional and v is None:
            return
        if not isinstance(v, str) or not v:
            raise ValueError(f"must be a non-empty string{' or null' if optional else ''}, got {v!r}{hint}")
    return check


def _model(v):
    _text(optional=False)(v)
    if v not in models.available():
        raise ValueError(f"unknown model {v!r}; known: {', '.join(models.available())}")


def _layers(v):
    if v is not None:
        _int_at_least(1)(v)


def _system(v):
    if not isinstance(v, Mapping) and (not isinstance(v, str) or not v):
        raise ValueError(f"must be a system name or a mapping of {', '.join(systems.MAPPING_KEYS)}, got {v!r}")
    systems.parse(v)  # a short name or a mapping (experiments/systems.py); normalise keeps its canonical name


def _routing(v):
    _text(optional=False)(v)
    regimes.parse(v)


def _lr(v):
    if isinstance(v, str):
        raise ValueError(f"must be a number, got the string {v!r} (YAML reads 1e-4 as a string: write 1.0e-4)")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"must be a positive number, got {v!r}")


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")


# one check per cell key: raises ValueError("must be ...") for a value the key cannot take
CHECKS = {
    "model": _model, "layers": _layers, "system": _system, "nproc": _int_at_least(1), "batch": _int_at_least(1),
    "seq": _int_at_least(1), "routing": _routing, "dtype": _one_of(tuple(_DTYPES)), "optimizer": _one_of(OPTIMIZERS),
    "lr": _lr, "ckpt": _bool, "attn": _text(), "warmup": _int_at_least(0), "steps": _int_at_least(1),
    "seed": _int_at_least(0), "trace": _text(), "trace_steps": _int_at_least(1), "device": _one_of(DEVICES),
    "transformers_version": _text(hint=" (quote it: \"5.17.0\")"), "fail_at": _one_of(FAIL_AT, optional=True),
}
assert set(CHECKS) == set(DEFAULTS)


def check_value(key: str, value) -> None:
    """Raise ValueError naming ``key`` when it is not a cell key or ``value`` is not a value it takes."""
    if key not in DEFAULTS:
        raise ValueError(f"unknown cell key {key!r}; known: {', '.join(sorted(DEFAULTS))}")
    try:
        CHECKS[key](value)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def normalise(spec: dict) -> dict:
    """The spec with defaults filled in and values checked; unknown keys are refused."""
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown cell keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **spec}
    for key, value in out.items():
        check_value(key, value)
    out["system"] = systems.canonical_name(out["system"])  # a mapping or an alias -> the one short name
    full = int(models.load_geometry(out["model"])["full_layers"])
    if out["layers"] is None:
        out["layers"] = full
    elif out["layers"] > full:
        raise ValueError(f"layers: {out['model']} has {full} layers, got {out['layers']}")
    return out


def cell_id(spec: dict) -> str:
    """A readable, stable file name for a normalised spec, with a hash of every field."""
    s = spec
    digest = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    recipe = f"{s['dtype']}-{s['optimizer']}" + ("-ckpt" if s["ckpt"] else "")
    routing = s["routing"].replace("@", "a")
    return (f"{models.model_label(s['model'], s['layers'])}__{s['system']}__{routing}__"
            f"b{s['batch']}s{s['seq']}__{recipe}__n{s['nproc']}__{digest}")


# ---- distributed set-up ------------------------------------------------------------------------
def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _setup_device(spec: dict):
    import torch

    rank, world, local = _dist_env()
    want = spec["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise _Unavailable("this cell needs a CUDA GPU and none is visible")
    if world != spec["nproc"]:
        raise _Unavailable(f"cell asks for nproc={spec['nproc']} but runs with WORLD_SIZE={world} (launch with torchrun)")
    device = torch.device(want, local) if want == "cuda" else torch.device("cpu")
    if want == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            kw = {"device_id": device} if want == "cuda" else {}
            dist.init_process_group("nccl" if want == "cuda" else "gloo", **kw)
    return device, rank, world


class _Unavailable(RuntimeError):
    pass


# ---- measurement helpers -----------------------------------------------------------------------
def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(t) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def static_bytes(model, optimizer, grads_persist: bool = True) -> dict:
    """Bytes held by parameters, their gradients (same size as the trainable parameters, counted
    whether or not they exist right now; zero when ``grads_persist`` is false: an optimizer in
    backward frees each gradient after its step, so they never all exist and the transient ones are
    part of the activation peak) and optimizer state tensors (this rank's shards)."""
    import torch

    params = list(model.parameters())
    p = sum(_bytes(x) for x in params)
    g = sum(_bytes(x) for x in params if x.requires_grad) if grads_persist else 0
    o = sum(_bytes(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return {"params": p, "grads": g, "optimizer": o}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_batch(spec, vocab, step, rank, replicated, device):
    import torch

    g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + step * 7919 + (0 if replicated else rank * 104_729))
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g)
    return ids.to(device)


def _optimizer_class(name: str):
    """(optimizer class, extra keyword arguments) of a cell's ``optimizer`` name."""
    import torch

    if name == "adamw_triton":
        from moe_lab.training.optim import TritonAdamW

        return TritonAdamW, {}
    return {"sgd": (torch.optim.SGD, {}), "adamw_fused": (torch.optim.AdamW, {"fused": True}),
            "adamw": (torch.optim.AdamW, {})}[name]


def _optimizer(spec, model, device, in_backward: bool = False, side_stream: bool = False):
    from torch.distributed.tensor import DTensor

    optimizer_class, extra = _optimizer_class(spec["optimizer"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    if in_backward:
        from moe_lab.training.optim import OptimizerInBackward

        if spec["nproc"] != 1:
            raise ValueError("the optimizer-in-backward variant runs one process (gradients are not reduced before the step)")
        return OptimizerInBackward(trainable, optimizer_class, lr=spec["lr"], side_stream=side_stream, **extra)
    # One optimizer step call cannot mix DTensors and plain tensors (v5's expert parallel makes its
    # experts DTensors, fused AdamW then fails): one param group of each, same hyper-parameters.
    params = [group for group in ({"params": [p for p in trainable if isinstance(p, DTensor)]},
                                  {"params": [p for p in trainable if not isinstance(p, DTensor)]}) if group["params"]]
    return optimizer_class(params, lr=spec["lr"], **extra)


def _max_over_ranks(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ---- the cell ----------------------------------------------------------------------------------
def run(spec: dict) -> dict:
    """Run a normalised cell in this process (one rank); returns its record (status ok)."""
    import torch

    t_start = time.perf_counter()
    if spec["fail_at"] == "hang":  # a cell that never ends (the sweep's interrupt test)
        log.info("fail_at=hang: rank %d pid %d sleeping", _dist_env()[0], os.getpid())
        while True:
            time.sleep(60)
    system = systems.parse(spec["system"])
    if system.loop == "trainer":
        systems.check_world(system, spec["nproc"])  # one process: refused with the reason before any set-up
    device, rank, world = _setup_device(spec)
    import transformers

    if spec["transformers_version"] and transformers.__version__ != spec["transformers_version"]:
        raise _Unavailable(f"transformers {transformers.__version__} imported from "
                           f"{os.path.dirname(transformers.__file__)}, the sweep pins {spec['transformers_version']}")
    config = models.build_config(spec["model"], spec["layers"])
    dtype = getattr(torch, _DTYPES[spec["dtype"]])
    attn = models.attn_implementation(spec["model"], spec["attn"])
    if spec["fail_at"] == "build":
        raise RuntimeError("injected failure at build (fail_at='build')")
    if spec["fail_at"] == "crash":
        os._exit(17)  # simulates a process killed before it could write its record
    if system.loop == "trainer":  # v5-trainer, trainer, trainer-max: the unmodified Trainer script
        from . import trainer_cell

        return trainer_cell.run(spec, system, config, attn=attn, device=device, t_start=t_start)

    if system.cuda_graphs and (spec["routing"] != "real" or spec["trace"] or spec["ckpt"]):
        raise ValueError(f"{system.name}: CUDA graphs replay the layers without their Python hooks; the routing "
                         "regimes, routing traces and checkpointing need them (use routing 'real', no trace, no ckpt)")
    torch.manual_seed(spec["seed"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    options = _options_used(system)  # the system's moe_lab Options under the MOE_LAB_* overrides (None for v5)
    model = systems.build_model(system, config, dtype=dtype, attn=attn, device=device, world=world, options=options)
    options = getattr(model, "moe_lab_options", options)  # what the model says it was built with
    model.train()
    if spec["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hooks = regimes.apply(model, spec["routing"], seed=spec["seed"])
    optimizer = _optimizer(spec, model, device, in_backward=system.optimizer_in_backward,
                           side_stream=system.optimizer_side_stream)
    _sync(device)
    build_s = time.perf_counter() - t_start
    weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    log.info("cell %s: built %s (%s, %d routers hooked) in %.1fs", spec["model"], system.name, attn, len(hooks), build_s)

    samples = []
    vocab = config.vocab_size
    total = spec["warmup"] + spec["steps"]
    for step in range(total):
        ids = _make_batch(spec, vocab, step, rank, system.replicated_input, device)
        if spec["fail_at"] == "step" and step == 1:
            raise RuntimeError("injected failure at step 1 (fail_at='step')")
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()  # (moe_lab expert parallelism reduces its gradients inside backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        samples.append({"step": step, "warmup": step < spec["warmup"], "step_ms": dt * 1e3,
                        "loss": float(out.loss.detach().float().item())})
        del out
    step_ms = _max_over_ranks([s["step_ms"] for s in samples], world, device)
    for s, ms in zip(samples, step_ms):
        s["step_ms"] = ms

    measured = [s["step_ms"] for s in samples if not s["warmup"]]
    med_ms = statistics.median(measured)
    tokens_per_gpu = spec["batch"] * spec["seq"] / (world if system.replicated_input else 1)
    flops_per_gpu = flops.train_step_flops(config, spec["batch"], spec["seq"]) / (world if system.replicated_input else 1)
    hw = provenance.hardware()
    peak = flops.peak_tflops(hw["gpu"]) if device.type == "cuda" else None
    tflops = flops_per_gpu / (med_ms / 1e3) / 1e12
    # gradients persist unless the optimizer frees them in backward; graphed layers keep theirs in
    # the graph's pool either way (moe_lab.training.cuda_graphs)
    static = static_bytes(model, optimizer, grads_persist=system.cuda_graphs or not system.optimizer_in_backward)
    peak_bytes = activation_bytes = peak_reserved_bytes = None
    if device.type == "cuda":
        peak_b = _max_over_ranks([float(torch.cuda.max_memory_allocated(device))], world, device)[0]
        peak_bytes = int(peak_b)
        activation_bytes = peak_bytes - sum(static.values())
        # CUDA graph replays reuse their capture's private pool without allocating, so the allocated
        # peak misses their temporaries; the reserved peak bounds them from above.
        peak_reserved_bytes = int(_max_over_ranks([float(torch.cuda.max_memory_reserved(device))], world, device)[0])
    if spec["trace"]:
        _save_routing_trace(spec, model, optimizer, vocab, rank, system, device, first_step=total)
    for h in hooks:
        h.remove()
    gib = 2.0 ** 30
    metrics = {
        "step_ms": med_ms,
        "step_ms_mean": statistics.fmean(measured),
        "step_ms_min": min(measured),
        "step_ms_max": max(measured),
        "tokens_per_gpu_per_step": tokens_per_gpu,
        "tokens_per_s_per_gpu": tokens_per_gpu / (med_ms / 1e3),
        "tflops_per_gpu": tflops,
        "mfu": (tflops / peak) if peak else None,
        "peak_tflops": peak,
        "peak_gib": peak_bytes / gib if peak_bytes is not None else None,
        "peak_reserved_gib": peak_reserved_bytes / gib if peak_reserved_bytes is not None else None,
        "activation_gib": activation_bytes / gib if activation_bytes is not None else None,
        "weights_after_build_gib": weights_bytes / gib if weights_bytes is not None else None,
        "static_gib": {k: v / gib for k, v in static.items()},
        "first_loss": samples[0]["loss"],
        "final_loss": samples[-1]["loss"],
        "loss_finite": all(math.isfinite(s["loss"]) for s in samples),
    }
    n_params = sum(_local(p).numel() for p in model.parameters()) * (world if system.kind == "v5-fsdp2" else 1)
    return {
        "status": "ok",
        "model_label": models.model_label(spec["model"], spec["layers"]),
        "model_type": config.model_type,
        "attn_implementation": attn,
        "system_kind": system.kind,
        **_system_fields(system, options),
        "world": world,
        "device": device.type,
        "params_approx": n_params,
        "trainable_params": sum(_local(p).numel() for p in model.parameters() if p.requires_grad),
        "moe_lab_stages": ({"backend": getattr(model, "moe_lab_backend", None),
                            "plan": {name: dict(stages) for name, stages in getattr(model, "moe_lab_plan", {}).items()}}
                           if hasattr(model, "moe_lab_backend") else None),
        "flops": {"train_flops_per_token": flops.train_flops_per_token(config, spec["seq"]),
                  "forward_parts_per_token": flops.forward_flops_per_token(config, spec["seq"]),
                  "train_flops_per_step_per_gpu": flops_per_gpu},
        "metrics": metrics,
        "samples": samples,
        "timing_s": {"build": build_s, "total": time.perf_counter() - t_start},
        "hardware": hw,
        "versions": provenance.versions(),
        "git": provenance.git_state(),
        "env": provenance.env_flags(),  # this cell's own switches (a resumed run may differ)
        "autotune": _autotune_choices(),
    }


def _options_used(system):
    """The moe_lab Options a moe_lab system builds with (None for v5 or without moe_lab, whose build
    then fails with the reason)."""
    try:
        return systems.moe_lab_options(system)
    except ImportError:
        return None


def _system_fields(system, options) -> dict:
    """What a record says about its system: ``system_spec`` (the resolved ``SystemSpec``),
    ``options`` (every field of the moe_lab Options used, MOE_LAB_* overrides included; None for
    v5) and ``options_changed`` (those away from their defaults: the summary key's suffix)."""
    import dataclasses

    return {"system_spec": system.to_dict(),
            "options": dataclasses.asdict(options) if options is not None else None,
            "options_changed": options.changed() if options is not None else None}


def _autotune_choices() -> dict:
    """The tiles the Triton autotuner chose in this cell ({} when no Triton kernel ran or Triton is absent)."""
    try:
        from triton_kernels.autotune_choices import autotune_choices
    except ImportError:
        return {}
    return autotune_choices()


def _save_routing_trace(spec, model, optimizer, vocab, rank, system, device, first_step):
    """Train `trace_steps` more steps (untimed, after the measurement) under moe_lab's routing tracer,
    so the trace shows the routing the experts got (regime hooks included), and save it."""
    from moe_lab.analysis.trace import trace_routing

    with trace_routing(model, auto_step=False, start_step=first_step) as tracer:
        for step in range(first_step, first_step + spec["trace_steps"]):
            ids = _make_batch(spec, vocab, step, rank, system.replicated_input, device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracer.next_step()
    tracer.save(spec["trace"])
    log.info("cell: routing trace of %d steps saved to %s", spec["trace_steps"], spec["trace"])


def classify(exc: BaseException) -> str:
    """The status a failure is recorded with."""
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, NotImplementedError):
        return "not_implemented"
    if isinstance(exc, _Unavailable) or name == "BackendUnavailableError":
        return "unavailable"
    return "failed"


def failure_record(spec: dict, status: str, error: str, tb: str = "") -> dict:
    return {"status": status, "error": error, "traceback": tb,
            "model_label": models.model_label(spec["model"], spec["layers"]),
            "hardware": provenance.hardware(), "versions": provenance.versions(), "git": provenance.git_state()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one benchmark cell and write its JSON record.")
    ap.add_argument("--spec", required=True, help="cell spec as JSON, or @path to a JSON file")
    ap.add_argument("--out", required=True, help="where rank 0 writes the record")
    ap.add_argument("--log-level", default=provenance.log_level("INFO"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = args.spec
    spec = json.loads(open(raw[1:]).read() if raw.startswith("@") else raw)
    spec = normalise(spec)
    rank = _dist_env()[0]
    try:
        record = run(spec)
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes a record
        if isinstance(e, KeyboardInterrupt):
            raise
        status = classify(e)
        log.error("cell failed (%s): %s", status, e)
        record = failure_record(spec, status, f"{type(e).__name__}: {e}", traceback.format_exc())
        try:  # what the cell asked for, where that can be said
            system = systems.parse(spec["system"])
            record.update(_system_fields(system, _options_used(system)))
        except Exception:  # noqa: BLE001 - e.g. a bad MOE_LAB_TRITON_PIN: the error above says it
            pass
        code = 3
    record["cell_id"] = cell_id(spec)
    record["spec"] = spec
    if rank == 0:
        store.write_json(args.out, record)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
