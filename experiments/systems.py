"""Systems under test, by name: how a cell builds its model.

Names (the ``system`` field of a cell and the last part of a summary key):

* ``v5-<impl>``: vanilla Transformers v5, ``experts_implementation=<impl>`` (``eager``,
  ``grouped_mm`` = v5's default, ``batched_mm``), one process per GPU; v5 takes the
  ``-optbwd`` and ``-optstream`` variants (``v5-grouped_mm-optstream``).
* ``v5-fsdp2-<impl>``: v5's FSDP2 through ``DistributedConfig(fsdp_size=world)``; each rank
  trains on its own batch.
* ``v5-ep``: v5's expert parallelism, ``DistributedConfig(tp_size=world,
  enable_expert_parallel=True)`` (the model's ``base_model_ep_plan``); every rank sees the same
  batch, so tokens/s/GPU divides the batch by the world size.
* ``<backend>[-<variant>]``: moe_lab with ``moe_backend=<backend>`` (``eager``, ``torch``,
  ``triton``, ``te`` ...); a variant in ``VARIANTS`` adds options (``triton-fusedce``: the chunked
  linear + cross-entropy loss, ``fused_cross_entropy=True``; ``triton-fusednorm``: every RMSNorm as one Triton kernel,
  ``fused_norm=True``; ``triton-fusedrope``: the rotary embedding as one Triton kernel, ``fused_rope=True``;
  ``triton-graphs``: decoder layers replayed as CUDA graphs, ``cuda_graphs=True``;
  ``te-cutlass``: the backend word
  ``te_cutlass``, TE's CUTLASS grouped GEMM; ``triton-optbwd``: the optimizer steps each parameter
  inside backward, ``moe_lab.training.optim.OptimizerInBackward``, one process only; ``-optstream``: the same on
  a second CUDA stream beside backward). Variants combine,
  written in ``VARIANT_ORDER``: ``triton_gather-fusedce-optbwd``; an unknown word or another order is refused.
* ``ep<N>-<dispatcher>-<backend>[-<variant>]``: moe_lab expert parallelism over N ranks
  (``-fsdp``: the non-expert parameters sharded with FSDP2)
  (``from_config(..., moe_backend=<backend's stages with dispatch=<dispatcher>>, ep_size=N)``); every
  rank trains on its own batch and gradients are reduced by ``moe_lab.parallel.expert_parallel`` after
  backward. Fails as not implemented while the installed moe_lab has no ``ep_size``.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

_EP_RE = re.compile(r"^ep(\d+)-([a-z0-9_]+)-([a-z0-9_]+(?:-[a-z0-9_]+)*)$")


# moe_lab system-name suffixes -> from_config options
VARIANTS = {"fusedce": {"fused_cross_entropy": True}, "fusednorm": {"fused_norm": True}, "fusedrope": {"fused_rope": True},
            "graphs": {"cuda_graphs": True}, "fsdp": {"fsdp": True}}
# moe_lab system-name suffixes that name another backend word: te-cutlass -> moe_backend "te_cutlass"
BACKEND_VARIANTS = {"cutlass": "_cutlass"}
# one-process system-name suffixes: the optimizer steps inside backward (moe_lab.training.optim.OptimizerInBackward),
# on the backward's own stream (optbwd) or on a second CUDA stream beside it (optstream)
OPTIMIZER_IN_BACKWARD = "optbwd"
OPTIMIZER_ON_SIDE_STREAM = "optstream"


class NotImplementedYet(NotImplementedError):
    """A system the harness knows but the library cannot run yet (recorded as ``not_implemented``)."""


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "v5" | "v5-fsdp2" | "v5-ep" | "moe_lab" | "moe_lab-ep"
    experts_impl: str | None = None  # v5 experts_implementation
    moe_backend: str | None = None  # moe_lab backend word
    dispatcher: str | None = None
    ep: int = 1
    replicated_input: bool = False  # all ranks train on the same batch (TP-style)
    options: tuple = ()  # extra from_config options of a variant, as (name, value) pairs
    optimizer_in_backward: bool = False  # the `-optbwd` and `-optstream` variants
    optimizer_side_stream: bool = False  # the `-optstream` variant

    @property
    def cuda_graphs(self) -> bool:
        """The ``-graphs`` variant: decoder layers replayed as CUDA graphs."""
        return dict(self.options).get("cuda_graphs", False)

    @property
    def distributed(self) -> bool:
        return self.kind in ("v5-fsdp2", "v5-ep", "moe_lab-ep")


# the one order variant words are written in, so each configuration has one name (and one summary key)
VARIANT_ORDER = ("cutlass", "fusedce", "fusednorm", "fusedrope", "graphs", "fsdp", OPTIMIZER_IN_BACKWARD, OPTIMIZER_ON_SIDE_STREAM)


@dataclass(frozen=True)
class _Variants:
    suffix: str = ""  # appended to the backend word (te + cutlass -> te_cutlass)
    options: tuple = ()  # from_config options, as sorted (name, value) pairs
    in_backward: bool = False
    side_stream: bool = False


def _variant_options(name: str, backend: str, words: list[str], prefix: str = "") -> _Variants:
    """What the variant words after a backend word ask for, written in VARIANT_ORDER
    (``triton_gather-fusedce-optbwd``)."""
    unknown = [w for w in words if w not in VARIANT_ORDER]
    if unknown:
        raise ValueError(f"system {name!r}: unknown variant {unknown[0]!r}; known variants: {', '.join(VARIANT_ORDER)}")
    if len(set(words)) != len(words):
        raise ValueError(f"system {name!r} repeats a variant")
    canonical = sorted(words, key=VARIANT_ORDER.index)
    if words != canonical:
        raise ValueError(f"system {name!r}: write its variants in the order {', '.join(VARIANT_ORDER)}: "
                         f"{prefix + '-'.join([backend, *canonical])!r}")
    if "cutlass" in words and backend != "te":
        raise ValueError(f"system {name!r}: the cutlass variant is TransformerEngine's (te-cutlass)")
    if OPTIMIZER_IN_BACKWARD in words and OPTIMIZER_ON_SIDE_STREAM in words:
        raise ValueError(f"system {name!r}: {OPTIMIZER_IN_BACKWARD} and {OPTIMIZER_ON_SIDE_STREAM} exclude each other")
    suffix = "".join(BACKEND_VARIANTS[w] for w in words if w in BACKEND_VARIANTS)
    options = {k: v for w in words if w in VARIANTS for k, v in VARIANTS[w].items()}
    return _Variants(suffix, tuple(sorted(options.items())),
                     in_backward=OPTIMIZER_IN_BACKWARD in words or OPTIMIZER_ON_SIDE_STREAM in words,
                     side_stream=OPTIMIZER_ON_SIDE_STREAM in words)


def parse(name: str) -> System:
    """The ``System`` a name stands for (see the module docstring)."""
    if name == "v5-ep":
        return System(name, "v5-ep", experts_impl="grouped_mm", replicated_input=True)
    if name.startswith("v5-fsdp2-"):
        impl, *words = name[len("v5-fsdp2-"):].split("-")
        if words:
            raise ValueError(f"system {name!r}: v5-fsdp2 systems take no variants (v5-fsdp2-<impl>)")
        return System(name, "v5-fsdp2", experts_impl=impl)
    if name.startswith("v5-"):
        return _parse_v5(name)
    m = _EP_RE.match(name)
    if m:
        if int(m.group(1)) < 1:
            raise ValueError(f"system {name!r}: the expert-parallel size (ep<N>) must be >= 1")
        backend, *words = m.group(3).split("-")
        v = _variant_options(name, backend, words, prefix=f"ep{m.group(1)}-{m.group(2)}-")
        if v.in_backward:
            raise ValueError(f"system {name!r}: the optimizer-in-backward variant is one-process only")
        return System(name, "moe_lab-ep", moe_backend=backend + v.suffix, dispatcher=m.group(2),
                      ep=int(m.group(1)), options=v.options)
    if not re.match(r"^[a-z0-9_]+(-[a-z0-9_]+)*$", name):
        raise ValueError(f"bad system name {name!r}")
    backend, *words = name.split("-")
    v = _variant_options(name, backend, words)
    return System(name, "moe_lab", moe_backend=backend + v.suffix, options=v.options, optimizer_in_backward=v.in_backward,
                  optimizer_side_stream=v.side_stream)


# v5's experts implementations when transformers cannot say (its ExpertsInterface keys, plus eager)
_V5_IMPLS_FALLBACK = ("batched_mm", "eager", "grouped_mm")


@functools.lru_cache(maxsize=None)
def v5_experts_implementations() -> tuple[str, ...]:
    """The ``experts_implementation`` names the installed transformers accepts (``eager`` and its
    ExpertsInterface's keys)."""
    try:
        from transformers.integrations.moe import ExpertsInterface

        return tuple(sorted({"eager", *ExpertsInterface().valid_keys()}))
    except Exception:  # noqa: BLE001 - an older or broken transformers: the names v5 has had
        return _V5_IMPLS_FALLBACK


@functools.lru_cache(maxsize=None)
def moe_lab_names() -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(backend words, dispatchers) the installed moe_lab registers, or None where it cannot be
    imported (its cells are then recorded as not implemented at run time)."""
    try:
        import moe_lab
        from moe_lab.registry import stage_implementations
    except Exception:  # noqa: BLE001
        return None
    return tuple(moe_lab.available_backends()), tuple(d for d in stage_implementations("dispatch") if d != "local")


def check_known(name: str) -> System:
    """``parse`` plus the names the installed libraries know: v5's experts implementation, moe_lab's
    backend word and dispatcher. A sweep file is checked with this before anything runs (a cell run
    directly records an unknown backend as not implemented instead)."""
    system = parse(name)
    if system.kind in ("v5", "v5-fsdp2", "v5-ep"):
        impls = v5_experts_implementations()
        if system.experts_impl not in impls:
            raise ValueError(f"system {name!r}: v5 has no experts implementation {system.experts_impl!r}; "
                             f"known: {', '.join(impls)}")
        return system
    known = moe_lab_names()
    if known is None:
        return system
    backends, dispatchers = known
    if system.moe_backend not in backends:
        raise ValueError(f"system {name!r}: moe_lab has no backend {system.moe_backend!r}; known: {', '.join(backends)} "
                         "(v5 systems are v5-<impl>, v5-fsdp2-<impl>, v5-ep)")
    if system.kind == "moe_lab-ep" and system.dispatcher not in dispatchers:
        raise ValueError(f"system {name!r}: moe_lab has no dispatcher {system.dispatcher!r}; known: {', '.join(dispatchers)}")
    return system


def check_world(system: System, nproc: int) -> None:
    """Refuse a process count the system cannot run with (what build_model would refuse later)."""
    if system.kind in ("v5", "moe_lab") and nproc != 1:
        other = "v5-fsdp2-<impl> or v5-ep" if system.kind == "v5" else f"ep{nproc}-<dispatcher>-<backend>"
        raise ValueError(f"system {system.name!r} runs one process, the cell has nproc={nproc}; use {other}")
    if system.kind == "moe_lab-ep" and nproc % system.ep:
        raise ValueError(f"system {system.name!r} needs a multiple of {system.ep} processes, the cell has nproc={nproc}")


def _parse_v5(name: str) -> System:
    """``v5-<impl>[-<variant>...]``: v5 takes the optimizer-in-backward variants only."""
    impl, *words = name[len("v5-"):].split("-")
    v = _variant_options(name, impl, words, prefix="v5-")
    if v.suffix or v.options:
        raise ValueError(f"system {name!r}: v5 systems take only the {OPTIMIZER_IN_BACKWARD} and "
                         f"{OPTIMIZER_ON_SIDE_STREAM} variants")
    return System(name, "v5", experts_impl=impl, optimizer_in_backward=v.in_backward,
                  optimizer_side_stream=v.side_stream)


def _v5_distribute(model, dist_config):
    """Apply a v5 ``DistributedConfig`` to a model built by ``from_config`` (v5 only does this
    inside ``from_pretrained``): the same two calls, ``prepare_distribute_model`` and
    ``maybe_distribute_model``. Parameters must be materialised identically on every rank."""
    cls = type(model)
    dist_config, _, mesh = cls.prepare_distribute_model(dist_config)
    return cls.maybe_distribute_model(model, dist_config, mesh)


def build_model(system: System, config, *, dtype, attn: str, device, world: int):
    """Build the model of ``system`` on ``device`` (parameters in ``dtype``), random init under the
    caller's seed. v5 and moe_lab models draw the same initial weights: moe_lab patches the v5
    model in place, keeping its parameters."""
    import torch
    import transformers

    kw = dict(attn_implementation=attn, dtype=dtype)
    if system.kind in ("v5", "v5-fsdp2", "v5-ep"):
        if system.kind == "v5" and world > 1:
            raise ValueError(f"{system.name} is a one-GPU system; use v5-fsdp2-<impl> or v5-ep on {world} GPUs")
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=system.experts_impl, **kw)
        if system.kind == "v5-fsdp2":
            from transformers.distributed import DistributedConfig

            model = _v5_distribute(model, DistributedConfig(fsdp_size=world))
        elif system.kind == "v5-ep":
            from transformers.distributed import DistributedConfig

            model = _v5_distribute(model, DistributedConfig(tp_size=world, enable_expert_parallel=True))
        return model
    try:
        import moe_lab
    except ImportError as e:
        raise NotImplementedYet(f"moe_lab cannot be imported ({e}); system {system.name} needs it") from e
    if not hasattr(moe_lab, "AutoModelForCausalLM"):
        raise NotImplementedYet(f"moe_lab has no AutoModelForCausalLM yet; system {system.name} needs it")
    if system.kind == "moe_lab-ep":
        import inspect

        if "ep_size" not in inspect.signature(moe_lab.AutoModelForCausalLM.from_config).parameters:
            raise NotImplementedYet(
                f"{system.name}: moe_lab has no expert parallelism yet (dispatcher {system.dispatcher!r}, "
                f"ep={system.ep}); this cell is a placeholder until it lands")
        if world % system.ep:
            raise ValueError(f"{system.name} needs a multiple of {system.ep} ranks, the cell has {world}")
        names = dict(_resolve(moe_lab, system.moe_backend, system.name).names)
        names["dispatch"] = system.dispatcher
        _resolve(moe_lab, names, system.name)
        with torch.device(device):
            return moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=names, ep_size=system.ep,
                                                            options=moe_lab.Options.from_environment(),
                                                            **dict(system.options), **kw)
    if world > 1:
        raise ValueError(f"{system.name} is a one-GPU system; moe_lab on {world} GPUs needs ep{world}-<dispatcher>-<backend>")
    _resolve(moe_lab, system.moe_backend, system.name)
    with torch.device(device):
        # the documented MOE_LAB_* benchmark overrides (moe_lab.Options.from_environment), the system's options on top
        return moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=system.moe_backend,
                                                        options=moe_lab.Options.from_environment(),
                                                        **dict(system.options), **kw)


def _resolve(moe_lab, backend, system_name: str):
    """moe_lab's resolution of a backend; a name it does not know (yet) is recorded as not implemented."""
    try:
        return moe_lab.resolve_backend(backend)
    except ValueError as e:
        raise NotImplementedYet(f"{system_name}: moe_lab cannot run backend {backend!r} here: {e}") from e


def after_backward(model) -> None:
    """Work a system needs between backward and the optimizer step (timed as part of the step):
    moe_lab expert parallelism reduces gradients over ranks."""
    ep = getattr(model, "moe_lab_ep", None)
    if ep is not None:
        from moe_lab.parallel.expert_parallel import reduce_gradients

        reduce_gradients(model, ep)
