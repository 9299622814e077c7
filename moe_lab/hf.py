"""The Hugging Face integration: a drop-in `AutoModelForCausalLM` and v5 experts-registry entries.

`moe_lab.AutoModelForCausalLM.from_pretrained(path, moe_backend="torch")` returns the very v5 model
class (a `PreTrainedModel`: `generate()`, PEFT, the Trainer and `save_pretrained` work as before)
with each sparse MoE block replaced by `MoELayer`. Parameter names and layouts are v5's, so v5's
own loading (per-expert or fused keys, weight conversion) and saving apply unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Mapping

import torch
import torch.nn as nn
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .stages.dispatch import LocalDispatcher
from .families import FAMILIES, UnsupportedModelError, experts_spec_of, is_v5_experts_module
from .stages.experts import first_weight
from .layer import (LayerPlanner, ModelPlan, MoELayer, adapt_experts, auto_trial, run_routed_experts,
                    run_v5_parallel_experts)
from .options import Options, apply_process_settings
from .registry import StageChoice, available_backends, resolve_backend

logger = logging.getLogger(__name__)

MoeBackend = str | Mapping[str, str] | StageChoice | None


def _replace_child(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


def _with_expert_parallel_dispatch(choice: StageChoice, ep_size: int) -> StageChoice:
    """Under expert parallelism a `local` dispatch stage becomes `all2all`; the reverse is refused."""
    dispatch = choice.names["dispatch"]
    if ep_size > 1 and dispatch == "local":
        return choice.with_stage("dispatch", "all2all")
    if ep_size == 1 and dispatch != "local":
        raise ValueError(f"dispatch {dispatch!r} sends rows between ranks: it needs ep_size > 1")
    return choice


def patch_model(model: nn.Module, moe_backend: MoeBackend = None, ep_size: int = 1, fsdp: bool = False,
                options: Options | None = None, **switches) -> nn.Module:
    """Route every sparse MoE block of a v5 model through moe_lab, in place, with `options` (a
    `moe_lab.Options`, or its fields as keyword arguments) applied as `from_pretrained` applies them;
    returns the model. See `_patch_moe_blocks` for what happens to each block."""
    options = Options.build(options, **switches)
    return _finish(model, resolve_backend(moe_backend), ep_size, fsdp, options)


def _moe_targets(model: nn.Module):
    """(family or None, [(name, block or experts module, ExpertsSpec)]) of every sparse MoE block."""
    model_type = getattr(model.config, "model_type", "?")
    family = FAMILIES.get(model_type)
    if family is not None:
        targets = [(n, m, experts_spec_of(m.experts, model_type))
                   for n, m in model.named_modules() if type(m).__name__ == family.block_class]
    else:
        targets = [(n, m, experts_spec_of(m, model_type)) for n, m in model.named_modules() if is_v5_experts_module(m)]
    if not targets:
        other = [n for n, m in model.named_modules() if n.endswith("experts") and isinstance(m, nn.ModuleList)]
        detail = (
            f"its experts ({other[0]}) are a ModuleList of per-expert MLPs, not v5's 3D experts interface"
            if other
            else "it has no sparse MoE block that uses v5's experts interface"
        )
        raise UnsupportedModelError(f"moe_lab cannot run model type {model_type!r}: {detail}")
    return family, targets


def _check_moe_blocks(model: nn.Module, choice: StageChoice, ep_size: int, fsdp: bool, substitute: bool) -> list:
    """Every check `_patch_moe_blocks` makes, changing nothing; returns each block's planned StageChoice
    (placement-independent: devices and dtypes are checked at the first forward)."""
    if fsdp and ep_size <= 1:
        raise ValueError("fsdp=True shards the non-expert parameters of an expert-parallel run: it needs ep_size > 1")
    choice = _with_expert_parallel_dispatch(choice, ep_size)
    model_type = getattr(model.config, "model_type", "?")
    family, targets = _moe_targets(model)
    if ep_size > 1:
        from .parallel.expert_parallel import check_divisible

        for count in sorted({spec.num_experts for _, _, spec in targets}):  # every layer's count must divide
            check_divisible(count, ep_size, model_type)
    routing_features = family.routing(model.config).features() if family is not None else frozenset()
    planned = []
    for _, module, spec in targets:
        experts = module.experts if family is not None else module
        planner = LayerPlanner(choice, model_type, routing_features, spec, substitute, ep_size > 1)
        planned.append(planner.plan_unplaced(first_weight(experts, spec))[1])
    return planned


def _patch_moe_blocks(model: nn.Module, moe_backend: MoeBackend, ep_size: int = 1, fsdp: bool = False,
                      substitute: bool | None = None, checked: bool = False) -> nn.Module:
    """Replace every sparse MoE block of a v5 model, in place.

    A chosen stage that cannot compute a layer (its activation or routing; its device and dtype at
    the first forward) is refused with the reason; with `substitute=True` (the default when no
    backend is named) that stage runs its reference instead, logged as a warning and recorded in
    `model.moe_lab_plan` ({layer: {stage: "runs (asked X: why)"}}).

    Known families (Qwen3-MoE, Mixtral, GPT-OSS, DeepSeek-V3, NemotronH) get `MoELayer`s. Other
    models whose experts use v5's experts interface keep v5's block and router, and compute their
    experts through moe_lab's stages. Anything else raises `UnsupportedModelError`.
    With ep_size > 1 (under torchrun), each rank keeps E/ep_size experts per layer and rows travel
    with the all-to-all dispatcher; with fsdp=True the other parameters are sharded with FSDP2 over
    all ranks (see `moe_lab.parallel.expert_parallel`).
    """
    if substitute is None:
        substitute = moe_backend is None
    choice = resolve_backend(moe_backend)
    if not checked:  # a refused model is left as it was
        _check_moe_blocks(model, choice, ep_size, fsdp, substitute)
    choice = _with_expert_parallel_dispatch(choice, ep_size)
    config = model.config
    model_type = getattr(config, "model_type", "?")
    family, targets = _moe_targets(model)
    ep = None
    if ep_size > 1:
        from .parallel.expert_parallel import make_context

        ep = make_context(ep_size, min(spec.num_experts for _, _, spec in targets), model_type)
    for name, module, spec in targets:
        if family is not None:
            _replace_child(model, name, MoELayer(module, family, config, choice, spec, ep=ep, substitute=substitute))
        else:
            adapt_experts(module, spec, choice, ep=ep, substitute=substitute)
    model.moe_lab_backend = choice.label
    model.moe_lab_plan = ModelPlan(model)
    notes = sorted({f"{stage}: {desc}" for stages in model.moe_lab_plan.values() for stage, desc in stages.items()
                    if "(asked" in desc})
    for note in notes:
        logger.warning("moe_lab: %s MoE layers: %s", model_type, note)
    if ep is not None:  # shards the experts, reduces gradients inside backward (see moe_lab.parallel.expert_parallel)
        from .parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, ep.mesh, fsdp=fsdp)
    logger.info("moe_lab: %d MoE blocks of %s run with backend %s", len(targets), model_type, choice.label)
    return model


# from_pretrained arguments with which transformers applies its own tensor / expert parallel plan
V5_PARALLEL_ARGUMENTS = ("distributed_config", "tp_plan", "device_mesh")


@contextlib.contextmanager
def _patched_when_built(choice: StageChoice, substitute: bool):
    """Within the block, every model transformers builds has its MoE blocks patched at the end of its
    construction (`PreTrainedModel.post_init`), before transformers loads weights and applies a
    parallel plan; a model around an already patched one (the causal LM around its base model) is
    left as it is. Not thread-safe: it swaps `post_init` on the class for the duration."""
    original = transformers.PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not any(isinstance(m, MoELayer) or hasattr(m, "moe_lab_spec") for m in self.modules()):
            _patch_moe_blocks(self, choice, substitute=substitute)
        return result

    transformers.PreTrainedModel.post_init = post_init
    try:
        yield
    finally:
        transformers.PreTrainedModel.post_init = original


def _split_options(options, kwargs: dict) -> tuple[Options, dict]:
    """(Options from ``options`` and any of its field names in ``kwargs``, the remaining kwargs for v5)."""
    fields = {f.name for f in dataclasses.fields(Options)}
    switches = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    return Options.build(options, **switches), kwargs


class AutoModelForCausalLM(transformers.AutoModelForCausalLM):
    """Transformers v5's `AutoModelForCausalLM` with moe_lab's MoE layers: change one import.

    `from_pretrained(path_or_id, moe_backend="torch", options=None, **hf_kwargs)` and
    `from_config(config, moe_backend="torch", options=None, **hf_kwargs)`; `moe_backend` is a backend
    word (see `moe_lab.available_backends()`) or a mapping stage -> backend. `ep_size=N` shards the
    experts over N ranks (see `moe_lab.parallel.expert_parallel`), and `fsdp=True` shards everything else with
    FSDP2. `options` is a `moe_lab.Options` (fused loss, norms, rotary, CUDA graphs, kernel switches);
    its fields may also be given as keyword arguments (`fused_norm=True`).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, moe_backend: MoeBackend = None,
                        ep_size: int = 1, fsdp: bool = False, options: Options | None = None, **kwargs):
        options, kwargs = _split_options(options, kwargs)  # a bad option or backend fails before loading weights
        choice = resolve_backend(moe_backend)
        if ep_size > 1 and not model_args:
            from .parallel.loading import load_local_experts

            model = load_local_experts(pretrained_model_name_or_path, lambda meta: _patch_moe_blocks(
                meta, choice, ep_size=ep_size, substitute=options.substitute or choice.requested is None), **kwargs)
            if model is not None:  # only this rank's experts were read
                return _finish(model, choice, ep_size, fsdp, options, patched=True)
            logger.info("moe_lab: loading %s in full, then keeping this rank's experts", pretrained_model_name_or_path)
        if ep_size == 1 and any(kwargs.get(name) is not None for name in V5_PARALLEL_ARGUMENTS):
            # transformers applies its parallel plan while it builds the model: patch the blocks first,
            # so the forward its plan installs on each experts module is moe_lab's
            substitute = options.substitute or choice.requested is None
            with _patched_when_built(choice, substitute):
                model = transformers.AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args,
                                                                          **kwargs)
            model.moe_lab_backend, model.moe_lab_plan = choice.label, ModelPlan(model)
            return _finish(model, choice, ep_size, fsdp, options, patched=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return _finish(model, choice, ep_size, fsdp, options)

    @classmethod
    def from_config(cls, config, moe_backend: MoeBackend = None, ep_size: int = 1, fsdp: bool = False,
                    options: Options | None = None, **kwargs):
        options, kwargs = _split_options(options, kwargs)
        choice = resolve_backend(moe_backend)
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        return _finish(model, choice, ep_size, fsdp, options)


def _enable(model, name: str) -> None:
    if name == "fused_rope":
        from .training.fused_rope import enable_fused_rope

        enable_fused_rope(model)
    else:
        from .training.fused_norm import enable_fused_norm

        enable_fused_norm(model)


def _why_no_triton_device() -> str | None:
    """Why the default-on Triton options stay off on this machine (None: a CUDA GPU and Triton are here)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    from .stages._requires import why_triton_unavailable

    return why_triton_unavailable()


def _apply_model_option(model, name: str, asked: bool | None) -> str:
    """Turn option `name` on where asked (True: a refusal is raised) or, for None, where it runs and
    computes v5's function (a refusal leaves it off); returns "on", "off" or "off: why"."""
    if asked is False:
        return "off"
    if asked is None:
        why = _why_no_triton_device()
        if why is not None:
            return f"off: {why}"
        try:
            _enable(model, name)
        except ValueError as exc:
            logger.info("moe_lab: %s stays off for %s: %s", name, getattr(model.config, "model_type", "?"), exc)
            return f"off: {exc}"
        return "on"
    _enable(model, name)
    return "on"


def _first_graph_safe_candidate():
    """The first of auto's candidates that runs here and a CUDA graph can replay; ValueError if none."""
    from .auto import CANDIDATES
    from .registry import BackendUnavailableError

    reasons = []
    for label, backend in CANDIDATES:
        try:
            choice = resolve_backend(backend)
        except BackendUnavailableError as exc:
            reasons.append(f"{label}: {exc}")
            continue
        if choice.graph_safe:
            return backend
        reasons.append(f"{label}: not CUDA-graph safe")
    raise ValueError("cuda_graphs: no stages a CUDA graph can replay run here (" + "; ".join(reasons) + ")")


def _graph_safe_auto(choice: StageChoice) -> StageChoice:
    """The "auto" choice restricted to graph-safe candidates (refused here if none runs on this machine)."""
    from .registry import AutoSettings

    _first_graph_safe_candidate()
    return dataclasses.replace(choice, auto=AutoSettings(graph_safe_only=True))


def _finish(model, choice: StageChoice, ep_size: int, fsdp: bool, options: Options, patched: bool = False):
    """Apply the whole-step options around `_patch_moe_blocks`: every check first, then the changes."""
    substitute = options.substitute or choice.requested is None
    if choice.auto is not None and options.cuda_graphs:
        choice = _graph_safe_auto(choice)
    planned = [choice] if patched else _check_moe_blocks(model, choice, ep_size, fsdp, substitute)
    if options.cuda_graphs:
        from .training.cuda_graphs import check_graphable

        if choice.auto is not None:  # auto picks among graph-safe candidates only; check with the first of them
            planned = [resolve_backend(_first_graph_safe_candidate())]
        for names in {tuple(sorted(c.names.items())) for c in planned}:  # what will run, substitutions included
            check_graphable(model, dict(names), ep_size)
    apply_process_settings(options)
    defaults = {}
    for name in ("fused_rope", "fused_norm"):  # before the MoE blocks are replaced (norms inside them too)
        defaults[name] = _apply_model_option(model, name, getattr(options, name))
    model.moe_lab_defaults = {name: state for name, state in defaults.items() if getattr(options, name) is None}
    if not patched:
        _patch_moe_blocks(model, choice, ep_size=ep_size, fsdp=fsdp, substitute=substitute, checked=True)
    elif fsdp:  # loaded expert-parallel by ep_loading: FSDP2 after the norms above, as patch_model does
        from .parallel.expert_parallel import shard_non_experts_fsdp2

        shard_non_experts_fsdp2(model, model.moe_lab_ep)
    if options.fused_cross_entropy:
        from .training.fused_ce import enable_fused_cross_entropy

        enable_fused_cross_entropy(model)
    if options.cuda_graphs:
        from .training.cuda_graphs import enable_cuda_graphs

        enable_cuda_graphs(model)
    model.moe_lab_options = options
    return model


# ---- v5's experts registry: experts_implementation="moe_lab" for vanilla users -------------------
def _experts_forward_for(backend: str):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        state = self.__dict__.get("_moe_lab_registry_state")
        if state is None or state[0] != backend:
            model_type = getattr(self.config, "model_type", "?")
            spec = experts_spec_of(self, model_type)
            planner = LayerPlanner(resolve_backend(backend), model_type, frozenset(), spec, substitute=False,
                                   expert_parallel=False,  # v5's router runs: no routing features to check
                                   hint="load the model with moe_lab.AutoModelForCausalLM(..., substitute=True) to run "
                                        "each stage's reference instead")
            state = (backend, spec, planner)
            self.__dict__["_moe_lab_registry_state"] = state
        _, spec, planner = state
        weight = first_weight(self, spec)
        if "forward" in self.__dict__:  # transformers' parallel plan installed a forward: local ids, this rank's shards
            return run_v5_parallel_experts(hidden_states, top_k_index, top_k_weights, self, spec, planner)
        backward = torch.is_grad_enabled() and weight.requires_grad
        dispatcher = LocalDispatcher()
        choice = planner.choice_for(weight, hidden_states.shape[0], backward, trial=lambda c: auto_trial(
            hidden_states, self, spec, backward, dispatcher, ids=top_k_index, weights=top_k_weights)(c))
        return run_routed_experts(hidden_states, top_k_index, top_k_weights, self, spec, choice, dispatcher)

    forward.__name__ = f"moe_lab_{backend}_experts_forward"
    return forward


def experts_implementation_name(backend: str) -> str:
    """The v5 `experts_implementation` name of a moe_lab backend: "moe_lab" (torch) or "moe_lab_<backend>"."""
    return "moe_lab" if backend == "torch" else f"moe_lab_{backend}"


def register_v5_experts_functions() -> list[str]:
    """Register every moe_lab backend in v5's ALL_EXPERTS_FUNCTIONS; returns the registered names."""
    names = []
    for backend in available_backends():
        name = experts_implementation_name(backend)
        ALL_EXPERTS_FUNCTIONS.register(name, _experts_forward_for(backend))
        names.append(name)
    return names
