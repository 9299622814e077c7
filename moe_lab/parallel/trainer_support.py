"""The HF Trainer and accelerate with an expert-parallel model, with no call from the user.

Both assume that every rank holds the whole model; under moe_lab's expert parallelism each rank holds
its own shard of the experts (plain tensors) and a copy of everything else. Two places go wrong, and
`install_trainer_support` (run when `apply_expert_parallel` makes a model expert-parallel, once per
process) wraps them on the classes; any model that is not expert-parallel goes through unchanged:

- Saving. ``transformers.Trainer.save_model`` (``trainer.save_model()``, every checkpoint of
  ``save_strategy``, ``push_to_hub``) runs on every rank but calls the model's ``save_pretrained`` on
  the writing process only. Wrapped: every rank first gathers the full state dict (kept only where
  ``args.should_save``), the Trainer's own ``save_model`` writes it through ``save_pretrained`` (no
  collective there), and all ranks wait for the write.
- Gradient clipping and the logged ``grad_norm``. The Trainer clips (``max_grad_norm``, default 1.0)
  and measures the norm it logs through ``accelerate.Accelerator.clip_grad_norm_`` (or, where the
  gradients mix DTensors of several meshes, ``Trainer._mixed_mesh_grad_norm``), which computes the
  norm of this rank's gradients: its expert shards only, a different norm and clip factor on every
  rank, so the replicated weights drift apart. Wrapped: for parameters of an expert-parallel model
  both go to `expert_parallel.clip_expert_parallel_grads_`, the norm one process computes (each
  expert shard counted once over the ep group, replicated parameters once, FSDP2's DTensors over
  their mesh) and the same clip factor on every rank (after accelerate's unscaling of fp16
  gradients, as accelerate does). An accelerate script's ``accelerator.clip_grad_norm_(
  model.parameters(), max_norm)`` gets the same. Under accelerate's own FSDP, DeepSpeed, XLA or
  Megatron-LM (which manage the gradients themselves) an expert-parallel model is refused.

Checked against transformers 5.17 and 5.25 (accelerate 1.16). A Trainer subclass that overrides
``save_model`` or its clipping without calling these is not covered: there, save with
``model.save_pretrained`` on every rank and clip with `moe_lab.parallel.clip_grad_norm_`.

Why not transformers 5.25's ``is_distributed_loading_by_transformers`` flag, which keeps every rank in
``Trainer._save``: it also makes the Trainer broadcast every trainable parameter that is not a DTensor
from rank 0 at the start of ``train()`` (``Trainer._sync_replicated_trainable_parameters``), which would
overwrite every rank's expert shards with rank 0's and average their gradients over all ranks;
transformers 5.17 has no such flag.
"""
from __future__ import annotations

import functools

import torch.distributed as dist

from .expert_parallel import clip_expert_parallel_grads_, expert_parallel_context_of, full_state_dict

_MARK = "_moe_lab_expert_parallel"  # set on each installed wrapper: install once


def install_trainer_support() -> None:
    """Wrap ``Trainer.save_model``, ``Trainer._mixed_mesh_grad_norm`` and ``Accelerator.clip_grad_norm_``
    for expert-parallel models (see the module doc); does nothing where one is installed already or
    the library is missing (then nothing can call it)."""
    try:
        from accelerate import Accelerator
    except ImportError:
        pass
    else:
        _wrap(Accelerator, "clip_grad_norm_", _accelerator_clip_grad_norm_)
    try:
        from transformers.trainer import Trainer
    except ImportError:
        return
    _wrap(Trainer, "save_model", _trainer_save_model)
    if hasattr(Trainer, "_mixed_mesh_grad_norm"):  # 5.17 and 5.25; a Trainer without it never goes there
        _wrap(Trainer, "_mixed_mesh_grad_norm", _trainer_mixed_mesh_grad_norm)


def _wrap(cls, name: str, make) -> None:
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)


def _expert_parallel_model(model):
    """The expert-parallel moe_lab model that ``model`` is (or compiles), else None."""
    for candidate in (model, getattr(model, "_orig_mod", None)):
        if candidate is not None and getattr(candidate, "moe_lab_ep", None) is not None:
            return candidate
    return None


def _trainer_save_model(original):
    def save_model(self, output_dir=None, _internal_call=False):
        model = _expert_parallel_model(self.model)
        if model is None:
            return original(self, output_dir, _internal_call)
        model._moe_lab_gathered_state = full_state_dict(model, model.moe_lab_ep, keep=self.args.should_save) or None
        try:
            result = original(self, output_dir, _internal_call)
        finally:
            model._moe_lab_gathered_state = None
        dist.barrier()  # the checkpoint is written when save_model returns, on every rank
        return result

    return save_model


_MANAGED = ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM")  # accelerate modes that handle gradients themselves


def _accelerator_clip_grad_norm_(original):
    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        params = list(parameters)
        ep = expert_parallel_context_of(params)
        if ep is None:
            return original(self, params, max_norm, norm_type)
        mode = getattr(self.distributed_type, "name", str(self.distributed_type))
        if mode in _MANAGED:
            raise NotImplementedError(f"an expert-parallel moe_lab model under accelerate's {mode}: its gradients are "
                                      "managed there; moe_lab's expert parallelism runs under DDP (the Trainer's and "
                                      "accelerate's default with several processes) or with its own fsdp=True")
        self.unscale_gradients()  # fp16's GradScaler, as accelerate does before clipping
        return clip_expert_parallel_grads_(params, ep, max_norm, norm_type)

    return clip_grad_norm_


def _trainer_mixed_mesh_grad_norm(original):
    def _mixed_mesh_grad_norm(self, model, max_norm):
        params = list(model.parameters())
        ep = expert_parallel_context_of(params)
        if ep is None:
            return original(self, model, max_norm)
        return clip_expert_parallel_grads_(params, ep, max_norm)

    return _mixed_mesh_grad_norm
