"""moe_lab's fastest training mode as one line: ``fastest(trainer)``.

    model = moe_lab.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)   # moe_backend="auto"
    args = transformers.TrainingArguments(..., max_grad_norm=0)   # no clipping: the optimizer steps in backward
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    fastest(trainer)     # after Trainer(...) and after the arguments are final, before train()
    trainer.train()

It switches on everything of the fastest recorded step that needs a contract with the training loop,
each where it can apply. What cannot apply to this model, machine or Trainer is skipped with a
warning that says why, and every decision is recorded on the model:
``model.moe_lab_fastest`` = {"moe_backend": ..., "fused_rope": "off: <why>", "fused_norm": "on",
"fused_cross_entropy": ..., "cuda_graphs": ..., "optimizer": ..., "optimizer_in_backward": ...}, each
switch "on", "on (<note>)", "on (at load)" (what the model was loaded with) or "off: <why>", and
``model.moe_lab_options`` becomes the `moe_lab.Options` in force. It cannot change the MoE backend of
a loaded model (recorded as "moe_backend"). On the default ``"auto"`` backend, called before the first
forward, it makes every MoE layer choose, measured, between graph-safe stages captured in the CUDA
graphs and its fastest stages run eagerly (see ``cuda_graphs`` below); a named backend that is not
graph-safe keeps CUDA graphs off, with the reason.

What a v5 user can observe, item by item:

* ``fused_cross_entropy``: a forward with ``labels`` returns the loss and EMPTY logits [B, 0, V], in
  training and in evaluation (no full logits are ever held); without labels (``generate()``,
  inference) nothing changes. The loss is v5's up to float rounding. Skipped where the Trainer reads
  the logits (label smoothing, ``compute_loss_func``, ``compute_metrics`` or
  ``preprocess_logits_for_metrics``); a Trainer subclass whose ``compute_loss`` reads
  ``outputs.logits`` must not use this mode. Off the devices where Triton runs, the loss is chunked
  in PyTorch (still no full logits).
* Under expert parallelism (``ep_size``) the fused loss, norms and rotary apply as in one process
  (each rank computes its own batch's; tests/test_ep_options.py holds EP=2 and EP=4 to one process).
* ``fused_norm``, ``fused_rope``: RMSNorm and rotary embedding as Triton kernels; outputs equal v5's
  up to rounding. Need Triton on the training device. ``fused_rope`` takes the rotate-half form,
  GPT-OSS's half-width form and DeepSeek-V3's interleaved pairs (over whole heads, or MLA's rotary
  part); it refuses files whose rotary is none of these, and partial rotary factors.
* ``cuda_graphs``: decoder layers replayed from CUDA graphs captured at the first training step
  (see `moe_lab.training.cuda_graphs`). Needs CUDA, one process, graph-safe MoE stages
  (``"auto"`` before the first forward, ``"triton"`` or ``"triton_gather"``), no gradient checkpointing, no
  ``output_router_logits``, no expert parallelism (its all-to-all's sizes change every step:
  `moe_lab.training.cuda_graphs` says what a graph under EP would have to leave out). On ``"auto"``
  each MoE layer chooses at the first training step, by measuring this step's own shapes: its best
  graph-safe stages replayed from a CUDA graph, or its best stages of all run eagerly, the layer
  then left out of the capture while the others are captured (graphs pay off on many small experts
  such as Qwen3-30B-A3B's, torch's grouped_mm run eagerly can win on a few big ones such as
  Mixtral-8x7B's). From that step on ``model.moe_lab_fastest["cuda_graphs"]`` says which layers are
  captured and why, e.g. "on (31 of 32 layers captured; ...; layer 5 eager: triton_routing+torch_experts
  1.920 ms vs graph-safe triton replayed 2.310 ms)", and each layer's ``model.moe_lab_plan[...]["auto"]``
  holds both timings. Where replays cannot be timed (Triton's interpreter, the CPU tests' emulated
  graphs) the layers keep graph-safe stages only and are all captured, and the record says the
  replays were not measured. The contract on the data, which only training can check: STATIC SHAPES
  (every batch the same [batch, seq]: fixed-length or packed sequences, ``dataloader_drop_last=True``;
  a new shape recaptures, slowly) and no attention-mask tensor in the batches (full sequences; a
  batch with one runs its layers eagerly, with a warning). Under the Trainer's mixed precision
  (``bf16=True``) the autocast cache of cast weights is turned off (a capture cannot take it; the
  casts are the same, redone at each use). It sets ``config.use_cache = False`` (so
  a saved config says so; pass ``use_cache=True`` to ``generate``). Python hooks inside the layers
  run at the capture only; do not move or re-create parameters after the first step. Memory: the
  graphs keep every layer's activations and parameter gradients in a pool of their own.
* The optimizer: ``TritonAdamW`` (one Triton kernel per parameter; PyTorch's AdamW formula, float32
  arithmetic, moments in the parameter dtype) replaces the Trainer's AdamW (``args.optim`` "adamw_torch"
  or "adamw_torch_fused", the default), with the Trainer's learning rate, betas, epsilon, its
  weight-decay / no-weight-decay parameter groups (``Trainer.get_decay_parameter_names``, so a
  subclass's override counts) and its LR scheduler. The Trainer's checkpoints hold TritonAdamW's
  ``state_dict`` (torch AdamW's keys; ``step`` an int). FSDP2's sharded (DTensor) parameters are
  updated through their local shards, with DTensor moments as torch's AdamW keeps them.
* The optimizer inside backward (`TritonAdamWInBackward`), where the training loop allows it: one
  process or a moe_lab expert-parallel model (``ep_size``, with or without ``fsdp=True``; under the
  Trainer's DDP too: each update runs after its gradient's reduction, see
  `moe_lab.parallel.expert_parallel`), ``gradient_accumulation_steps == 1``, no gradient clipping (``max_grad_norm=0``; the
  Trainer's DEFAULT is 1.0, which keeps the step after backward), no fp16 loss scaling, no gradient
  checkpointing. Then each parameter is updated during ``backward()`` as soon as its gradient is
  complete and the gradient is freed: after backward every ``.grad`` is None (callbacks such as
  ``on_pre_optimizer_step`` see no gradients; a ``grad_norm`` the Trainer logs is 0), and on CUDA the updates
  run on a second stream beside backward, so parameters are consistent only after
  ``optimizer.step()`` (the Trainer's loop calls it before anything else reads them). The
  scheduler's learning rate reaches every update: each reads its group's ``lr`` when its gradient
  arrives, which in the Trainer's loop is the lr that ``optimizer.step()`` would have used. Where
  the loop does not allow it, TritonAdamW steps after backward as usual (clipping works), and
  ``model.moe_lab_fastest["optimizer_in_backward"]`` says why.
* No TritonAdamW where it cannot run (Triton not installed; the CPU without Triton's interpreter;
  DeepSpeed) or where the Trainer was given another optimizer (``optimizers=``,
  ``optimizer_cls_and_kwargs``, another ``args.optim``): the Trainer's own optimizer then runs,
  recorded. Refusing instead would make this one line fail on a development machine where every
  other switch is skipped and the script otherwise runs; a user who wants the fast optimizer or
  nothing checks ``model.moe_lab_fastest["optimizer"]``.

Why the optimizer needs the Trainer, not only the model: the model alone could register gradient
hooks that update each parameter and free its gradient (the Trainer's AdamW then finds no gradient
and steps nothing), but it would not know the Trainer's learning rate, its LR schedule (bound to the
Trainer's optimizer), its weight-decay groups or whether the loop clips or accumulates gradients,
and the optimizer state would be missing from the Trainer's checkpoints. So the fast optimizer is
given to the Trainer, through its own ``optimizer_cls_and_kwargs``: the Trainer still builds the
parameter groups, accelerate wraps the optimizer and the scheduler is built on it, at the time the
Trainer creates its optimizer in ``train()``.

``fast_optimizer(params, ...)`` is the same optimizer for a training loop of one's own.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import weakref

import torch
from torch import nn

from ..options import Options
from ..registry import resolve_backend
from .optim import TritonAdamW, TritonAdamWInBackward

log = logging.getLogger(__name__)

MODEL_SWITCHES = ("fused_rope", "fused_norm", "fused_cross_entropy", "cuda_graphs")  # applied in this order, as at load
TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused")  # the Trainer's AdamW choices that TritonAdamW replaces


def fastest(trainer):
    """Switch ``trainer`` (a ``transformers.Trainer`` whose model was loaded with
    ``moe_lab.AutoModelForCausalLM``) to moe_lab's fastest mode, in place; returns it. Call it after
    ``Trainer(...)`` and before ``trainer.train()``. See the module docstring for what changes and the
    contract (static shapes for CUDA graphs; no clipping for the optimizer in backward); what was
    applied and what was skipped, and why, is in ``trainer.model.moe_lab_fastest``."""
    model = _moe_lab_model(trainer)
    devices = _training_devices(trainer, model)
    options = model.moe_lab_options
    record = {"moe_backend": str(getattr(model, "moe_lab_backend", "?"))}
    in_force = {}
    for name in MODEL_SWITCHES:
        if getattr(options, name):
            record[name] = "on (at load)"
            continue
        reason, note = _WHY_NOT[name](trainer, model, devices), None
        if reason is None:
            try:
                note = _ENABLE[name](trainer, model, devices)
            except ValueError as exc:  # the enabling functions check everything before changing anything
                reason = str(exc)
        if reason is not None:
            record[name] = f"off: {reason}"
            log.warning("moe_lab.fastest: %s skipped: %s", name, reason)
        else:
            record[name] = "on" if note is None else f"on ({note})"
            in_force[name] = True
            if note is not None:
                log.warning("moe_lab.fastest: %s on: %s", name, note)
    optimizer, optimizer_record = _optimizer_plan(trainer, model, devices)
    record.update(optimizer_record)
    key = "optimizer" if optimizer is None else "optimizer_in_backward"
    if record[key].startswith("off"):
        log.warning("moe_lab.fastest: %s %s", key, record[key])
    if optimizer is not None:
        trainer.optimizer_cls_and_kwargs = optimizer  # the Trainer makes it from its own parameter groups in train()
    elif _ours(getattr(trainer, "optimizer_cls_and_kwargs", None)):
        trainer.optimizer_cls_and_kwargs = None  # an earlier call's choice no longer holds
    model.moe_lab_options = dataclasses.replace(options, **in_force)
    model.moe_lab_fastest = record
    log.info("moe_lab.fastest: %s", record)
    return trainer


def fast_optimizer(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 1e-2, *, in_backward: bool = True,
                   side_stream: bool | None = None) -> torch.optim.Optimizer:
    """The fastest mode's optimizer for a training loop of one's own: TritonAdamW over ``params``
    (a module's trainable parameters, or parameters / parameter groups as any torch optimizer takes
    them; give groups for a weight-decay split).

    ``in_backward=True``: `TritonAdamWInBackward`, which updates each parameter inside backward; the
    loop must run one backward per step, clip no gradient, accumulate none, and run in one process or
    on a moe_lab expert-parallel model (whose reduction each update follows; FSDP2's shards after their
    reduce-scatter); ``optimizer.step()`` and ``zero_grad()`` stay in the loop: they wait for the updates.
    ``side_stream`` (None: on where every parameter is on CUDA) runs those updates on a second CUDA
    stream. ``in_backward=False``: `TritonAdamW`, stepped by ``optimizer.step()`` as usual."""
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = [{**item, "params": _listed(item["params"])} if isinstance(item, dict) else item for item in params]
    if not in_backward:
        if side_stream:
            raise ValueError("fast_optimizer: side_stream=True needs in_backward=True")
        return TritonAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if side_stream is None:
        side_stream = all(p.device.type == "cuda" for p in _tensors_of(params))
    return TritonAdamWInBackward(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 side_stream=side_stream)


def _listed(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _tensors_of(params: list) -> list[torch.Tensor]:
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


# ---- what the Trainer and the model allow --------------------------------------------------------------
def _moe_lab_model(trainer) -> nn.Module:
    if getattr(trainer, "model_init", None) is not None:
        raise ValueError("moe_lab.fastest: this Trainer builds a new model in train() (model_init), which would "
                         "drop the changes; load the model in model_init with moe_lab.Options(...) instead")
    model = trainer.model
    if not isinstance(model.__dict__.get("moe_lab_options"), Options):
        raise TypeError(f"moe_lab.fastest: trainer.model ({type(model).__name__}) was not loaded with "
                        "moe_lab.AutoModelForCausalLM (a wrapped model, e.g. PEFT's, is not supported)")
    return model


def _training_devices(trainer, model) -> set[torch.device]:
    """The devices the model trains on: the Trainer's device where it places the model, else the parameters'."""
    if getattr(trainer, "place_model_on_device", False):
        return {torch.device(trainer.args.device)}
    return {p.device for p in model.parameters()}


def _names(devices) -> str:
    return ", ".join(sorted(str(d) for d in devices))


def _why_triton_cannot_run(devices) -> str | None:
    try:
        from triton_kernels._common import runs_on
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    if not all(runs_on(d) for d in devices):
        return (f"Triton does not run on {_names(devices)} here (it runs on CUDA, or on the CPU under Triton's "
                "interpreter, TRITON_INTERPRET=1)")
    return None


def _why_not_one_process(trainer, model) -> str | None:
    """None if the Trainer runs the model in one process on one device, itself (no DeepSpeed/FSDP)."""
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "DeepSpeed runs the model and its optimizer"
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP shards the model"
    if args.world_size > 1:
        return f"{args.world_size} processes train (this needs one)"
    if args.n_gpu > 1:
        return f"the Trainer replicates the model over {args.n_gpu} GPUs (DataParallel)"
    if getattr(model, "moe_lab_ep", None) is not None:
        return "the experts are sharded over processes (expert parallelism)"
    return None


def _why_not_expert_parallel_loop(trainer, model) -> str | None:
    """None if, under moe_lab's expert parallelism, every gradient is reduced where the optimizer in
    backward can follow it: moe_lab's reducer (expert shards, replicated parameters), the DDP the
    Trainer wraps the model in, or FSDP2 (``fsdp=True``: its reduce-scatter runs the shards' hooks)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "DeepSpeed runs the model and its optimizer"
    if getattr(trainer, "is_fsdp_enabled", False):
        return "the Trainer's own FSDP shards the model (on top of expert parallelism)"
    if trainer.args.n_gpu > 1:
        return f"the Trainer replicates the model over {trainer.args.n_gpu} GPUs (DataParallel)"
    if getattr(model.moe_lab_ep, "fsdp_mesh", None) is not None:  # lifted only where a test holds it
        return ("the Trainer over moe_lab's FSDP2 sharding (fsdp=True) is not covered by a test (in a loop of one's "
                "own, fast_optimizer steps in backward there)")
    reducer = getattr(model, "moe_lab_grad_reducer", None)
    if reducer is None or not reducer.enabled:
        return "the automatic gradient reduction of the expert-parallel model is off (moe_lab_grad_reducer.enabled)"
    return None


def _why_not_fused_cross_entropy(trainer, model, devices) -> str | None:
    try:
        import triton_kernels._common  # noqa: F401 - the loss asks it where Triton runs
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    if getattr(trainer, "label_smoother", None) is not None:
        return (f"the Trainer computes a label-smoothed loss from the logits (label_smoothing_factor="
                f"{trainer.args.label_smoothing_factor})")
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "the Trainer's compute_loss_func computes the loss from the logits"
    if getattr(trainer, "compute_metrics", None) is not None or getattr(trainer, "preprocess_logits_for_metrics", None):
        return ("evaluation's compute_metrics / preprocess_logits_for_metrics read logits, which the fused loss "
                "does not return")
    return None


def _why_not_fused_kernel(trainer, model, devices) -> str | None:
    return _why_triton_cannot_run(devices)


def _why_not_cuda_graphs(trainer, model, devices) -> str | None:
    from .cuda_graphs import _graph_device, check_graphable

    if getattr(model, "moe_lab_ep", None) is not None:  # the reason on any device
        from .cuda_graphs import EXPERT_PARALLEL_REASON

        return EXPERT_PARALLEL_REASON
    if not all(_graph_device(torch.empty(0, device=d)) for d in devices):
        return f"the model trains on {_names(devices)}; CUDA graphs need CUDA"
    reason = _why_not_one_process(trainer, model)
    if reason is not None:
        return reason
    reason = _why_checkpointing(trainer, model)
    if reason is not None:
        return f"{reason} recomputes layers outside the graphs"
    try:
        stage_sets = set()
        for planner, weight in _layer_planners(model):
            if planner.asked.auto is not None:
                if planner.decision is not None and not planner.asked.auto.graph_safe_only:
                    return ('the "auto" backend already chose this model\'s stages (a forward ran) among some a CUDA '
                            'graph cannot replay; call fastest() before the first forward, or load with '
                            'cuda_graphs=True or moe_backend="triton"')
                from ..hf import _first_graph_safe_candidate

                # a graph-safe candidate must run here (an auto layer may still choose to stay eager)
                stage_sets.add(tuple(sorted(resolve_backend(_first_graph_safe_candidate()).names.items())))
                continue
            stage_sets.add(tuple(sorted(planner.choice_for(weight).names.items())))  # on the weight's device
        for names in sorted(stage_sets):
            check_graphable(model, dict(names))
    except ValueError as exc:
        return str(exc)
    return None


def _why_checkpointing(trainer, model) -> str | None:
    """The activation (gradient) checkpointing the model has or the Trainer will switch on, if any."""
    args = trainer.args
    if getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None):
        return "gradient checkpointing (args.activation_checkpointing / gradient_checkpointing)"
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return "gradient checkpointing (on in the model)"
    return None


def _layer_planners(model) -> list:
    """(planner, first expert weight) of every MoE layer moe_lab runs (the layers `ModelPlan` reads)."""
    from ..layer import moe_layers_in
    from ..stages.experts import first_weight

    return [(planner, first_weight(experts, planner.spec)) for planner, experts in moe_layers_in(model).values()]


_WHY_NOT = {"fused_cross_entropy": _why_not_fused_cross_entropy, "fused_norm": _why_not_fused_kernel,
            "fused_rope": _why_not_fused_kernel, "cuda_graphs": _why_not_cuda_graphs}


# ---- the model-side switches, through the functions `moe_lab.hf._finish` applies at load ------------------
def _enable_fused_cross_entropy(trainer, model, devices) -> str | None:
    from .fused_ce import enable_fused_cross_entropy

    enable_fused_cross_entropy(model)
    reason = _why_triton_cannot_run(devices)
    return None if reason is None else f"its row kernels in PyTorch: {reason}"


def _enable_fused_norm(trainer, model, devices) -> None:
    from .fused_norm import enable_fused_norm

    enable_fused_norm(model)


def _enable_fused_rope(trainer, model, devices) -> None:
    from .fused_rope import enable_fused_rope

    enable_fused_rope(model)


GRAPH_CHOICE_NOTE = ('each "auto" MoE layer chooses at the first training step between its graph-safe stages '
                     'replayed in a CUDA graph and its fastest stages run eagerly, uncaptured (measured); this '
                     'record then says which')


def _enable_cuda_graphs(trainer, model, devices) -> str | None:
    from .cuda_graphs import enable_cuda_graphs

    # "auto" layers: graph-safe stages captured, or their fastest stages run eagerly, decided at the capture
    choosing = [planner.choose_under_graphs() for planner, _ in _layer_planners(model)]
    enable_cuda_graphs(model)
    autocast_note = _autocast_without_cache(trainer)
    if not any(choosing):
        return autocast_note
    model.moe_lab_cuda_graphs.on_capture = functools.partial(_record_capture, weakref.ref(model), autocast_note)
    return "; ".join(note for note in (GRAPH_CHOICE_NOTE, autocast_note) if note)


def _record_capture(model_ref, autocast_note: str | None, graphs) -> None:
    """After each capture: ``model.moe_lab_fastest["cuda_graphs"]`` says which layers the graphs hold and why."""
    model = model_ref()
    record = None if model is None else getattr(model, "moe_lab_fastest", None)
    if isinstance(record, dict):
        record["cuda_graphs"] = "on (" + "; ".join(n for n in (graphs.summary(), autocast_note) if n) + ")"


def _autocast_without_cache(trainer) -> str | None:
    """Mixed precision (args.bf16 / fp16): accelerate wraps the forward in torch.autocast, whose cache
    of cast weights a graph capture cannot take (the layers would run eagerly every step). Turn the
    cache off in the Trainer's accelerator (the casts are the same, redone at each use); what was done."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None or not getattr(accelerator, "native_amp", False):
        return None
    handler = getattr(accelerator, "autocast_handler", None)
    if handler is not None and handler.cache_enabled is False:
        return None
    from accelerate.utils import AutocastKwargs

    accelerator.autocast_handler = AutocastKwargs(enabled=True if handler is None else handler.enabled,
                                                  cache_enabled=False)
    return ("the Trainer's mixed-precision autocast now keeps no cache of cast weights, which a capture cannot "
            "take; the casts are the same")


_ENABLE = {"fused_cross_entropy": _enable_fused_cross_entropy, "fused_norm": _enable_fused_norm,
           "fused_rope": _enable_fused_rope, "cuda_graphs": _enable_cuda_graphs}


# ---- the optimizer -------------------------------------------------------------------------------------------
def _optimizer_plan(trainer, model, devices) -> tuple[tuple | None, dict]:
    """((optimizer class, kwargs) for the Trainer's optimizer_cls_and_kwargs, or None), and the record."""
    reason = _why_no_triton_adamw(trainer, model, devices)
    if reason is not None:
        return None, {"optimizer": f"off: {reason}; the Trainer's own optimizer runs",
                      "optimizer_in_backward": "off: TritonAdamW is off"}
    args = trainer.args
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    on = "on (TritonAdamW with the Trainer's lr, betas, eps, weight-decay groups and LR scheduler)"
    reason = _why_not_in_backward(trainer, model)
    if reason is not None:
        return (TritonAdamW, kwargs), {"optimizer": on,
                                       "optimizer_in_backward": f"off: {reason}; TritonAdamW steps after backward"}
    side_stream = all(d.type == "cuda" for d in devices)
    where = ("on a second CUDA stream" if side_stream
             else f"inline: a side stream needs CUDA, the model is on {_names(devices)}")
    if getattr(model, "moe_lab_ep", None) is not None:
        where += ("; each update after its gradient's reduction: FSDP2 shards after their reduce-scatter, expert "
                  "shards and replicated parameters after moe_lab's all-reduce or DDP's")
    return (TritonAdamWInBackward, {**kwargs, "side_stream": side_stream}), {"optimizer": on,
                                                                             "optimizer_in_backward": f"on ({where})"}


def _why_no_triton_adamw(trainer, model, devices) -> str | None:
    args = trainer.args
    if trainer.optimizer is not None:
        return "trainer.optimizer is already set (given with optimizers=, or made by an earlier train())"
    given = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if given is not None and not _ours(given):
        return f"the Trainer was given optimizer_cls_and_kwargs ({getattr(given[0], '__name__', given[0])})"
    optim = getattr(args.optim, "value", args.optim)
    if optim not in TORCH_ADAMW:
        return f"args.optim={optim!r} is not torch's AdamW, which TritonAdamW replaces"
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "DeepSpeed builds its own optimizer"
    return _why_triton_cannot_run(devices)  # DTensors (FSDP2 shards) are updated through their local shards


def _ours(optimizer_cls_and_kwargs) -> bool:
    return optimizer_cls_and_kwargs is not None and optimizer_cls_and_kwargs[0] in (TritonAdamW, TritonAdamWInBackward)


def _why_not_in_backward(trainer, model) -> str | None:
    args = trainer.args
    if getattr(model, "moe_lab_ep", None) is not None:
        reason = _why_not_expert_parallel_loop(trainer, model)
    else:
        reason = _why_not_one_process(trainer, model)
    if reason is not None:
        return f"{reason}: gradients are reduced across processes or replicas before the step"
    if args.gradient_accumulation_steps > 1:
        return (f"gradient accumulation (gradient_accumulation_steps={args.gradient_accumulation_steps}) steps on "
                "the summed gradients")
    if args.max_grad_norm:
        return (f"gradient clipping (max_grad_norm={args.max_grad_norm}; the Trainer's default is 1.0) needs every "
                "gradient before any update; max_grad_norm=0 steps inside backward")
    if args.fp16:
        return "fp16 loss scaling unscales the gradients after backward"
    reason = _why_checkpointing(trainer, model)
    if reason is not None:
        return f"{reason} may accumulate a parameter's gradient more than once per backward"
    return None
