"""A cell of a trainer system (``v5-trainer``, ``trainer``, ``trainer-max``): the cell's spec ->
the arguments of ``trainer_script.train`` -> the same record the harness's cells write.

``cell.run`` hands a normalised cell over here when its system's ``loop`` is ``trainer``. What the
cell keys mean for the script: ``model``/``layers`` the config, ``batch``/``seq``/``warmup``/
``steps``/``seed`` the dataset and ``max_steps = warmup + steps``, ``dtype`` bf16 (bf16 parameters and
``TrainingArguments(bf16=True)``) or fp32, ``attn`` the attention implementation, ``ckpt`` the
Trainer's gradient checkpointing (non-reentrant), ``routing`` a regime installed on the routers by a
callback when training begins (``regimes.py``), ``device`` where the model is built (``use_cpu`` on
the CPU), ``fail_at: step`` an injected failure when step 1 begins. The optimizer is the Trainer's
default (``TrainingArguments.optim``, ``adamw_torch_fused``: the cell's ``optimizer`` must name it,
``adamw_fused``), with the Trainer's default learning rate, schedule and gradient clipping (the
cell's ``lr`` is not used; the record's ``trainer`` says what ran). Refused with the reason: other
optimizers, ``dtype: fp16``, routing traces, ``nproc > 1``; ``trainer-max`` without
``moe_lab.fastest`` is recorded ``not_implemented``.

Metrics are the harness's (``cell.py``): median step time of the measured steps (``StepTimer``,
between device synchronisations at the Trainer's ``on_step_begin`` and ``on_step_end``),
tokens/s/GPU, analytic TFLOP/s and MFU (``flops.py``), peak memory since training began, activation
memory = peak - (parameters + gradients + optimizer state), the loss of every step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time

from . import cell, flops, models, provenance, regimes, systems, trainer_script

log = logging.getLogger(__name__)

_DTYPE_BF16 = {"bf16": True, "fp32": False}
# the cell's optimizer names of the Trainer's default optimizers (TrainingArguments.optim)
_OPTIM_NAMES = {"adamw_torch_fused": "adamw_fused", "adamw_torch": "adamw"}


def trainer_default_optimizer() -> str:
    """The installed Trainer's default ``TrainingArguments.optim``."""
    from transformers import TrainingArguments

    return str(next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim"))


def check(spec: dict, system: systems.SystemSpec) -> None:
    """Refuse, with the reason, what the unmodified script does not do."""
    systems.check_world(system, spec["nproc"])
    default = trainer_default_optimizer()
    if spec["optimizer"] != _OPTIM_NAMES.get(default):
        raise ValueError(f"{system.name} trains with the Trainer's default optimizer (TrainingArguments.optim "
                         f"{default!r}, the cell's optimizer {_OPTIM_NAMES.get(default)!r}); the cell asks for "
                         f"optimizer: {spec['optimizer']}")
    if spec["dtype"] not in _DTYPE_BF16:
        raise ValueError(f"{system.name}: dtype must be bf16 or fp32 (the Trainer's bf16 flag), got {spec['dtype']}")
    if spec["trace"]:
        raise ValueError(f"{system.name}: routing traces are the harness loop's; a trainer cell takes none")


def _fastest_available() -> None:
    """NotImplementedYet (status not_implemented) while moe_lab has no ``fastest``."""
    import moe_lab

    if not callable(getattr(moe_lab, "fastest", None)):
        try:
            from moe_lab.training import fastest  # noqa: F401
            elsewhere = " (moe_lab.training.fastest exists: moe_lab does not export it as moe_lab.fastest)"
        except ImportError:
            elsewhere = ""
        raise systems.NotImplementedYet(f"moe_lab.fastest does not exist in the installed moe_lab ({moe_lab.__file__})"
                                        f"{elsewhere}; trainer-max calls moe_lab.fastest(trainer)")


class CellHooks(trainer_script.TrainerCallback):
    """What the harness adds to the script's run: the routing regime on the routers (installed when
    training begins, after any moe_lab.fastest), the injected failure, and the memory in use when
    training begins (the weights)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.hooks: list = []
        self.weights_bytes = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        self.hooks = regimes.apply(model, self.spec["routing"], seed=self.spec["seed"])
        if args.device.type == "cuda":
            self.weights_bytes = torch.cuda.memory_allocated(args.device)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.spec["fail_at"] == "step" and state.global_step == 1:
            raise RuntimeError("injected failure at step 1 (fail_at='step')")

    def regime_ran(self) -> bool:
        """Whether every installed regime hook ran at least once (each caches the ids it forced)."""
        for handle in self.hooks:
            installed = handle.hooks_dict_ref()  # the router's forward hooks (a torch RemovableHandle's weak reference)
            hook = installed.get(handle.id) if installed is not None else None
            if isinstance(hook, regimes.RegimeHook) and not hook._cache:
                return False
        return True

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []


def _unwrapped_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def run(spec: dict, system: systems.SystemSpec, config, *, attn: str, device, t_start: float) -> dict:
    """Run the script for one normalised cell in this process; returns its record (status ok)."""
    import transformers

    check(spec, system)
    if system.library == "v5":
        auto_model = transformers.AutoModelForCausalLM
    else:
        try:
            import moe_lab
        except ImportError as e:
            raise systems.NotImplementedYet(f"moe_lab cannot be imported ({e}); system {system.name} needs it") from e
        auto_model = moe_lab.AutoModelForCausalLM
        if system.fastest:
            _fastest_available()
    extra = CellHooks(spec)
    log.info("cell %s: the Trainer script with %s.AutoModelForCausalLM%s", spec["model"], auto_model.__module__,
             " + moe_lab.fastest(trainer)" if system.fastest else "")
    trainer, timer, output = trainer_script.train(
        auto_model, config, fastest=system.fastest, batch=spec["batch"], seq=spec["seq"], warmup=spec["warmup"],
        steps=spec["steps"], seed=spec["seed"], bf16=_DTYPE_BF16[spec["dtype"]], attn_implementation=attn,
        device=device.type, gradient_checkpointing=spec["ckpt"], callbacks=[extra])
    if spec["routing"] != "real" and not extra.regime_ran():
        raise RuntimeError(f"routing {spec['routing']}: the regime's router hooks never ran in {system.name} "
                           "(the Trainer trained another module than the script's model?); use routing real")
    extra.remove()
    samples = timer.steps
    if len(samples) != spec["warmup"] + spec["steps"]:
        raise RuntimeError(f"the Trainer ran {len(samples)} steps, the cell asked for {spec['warmup']} + {spec['steps']}")
    model = trainer.model
    optimizer = _unwrapped_optimizer(trainer.optimizer)
    options = getattr(model, "moe_lab_options", None) if system.library == "moe_lab" else None
    decisions = getattr(model, "moe_lab_fastest", None)  # moe_lab.fastest's record: {switch: "on ..." | "off: why"}
    in_backward = str((decisions or {}).get("optimizer_in_backward", "")).startswith("on")
    graphs = bool(getattr(options, "cuda_graphs", False))

    measured = timer.measured_ms()
    med_ms = statistics.median(measured)
    tokens = spec["batch"] * spec["seq"]
    step_flops = flops.train_step_flops(config, spec["batch"], spec["seq"])
    hw = provenance.hardware()
    peak = flops.peak_tflops(hw["gpu"]) if device.type == "cuda" else None
    tflops = step_flops / (med_ms / 1e3) / 1e12
    # gradients persist unless the optimizer steps inside backward; graphed layers keep theirs in the
    # graph's pool (as cell.py counts them)
    static = cell.static_bytes(model, optimizer, grads_persist=graphs or not in_backward)
    gib = 2.0 ** 30
    # CUDA graph replays allocate nothing, so the allocated peak misses their temporaries: as for the
    # harness's -graphs rows, only the reserved peak (an upper bound) is kept
    peak_bytes = None if graphs else timer.peak_bytes
    losses = [s["loss"] for s in samples]
    gaps = [s["gap_ms"] for s in samples if not s["warmup"] and s["gap_ms"] is not None]
    metrics = {
        "step_ms": med_ms,
        "step_ms_mean": statistics.fmean(measured),
        "step_ms_min": min(measured),
        "step_ms_max": max(measured),
        "gap_ms": statistics.median(gaps) if gaps else None,  # between steps: the next batch, the Trainer's bookkeeping
        "tokens_per_gpu_per_step": tokens,
        "tokens_per_s_per_gpu": tokens / (med_ms / 1e3),
        "tflops_per_gpu": tflops,
        "mfu": (tflops / peak) if peak else None,
        "peak_tflops": peak,
        "peak_gib": peak_bytes / gib if peak_bytes is not None else None,
        "peak_reserved_gib": timer.peak_reserved_bytes / gib if timer.peak_reserved_bytes is not None else None,
        "activation_gib": (peak_bytes - sum(static.values())) / gib if peak_bytes is not None else None,
        "weights_after_build_gib": extra.weights_bytes / gib if extra.weights_bytes is not None else None,
        "static_gib": {k: v / gib for k, v in static.items()},
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_finite": all(x is not None and math.isfinite(x) for x in losses),
        "train_runtime_s": _number(output.metrics.get("train_runtime")),  # trainer.train()'s own clock, every step
    }
    args = trainer.args
    return {
        "status": "ok",
        "model_label": models.model_label(spec["model"], spec["layers"]),
        "model_type": config.model_type,
        "attn_implementation": attn,
        "system_kind": system.kind,
        **_system_fields(system, options),
        "world": 1,
        "device": device.type,
        "params_approx": sum(p.numel() for p in model.parameters()),
        "moe_lab_stages": ({"backend": getattr(model, "moe_lab_backend", None),
                            "plan": {name: dict(stages) for name, stages in getattr(model, "moe_lab_plan", {}).items()}}
                           if hasattr(model, "moe_lab_backend") else None),
        "trainer": {"script": "experiments/trainer_script.py",
                    "auto_model": f"{auto_model.__module__}.{auto_model.__qualname__}",
                    "fastest": system.fastest,
                    "optim": _text(args.optim),
                    "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                    "learning_rate": args.learning_rate, "lr_scheduler_type": _text(args.lr_scheduler_type),
                    "max_grad_norm": args.max_grad_norm, "bf16": args.bf16, "max_steps": args.max_steps,
                    "per_device_train_batch_size": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
                    "gradient_checkpointing": bool(spec["ckpt"]),
                    # the Options in force away from Options()'s defaults: what moe_lab decided for this
                    # model (automatic defaults) and, for trainer-max, what moe_lab.fastest switched on
                    "options_changed": options.changed() if options is not None else None,
                    "moe_lab_defaults": _plain(getattr(model, "moe_lab_defaults", None)),
                    "fastest_decisions": _plain(decisions),
                    "train_loss": output.training_loss, "global_step": output.global_step},
        "flops": {"train_flops_per_token": flops.train_flops_per_token(config, spec["seq"]),
                  "forward_parts_per_token": flops.forward_flops_per_token(config, spec["seq"]),
                  "train_flops_per_step_per_gpu": step_flops},
        "metrics": metrics,
        "samples": samples,
        "timing_s": {"total": time.perf_counter() - t_start},
        "hardware": hw,
        "versions": provenance.versions(),
        "git": provenance.git_state(),
        "env": provenance.env_flags(),
        "autotune": cell._autotune_choices(),
    }


def _text(value) -> str:
    """An enum's value (TrainingArguments keeps ``optim`` and ``lr_scheduler_type`` as enums) or the string."""
    return str(getattr(value, "value", value))


def _number(value):
    return float(value) if value is not None else None


def _plain(value):
    """``value`` as JSON can hold it (what a model records about itself; strings for the rest)."""
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _system_fields(system: systems.SystemSpec, options) -> dict:
    """``system_spec``, ``options`` and ``options_changed`` as the harness's cells record them
    (``options``: the model's ``moe_lab_options`` after training, the Options in force). A trainer
    system's Options are the system's own: the script passes none, moe_lab reads no environment
    variable, and what moe_lab decides per model (or ``moe_lab.fastest`` switches on) is what the
    system is. So ``options_changed``, the summary key's suffix, is empty (the key stays
    ``.../trainer``, ``.../trainer-max``) and ``trainer.options_changed`` lists them."""
    fields = cell._system_fields(system, options)
    if options is not None:
        fields["options_changed"] = {}
    return fields
