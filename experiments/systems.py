"""Systems under test: what a cell builds and how it trains it.

A system is a ``SystemSpec``: the library (vanilla Transformers v5 or moe_lab), moe_lab's backend
(one word for every stage, or an implementation per stage), moe_lab's ``Options``, where the
optimizer steps, and the parallelism. A sweep file gives it either as a mapping of those fields::

    system: {backend: {experts: triton_gather, router: torch}, options: {fused_norm: true},
             optimizer_placement: stream}
    system: {backend: triton, ep: 2, dispatcher: all2all, fsdp: true}
    system: {library: v5, experts_implementation: grouped_mm, optimizer_placement: stream}

or as a short name, the alias every committed run uses. Each spec has one canonical short name
(``SystemSpec.name``): it is the ``system`` of the cell, its id and its summary key, and ``parse``
reads it back into the same spec. Names:

* ``v5-<impl>``: vanilla Transformers v5, ``experts_implementation=<impl>`` (``eager``,
  ``grouped_mm`` = v5's default, ``batched_mm``), one process per GPU; v5 takes the
  ``-optbwd`` and ``-optstream`` variants (``v5-grouped_mm-optstream``).
* ``v5-fsdp2-<impl>``: v5's FSDP2 through ``DistributedConfig(fsdp_size=world)``; each rank
  trains on its own batch (``v5_parallel: fsdp2``).
* ``v5-ep``: v5's expert parallelism, ``DistributedConfig(tp_size=world,
  enable_expert_parallel=True)`` (the model's ``base_model_ep_plan``); every rank sees the same
  batch, so tokens/s/GPU divides the batch by the world size (``v5_parallel: ep``).
* ``<backend>[-<variant>...][+<option>...]``: moe_lab. ``<backend>`` is a backend word moe_lab
  registers (``moe_lab.available_backends()``: ``eager``, ``torch``, ``triton``, ``te`` ...) or
  stage implementations, one ``<stage>=<implementation>`` word per stage in stage order
  (``router=torch-experts=triton_gather``: the stages not named come from moe_lab's default
  backend; an implementation may also be a backend word, meaning that backend's choice for the stage).
  Variants, written in ``VARIANT_ORDER``: ``cutlass`` (``te-cutlass``: the backend word
  ``te_cutlass``, TE's CUTLASS grouped GEMM), the ``Options`` with a word of their own
  (``OPTION_WORDS``: ``fusedce`` the chunked LM head + cross-entropy, ``fusednorm`` every RMSNorm as
  one Triton kernel, ``fusedrope`` the rotary embedding as one Triton kernel, ``graphs`` decoder
  layers replayed as CUDA graphs), ``fsdp`` (with expert parallelism: the non-expert parameters
  sharded with FSDP2), ``optbwd`` (the optimizer steps each parameter inside backward,
  ``moe_lab.training.optim.OptimizerInBackward``, one process only) or ``optstream`` (the same on a
  second CUDA stream beside backward). Every other ``Options`` field away from its default follows
  as ``+<field>`` / ``+no_<field>`` in field-name order (``triton+tma``, ``torch+no_autotune``),
  the spelling of ``Options.key()``.
* ``ep<N>-<dispatcher>-<backend>[-<variant>...][+<option>...]``: moe_lab expert parallelism over N
  ranks (``from_config(..., moe_backend=<backend's stages with dispatch=<dispatcher>>, ep_size=N)``);
  every rank trains on its own batch; moe_lab reduces the gradients inside backward.
* ``v5-peft-lora``, ``lora`` (``adapter: lora``): LoRA fine-tuning with PEFT, one process, the
  harness's loop: ``peft.get_peft_model(model, LoraConfig(**PEFT_LORA))`` (attention projections and
  the experts' 3D weights through ``target_parameters``, as PEFT's documentation shows) on vanilla
  v5 with its default experts (``grouped_mm``), and on moe_lab with its defaults (no backend named,
  default Options); only the adapters train. As mappings: ``{library: v5, adapter: lora}``,
  ``{adapter: lora}``; they take no other key.
* ``v5-trainer``, ``trainer``, ``trainer-max`` (``loop: trainer``): not the harness's training loop
  but an unmodified ``transformers.Trainer`` script (``experiments/trainer_script.py``, run by
  ``experiments/trainer_cell.py``), one process: ``v5-trainer`` imports
  ``transformers.AutoModelForCausalLM``, ``trainer`` ``moe_lab.AutoModelForCausalLM`` with its
  default arguments (no backend, no options), ``trainer-max`` the same plus ``moe_lab.fastest(trainer)``
  (``fastest: true``). As mappings: ``{library: v5, loop: trainer}``, ``{loop: trainer}``,
  ``{loop: trainer, fastest: true}``; they take no other key (the script passes the libraries'
  defaults).

* ``v5-liger``, ``nemo-automodel``, ``sonicmoe`` (``library: peer``): peer systems, one process,
  the harness's loop, built by ``experiments/peers.py`` (v5 + Liger Kernel as the Trainer applies it;
  NeMo AutoModel's ``from_config`` with its fastest one-GPU backends; SonicMoE's MoE layer carrying
  v5's block weights). Optional installs: one that is missing, or cannot run a geometry, is recorded
  ``unavailable`` with the reason; records carry the peer's versions (``system_spec.peer_versions``).
  As a mapping: ``{library: peer, peer: <name>}``.

Which names exist is read from the installed libraries: v5's experts implementations, moe_lab's
backend words, stage implementations, dispatchers and ``Options`` fields. Registering a new
implementation in moe_lab's registry makes it a system here without touching this file. A name
they do not know is refused when a sweep file is checked (``check_known``) and fails its cell with
the reason when a cell is run directly; ``NotImplementedYet`` (status ``not_implemented``) is kept
for systems the installed moe_lab cannot build at all.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

LIBRARIES = ("moe_lab", "v5", "peer")  # peer: experiments/peers.py
# "harness": experiments/cell.py's own loop; "trainer": the unmodified Trainer script (trainer_script.py)
LOOPS = ("harness", "trainer")
# the names of the Trainer-script systems: (library, fastest) -> name
TRAINER_NAMES = {("v5", False): "v5-trainer", ("moe_lab", False): "trainer", ("moe_lab", True): "trainer-max"}
# the PEFT adapter systems: (library, adapter) -> name; the one adapter configuration they train
ADAPTER_NAMES = {("v5", "lora"): "v5-peft-lora", ("moe_lab", "lora"): "lora"}
PEFT_LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
V5_PARALLEL = ("none", "fsdp2", "ep")
PLACEMENTS = ("step", "backward", "stream")  # optimizer.step() after backward | inside backward | on a side stream
# the variant word of each optimizer placement but "step" (one process only)
OPTIMIZER_IN_BACKWARD = "optbwd"
OPTIMIZER_ON_SIDE_STREAM = "optstream"
PLACEMENT_WORDS = {"backward": OPTIMIZER_IN_BACKWARD, "stream": OPTIMIZER_ON_SIDE_STREAM}
# moe_lab Options written as a variant word in system names; every other field is written "+<field>"
OPTION_WORDS = {"fusedce": "fused_cross_entropy", "fusednorm": "fused_norm", "fusedrope": "fused_rope",
                "graphs": "cuda_graphs"}
# the variant word that names another backend word: te-cutlass -> moe_backend "te_cutlass"
CUTLASS, CUTLASS_BASE, CUTLASS_BACKEND = "cutlass", "te", "te_cutlass"
# the one order variant words are written in, so each configuration has one name (and one summary key)
VARIANT_ORDER = ("cutlass", "fusedce", "fusednorm", "fusedrope", "graphs", "fsdp", OPTIMIZER_IN_BACKWARD,
                 OPTIMIZER_ON_SIDE_STREAM)
# moe_lab's stages, for names, when moe_lab cannot be imported (moe_lab.registry.STAGES otherwise)
_STAGES_FALLBACK = ("router", "permutation", "dispatch", "experts", "combine")
# Options fields a system cannot hold (not an on/off switch; give it to the cell's environment instead)
_NOT_IN_SYSTEMS = {"autotune_pin": "a file of recorded tiles, not part of a system: set MOE_LAB_TRITON_PIN for the cell"}

_WORD = r"[a-z0-9_]+"
_EP_RE = re.compile(rf"^ep(\d+)-({_WORD})-(.+)$")
_NAME_RE = re.compile(rf"^{_WORD}(=({_WORD}))?(-{_WORD}(={_WORD})?)*(\+{_WORD})*$")


class NotImplementedYet(NotImplementedError):
    """A system the harness knows but the installed library cannot build (recorded as ``not_implemented``)."""


@dataclass(frozen=True)
class SystemSpec:
    """One system, structured; ``name`` is its canonical short name (``parse(spec.name) == spec``).

    library: "moe_lab" | "v5".
    backend: moe_lab: a backend word, or ((stage, implementation or backend word), ...) in stage order.
    experts_implementation: v5's ``experts_implementation``.
    v5_parallel: v5's own parallelism: "none", "fsdp2" (``v5-fsdp2-<impl>``), "ep" (``v5-ep``).
    moe_lab_options: the ``moe_lab.Options`` fields this system sets away from their defaults, as
        (field, value) pairs in field-name order (the sweep file's ``options``).
    optimizer_placement: "step" (after backward), "backward" (each parameter inside backward),
        "stream" (the same on a second CUDA stream).
    ep, dispatcher: moe_lab expert parallelism over ``ep`` ranks through ``dispatcher`` (None: none).
    fsdp: with expert parallelism, the non-expert parameters sharded with FSDP2.
    loop: "harness" (experiments/cell.py's training loop) or "trainer" (the unmodified Trainer
        script of experiments/trainer_script.py, with the library's default arguments: every field
        above keeps its default).
    fastest: a trainer system whose script calls ``moe_lab.fastest(trainer)`` (``trainer-max``).
    adapter: "lora": the model is wrapped by ``peft.get_peft_model`` with ``PEFT_LORA`` (``v5-peft-lora``,
        ``lora``; the library's defaults otherwise).
    peer: a peer system's name (``library: peer``; ``experiments.peers.PEERS``).
    """

    library: str = "moe_lab"
    backend: str | tuple | None = None
    experts_implementation: str | None = None
    v5_parallel: str = "none"
    moe_lab_options: tuple = ()
    optimizer_placement: str = "step"
    ep: int = 1
    dispatcher: str | None = None
    fsdp: bool = False
    loop: str = "harness"
    fastest: bool = False
    adapter: str | None = None
    peer: str | None = None

    # ---- the canonical short name ----
    @property
    def name(self) -> str:
        return _name(self)

    @property
    def base_name(self) -> str:
        """The name without its ``+<option>`` part (what a summary key is built on)."""
        return self.name.split("+")[0]

    # ---- what the harness asks of a system ----
    @property
    def kind(self) -> str:
        """"v5" | "v5-fsdp2" | "v5-ep" | "moe_lab" | "moe_lab-ep" | "v5-trainer" | "moe_lab-trainer"
        (recorded as ``system_kind``); "peer" for a peer system."""
        if self.peer is not None:
            return "peer"
        if self.loop == "trainer":
            return f"{self.library}-trainer"
        if self.library == "v5":
            return {"none": "v5", "fsdp2": "v5-fsdp2", "ep": "v5-ep"}[self.v5_parallel]
        return "moe_lab-ep" if self.dispatcher is not None else "moe_lab"

    @property
    def experts_impl(self) -> str | None:
        return self.experts_implementation

    @property
    def moe_backend(self):
        """What ``from_config(moe_backend=...)`` takes: the backend word or {stage: implementation}."""
        return dict(self.backend) if isinstance(self.backend, tuple) else self.backend

    @property
    def options(self) -> tuple:
        """moe_lab ``from_config`` keyword options: the Options fields, and ``fsdp`` when on."""
        return tuple(sorted(self.moe_lab_options + ((("fsdp", True),) if self.fsdp else ())))

    @property
    def cuda_graphs(self) -> bool:
        return dict(self.moe_lab_options).get("cuda_graphs", False)

    @property
    def optimizer_in_backward(self) -> bool:
        return self.optimizer_placement != "step"

    @property
    def optimizer_side_stream(self) -> bool:
        return self.optimizer_placement == "stream"

    @property
    def replicated_input(self) -> bool:
        """All ranks train on the same batch (v5's tensor-parallel-style expert parallelism)."""
        return self.kind == "v5-ep"

    @property
    def distributed(self) -> bool:
        return self.kind in ("v5-fsdp2", "v5-ep", "moe_lab-ep")

    def as_mapping(self) -> dict:
        """The spec as a sweep file's mapping (``MAPPING_KEYS``, fields away from their defaults):
        ``parse(spec.as_mapping()) == spec``."""
        out, default = {}, SystemSpec()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name) and f.name != "library":
                continue
            if f.name == "moe_lab_options":
                out["options"] = dict(value)
            else:
                out[f.name] = dict(value) if f.name == "backend" and isinstance(value, tuple) else value
        return out

    def to_dict(self) -> dict:
        """The spec as a cell records it (``system_spec``): its fields, name and kind."""
        out = {"name": self.name, "kind": self.kind}
        if self.peer is not None:  # which versions of the peer this process had
            from . import peers

            out["peer_versions"] = peers.versions(self.peer)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "backend" and isinstance(value, tuple):
                value = dict(value)
            elif f.name == "moe_lab_options":
                value = dict(value)
            out[f.name] = value
        return out


System = SystemSpec  # the name this module's users knew it by

# the keys of a system given as a mapping: the fields, with `options` for moe_lab_options
MAPPING_KEYS = tuple("options" if f.name == "moe_lab_options" else f.name for f in dataclasses.fields(SystemSpec))


# ---- what the installed libraries know ---------------------------------------------------------
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


def _registry():
    """moe_lab.registry, or None where moe_lab cannot be imported."""
    try:
        import moe_lab  # noqa: F401  (registers the built-in implementations)
        from moe_lab import registry
    except Exception:  # noqa: BLE001
        return None
    return registry


def _stages() -> tuple[str, ...]:
    registry = _registry()
    return tuple(registry.STAGES) if registry is not None else _STAGES_FALLBACK


def option_defaults() -> dict | None:
    """{field: default} of a harness system's ``moe_lab.Options``, or None where moe_lab cannot be
    imported: the library's defaults, except that an option with a variant word of its own
    (``OPTION_WORDS``) is off unless the word is there (the library decides ``fused_norm`` and
    ``fused_rope`` per model by default; a harness system says them)."""
    try:
        from moe_lab.options import Options
    except Exception:  # noqa: BLE001
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    for field in OPTION_WORDS.values():
        if defaults[field] is None:
            defaults[field] = False
    return defaults


# ---- names -> specs ----------------------------------------------------------------------------
def parse(system) -> SystemSpec:
    """The ``SystemSpec`` of a short name or a mapping (see the module docstring); ValueError on a
    name or mapping that is not well formed. Whether the installed libraries know its backend and
    implementations is ``check_known``'s question."""
    if isinstance(system, SystemSpec):
        return system
    if isinstance(system, Mapping):
        return from_mapping(system)
    if not isinstance(system, str) or not system:
        raise ValueError(f"a system is a name or a mapping of {', '.join(MAPPING_KEYS)}, got {system!r}")
    return _parse_name(system)


def _peer_names() -> tuple[str, ...]:
    from .peers import PEERS

    return PEERS


def _parse_name(name: str) -> SystemSpec:
    what = f"system {name!r}"
    if name in _peer_names():
        return SystemSpec(library="peer", peer=name)
    for (library, fastest), trainer_name in TRAINER_NAMES.items():
        if name == trainer_name:
            return SystemSpec(library=library, loop="trainer", fastest=fastest)
    for (library, adapter), adapter_name in ADAPTER_NAMES.items():
        if name == adapter_name:
            return _adapter_spec(library, adapter)
    if name == "v5-ep":
        return _checked(what, SystemSpec(library="v5", experts_implementation="grouped_mm", v5_parallel="ep"))
    if name.startswith("v5-fsdp2-"):
        impl, *words = name[len("v5-fsdp2-"):].split("-")
        if words:
            raise ValueError(f"system {name!r}: v5-fsdp2 systems take no variants (v5-fsdp2-<impl>)")
        return _checked(what, SystemSpec(library="v5", experts_implementation=impl, v5_parallel="fsdp2"))
    if name.startswith("v5-"):
        impl, *words = name[len("v5-"):].split("-")
        v = _variants(name, impl, words, prefix="v5-")
        if v["cutlass"] or v["options"] or v["fsdp"]:
            raise ValueError(f"system {name!r}: v5 systems take only the {OPTIMIZER_IN_BACKWARD} and "
                             f"{OPTIMIZER_ON_SIDE_STREAM} variants")
        return _checked(what, SystemSpec(library="v5", experts_implementation=impl, optimizer_placement=v["placement"]))
    if not _NAME_RE.match(name):
        raise ValueError(f"bad system name {name!r}")
    main, *plus = name.split("+")
    ep, dispatcher, prefix = 1, None, ""
    m = _EP_RE.match(main)
    if m:
        ep, dispatcher, main = int(m.group(1)), m.group(2), m.group(3)
        prefix = f"ep{m.group(1)}-{dispatcher}-"
        if ep < 1:
            raise ValueError(f"system {name!r}: the expert-parallel size (ep<N>) must be >= 1")
    words = main.split("-")
    pairs = []
    while words and "=" in words[0]:
        stage, _, impl = words.pop(0).partition("=")
        pairs.append((stage, impl))
    if pairs:
        backend = _stage_backend(what, dict(pairs), written=[s for s, _ in pairs])
        text = "-".join(f"{s}={i}" for s, i in pairs)
    elif words:
        backend = text = words.pop(0)
    else:
        raise ValueError(f"bad system name {name!r}")
    if any("=" in w for w in words):
        raise ValueError(f"system {name!r}: write the <stage>=<implementation> words first, before the variants")
    v = _variants(name, text, words, prefix=prefix)
    if v["cutlass"]:
        if backend != CUTLASS_BASE:
            raise ValueError(f"system {name!r}: the cutlass variant is TransformerEngine's (te-cutlass)")
        backend = CUTLASS_BACKEND
    options = dict(v["options"])
    for part in plus:
        field, value = (part[3:], False) if part.startswith("no_") else (part, True)
        if field in options:
            raise ValueError(f"system {name!r} sets the option {field!r} twice")
        options[field] = value
    spec = SystemSpec(library="moe_lab", backend=backend, moe_lab_options=_options(what, options),
                      optimizer_placement=v["placement"], ep=ep, dispatcher=dispatcher, fsdp=v["fsdp"])
    spec = _checked(what, spec)
    if spec.name != name and spec.name != name.replace(CUTLASS_BACKEND, f"{CUTLASS_BASE}-{CUTLASS}"):
        # one name per configuration (te_cutlass, the backend word, is the one alias: of te-cutlass)
        raise ValueError(f"system {name!r}: write it as {spec.name!r}")
    return spec


def _variants(name: str, backend: str, words: list[str], prefix: str = "") -> dict:
    """What the variant words after a backend ask for, written in VARIANT_ORDER
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
    if OPTIMIZER_IN_BACKWARD in words and OPTIMIZER_ON_SIDE_STREAM in words:
        raise ValueError(f"system {name!r}: {OPTIMIZER_IN_BACKWARD} and {OPTIMIZER_ON_SIDE_STREAM} exclude each other")
    placement = next((p for p, w in PLACEMENT_WORDS.items() if w in words), "step")
    return {"cutlass": CUTLASS in words, "fsdp": "fsdp" in words, "placement": placement,
            "options": {OPTION_WORDS[w]: True for w in words if w in OPTION_WORDS}}


def _stage_backend(what: str, per_stage: Mapping, written=None) -> tuple:
    """((stage, implementation), ...) in stage order, checked for stages (names are checked
    against the registry by ``check_known``)."""
    stages = _stages()
    unknown = [s for s in per_stage if s not in stages]
    if unknown:
        raise ValueError(f"{what}: moe_lab has no stage {unknown[0]!r}; stages are {', '.join(stages)}")
    if "dispatch" in per_stage:
        raise ValueError(f"{what}: the dispatch stage is the system's expert parallelism "
                         "(ep<N>-<dispatcher>-..., or ep and dispatcher in a mapping), not a backend stage")
    if not per_stage:
        raise ValueError(f"{what}: a backend mapping names at least one stage")
    for s, impl in per_stage.items():
        if not isinstance(impl, str) or not re.fullmatch(_WORD, impl):
            raise ValueError(f"{what}: stage {s}: an implementation is a name of letters, digits and _, "
                             f"got {impl!r}")
    ordered = tuple((s, per_stage[s]) for s in stages if s in per_stage)
    if written is not None and [s for s, _ in ordered] != list(written):
        raise ValueError(f"{what}: write the stages in the order {', '.join(stages)}: "
                         f"{'-'.join(f'{s}={i}' for s, i in ordered)!r}")
    return ordered


def _options(what: str, options: Mapping) -> tuple:
    """(field, value) pairs of the Options fields away from their defaults, in field-name order;
    unknown fields and values a field cannot take are refused (by name alone where moe_lab cannot
    be imported)."""
    defaults = option_defaults()
    out = {}
    for field, value in options.items():
        if field in _NOT_IN_SYSTEMS:
            raise ValueError(f"{what}: option {field!r} is {_NOT_IN_SYSTEMS[field]}")
        if defaults is not None and field not in defaults:
            close = difflib.get_close_matches(str(field), list(defaults), n=1)
            raise ValueError(f"{what}: moe_lab.Options has no field {field!r}"
                             f"{f' (did you mean {close[0]!r}?)' if close else ''}; fields: {', '.join(sorted(defaults))}")
        if not isinstance(value, bool):
            raise ValueError(f"{what}: option {field!r} must be true or false, got {value!r}")
        if defaults is None or value != defaults[field]:
            out[field] = value
    return tuple(sorted(out.items()))


def from_mapping(mapping: Mapping) -> SystemSpec:
    """The ``SystemSpec`` of a mapping of ``MAPPING_KEYS`` (a sweep file's structured system)."""
    shown = "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"
    what = f"system {shown}"
    unknown = [k for k in mapping if k not in MAPPING_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), MAPPING_KEYS, n=1)
        raise ValueError(f"{what}: unknown key {unknown[0]!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                         f"allowed: {', '.join(MAPPING_KEYS)}")
    library = mapping.get("library", "moe_lab")
    if library not in LIBRARIES:
        raise ValueError(f"{what}: library must be one of {', '.join(LIBRARIES)}, got {library!r}")
    if library == "peer" or mapping.get("peer") is not None:
        if library != "peer" or mapping.get("peer") not in _peer_names() or set(mapping) - {"library", "peer"}:
            raise ValueError(f"{what}: a peer system is {{library: peer, peer: <name>}} with a name among "
                             f"{', '.join(_peer_names())}; it takes no other key")
        return SystemSpec(library="peer", peer=mapping["peer"])
    if mapping.get("adapter") is not None:
        spec = _adapter_spec(library, mapping["adapter"]) if (library, mapping["adapter"]) in ADAPTER_NAMES else None
        if spec is None or any(spec.as_mapping().get(k) != v for k, v in mapping.items() if k != "library"):
            raise ValueError(f"{what}: an adapter system is {{adapter: lora}} or {{library: v5, adapter: lora}} "
                             "(the library's defaults with PEFT_LORA); it takes no other key")
        return spec
    loop, fastest = mapping.get("loop", "harness"), mapping.get("fastest", False)
    if loop not in LOOPS:
        raise ValueError(f"{what}: loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if not isinstance(fastest, bool):
        raise ValueError(f"{what}: fastest must be true or false, got {fastest!r}")
    if loop == "trainer":
        other = sorted(set(mapping) - {"library", "loop", "fastest"})
        if other:
            raise ValueError(f"{what}: {', '.join(other)}: a trainer system runs the unmodified Trainer script with "
                             "the library's defaults; it takes library, loop and fastest only")
        if fastest and library != "moe_lab":
            raise ValueError(f"{what}: fastest is the script's moe_lab.fastest(trainer) line: a moe_lab system")
        return SystemSpec(library=library, loop="trainer", fastest=fastest)
    if fastest:
        raise ValueError(f"{what}: fastest is the Trainer script's moe_lab.fastest(trainer) line (loop: trainer)")
    placement = mapping.get("optimizer_placement", "step")
    if placement not in PLACEMENTS:
        raise ValueError(f"{what}: optimizer_placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    given = set(mapping)
    if library == "v5":
        other = sorted(given & {"backend", "options", "ep", "dispatcher", "fsdp"})
        if other:
            raise ValueError(f"{what}: {', '.join(other)}: moe_lab's keys; a v5 system takes experts_implementation, "
                             "v5_parallel and optimizer_placement")
        impl = mapping.get("experts_implementation", "grouped_mm")
        parallel = mapping.get("v5_parallel", "none")
        if parallel not in V5_PARALLEL:
            raise ValueError(f"{what}: v5_parallel must be one of {', '.join(V5_PARALLEL)}, got {parallel!r}")
        if not isinstance(impl, str) or not re.fullmatch(_WORD, impl):
            raise ValueError(f"{what}: experts_implementation must be a name, got {impl!r}")
        if parallel == "ep" and impl != "grouped_mm":
            raise ValueError(f"{what}: v5's expert parallelism (v5-ep) runs grouped_mm experts")
        if parallel != "none" and placement != "step":
            raise ValueError(f"{what}: the optimizer inside backward is one-process only")
        spec = SystemSpec(library="v5", experts_implementation=impl, v5_parallel=parallel, optimizer_placement=placement)
        return _checked(what, spec)
    other = sorted(given & {"experts_implementation", "v5_parallel"})
    if other:
        raise ValueError(f"{what}: {', '.join(other)}: v5's keys (library: v5)")
    if "backend" not in mapping:
        raise ValueError(f"{what}: a moe_lab system names its backend (a backend word or {{stage: implementation}})")
    backend = mapping["backend"]
    if isinstance(backend, Mapping):
        backend = _stage_backend(what, backend)
    elif not isinstance(backend, str) or not re.fullmatch(_WORD, backend):
        raise ValueError(f"{what}: backend must be a backend word or a mapping of stage -> implementation, got {backend!r}")
    options = mapping.get("options") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{what}: options must be a mapping of moe_lab.Options fields, got {options!r}")
    ep, dispatcher, fsdp = mapping.get("ep", 1), mapping.get("dispatcher"), mapping.get("fsdp", False)
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"{what}: ep must be an integer >= 1, got {ep!r}")
    if not isinstance(fsdp, bool):
        raise ValueError(f"{what}: fsdp must be true or false, got {fsdp!r}")
    if dispatcher is None and "ep" in given:
        raise ValueError(f"{what}: expert parallelism names its dispatcher (dispatcher: all2all, deepep, ...)")
    if dispatcher is not None and (not isinstance(dispatcher, str) or not re.fullmatch(_WORD, dispatcher)):
        raise ValueError(f"{what}: dispatcher must be a name, got {dispatcher!r}")
    spec = SystemSpec(library="moe_lab", backend=backend, moe_lab_options=_options(what, options),
                      optimizer_placement=placement, ep=ep, dispatcher=dispatcher, fsdp=fsdp)
    return _checked(what, spec)


def _checked(what: str, spec: SystemSpec) -> SystemSpec:
    """Rules across fields, the same for names and mappings (``what``: "system 'name'" or the mapping)."""
    if spec.library == "moe_lab":
        if spec.fsdp and spec.dispatcher is None:
            raise ValueError(f"{what}: fsdp shards the non-expert parameters of an expert-parallel "
                             "system: give it ep<N>-<dispatcher>-... (ep and dispatcher in a mapping)")
        if spec.dispatcher is not None and spec.optimizer_in_backward:
            raise ValueError(f"{what}: the optimizer-in-backward variant is one-process only")
    return spec


def _adapter_spec(library: str, adapter: str) -> SystemSpec:
    """``v5-peft-lora`` / ``lora``: v5 with its default experts, moe_lab with its defaults, under PEFT."""
    if library == "v5":
        return SystemSpec(library="v5", experts_implementation="grouped_mm", adapter=adapter)
    return SystemSpec(library="moe_lab", adapter=adapter)


def _name(spec: SystemSpec) -> str:
    """The canonical short name of a spec (see the module docstring)."""
    if spec.peer is not None:
        return spec.peer
    if spec.loop == "trainer":
        return TRAINER_NAMES[(spec.library, spec.fastest)]
    if spec.adapter is not None:
        return ADAPTER_NAMES[(spec.library, spec.adapter)]
    if spec.library == "v5":
        if spec.v5_parallel == "ep":
            return "v5-ep"
        if spec.v5_parallel == "fsdp2":
            return f"v5-fsdp2-{spec.experts_implementation}"
        words = [PLACEMENT_WORDS[spec.optimizer_placement]] if spec.optimizer_placement != "step" else []
        return "-".join([f"v5-{spec.experts_implementation}", *words])
    words = []
    if isinstance(spec.backend, tuple):
        backend = "-".join(f"{s}={i}" for s, i in spec.backend)
    elif spec.backend == CUTLASS_BACKEND:
        backend, words = CUTLASS_BASE, [CUTLASS]
    else:
        backend = spec.backend
    options = dict(spec.moe_lab_options)
    words += [w for w in VARIANT_ORDER if w in OPTION_WORDS and options.get(OPTION_WORDS[w]) is True]
    if spec.fsdp:
        words.append("fsdp")
    if spec.optimizer_placement != "step":
        words.append(PLACEMENT_WORDS[spec.optimizer_placement])
    named = {OPTION_WORDS[w] for w in words if w in OPTION_WORDS}
    plus = "".join(option_suffix({k: v for k, v in options.items() if k not in named}))
    prefix = f"ep{spec.ep}-{spec.dispatcher}-" if spec.dispatcher is not None else ""
    return prefix + "-".join([backend, *words]) + plus


def option_suffix(changed: Mapping) -> list[str]:
    """``+<field>`` / ``+no_<field>`` for each on/off option, in field-name order (Options.key()'s
    spelling); values other than true/false are left out."""
    return [f"+{k}" if v else f"+no_{k}" for k, v in sorted(changed.items()) if isinstance(v, bool)]


def named_options(spec: SystemSpec) -> dict:
    """The options a spec's base name (its variant words) already says."""
    return {f: v for f, v in spec.moe_lab_options if f in OPTION_WORDS.values() and v is True}


def canonical_name(system) -> str:
    """The canonical short name of a name or mapping (aliases such as ``te_cutlass`` become ``te-cutlass``)."""
    return parse(system).name


# ---- the installed libraries' names ------------------------------------------------------------
def check_known(system) -> SystemSpec:
    """``parse`` plus the names the installed libraries know: v5's experts implementation, moe_lab's
    backend word or stage implementations (its registry, read now) and dispatcher. A sweep file is
    checked with this before anything runs; ``build_model`` checks the same and fails the cell with
    the reason."""
    spec = parse(system)
    name = spec.name
    if spec.loop == "trainer" or spec.adapter is not None or spec.peer is not None:
        return spec  # the libraries' defaults, or a peer (whether it is installed is its cell's question)             # (trainer-max's moe_lab.fastest is looked for when its cell runs)
    if spec.library == "v5":
        impls = v5_experts_implementations()
        if spec.experts_implementation not in impls:
            raise ValueError(f"system {name!r}: v5 has no experts implementation {spec.experts_implementation!r}; "
                             f"known: {', '.join(impls)}")
        return spec
    registry = _registry()
    if registry is None:
        return spec
    backends = tuple(registry.available_backends())
    if isinstance(spec.backend, tuple):
        for stage, impl in spec.backend:
            impls = tuple(registry.stage_implementations(stage))
            if impl not in impls and impl not in backends:
                raise ValueError(f"system {name!r}: moe_lab's {stage} stage has no implementation {impl!r}; known: "
                                 f"{', '.join(impls)} (or a backend word: {', '.join(backends)})")
    elif spec.backend not in backends:
        raise ValueError(f"system {name!r}: moe_lab has no backend {spec.backend!r}; known: {', '.join(backends)} "
                         "(or stage implementations, <stage>=<implementation>; v5 systems are v5-<impl>, "
                         "v5-fsdp2-<impl>, v5-ep)")
    dispatchers = tuple(d for d in registry.stage_implementations("dispatch") if d != "local")
    if spec.dispatcher is not None and spec.dispatcher not in dispatchers:
        raise ValueError(f"system {name!r}: moe_lab has no dispatcher {spec.dispatcher!r}; known: {', '.join(dispatchers)}")
    return spec


def check_world(system, nproc: int) -> None:
    """Refuse a process count the system cannot run with (what build_model would refuse later)."""
    spec = parse(system)
    if spec.loop == "trainer" and nproc != 1:
        raise ValueError(f"system {spec.name!r} runs the unmodified Trainer script in one process, the cell has "
                         f"nproc={nproc}; the trainer systems are one-GPU (nproc: 1)")
    if spec.kind == "peer" and nproc != 1:
        raise ValueError(f"system {spec.name!r} is a peer run on one GPU, the cell has nproc={nproc} (nproc: 1)")
    if spec.kind in ("v5", "moe_lab") and nproc != 1:
        other = "v5-fsdp2-<impl> or v5-ep" if spec.kind == "v5" else f"ep{nproc}-<dispatcher>-<backend>"
        raise ValueError(f"system {spec.name!r} runs one process, the cell has nproc={nproc}; use {other}")
    if spec.kind == "moe_lab-ep" and nproc % spec.ep:
        raise ValueError(f"system {spec.name!r} needs a multiple of {spec.ep} processes, the cell has nproc={nproc}")


# ---- building ----------------------------------------------------------------------------------
def moe_lab_options(system, environ=None):
    """The ``moe_lab.Options`` a moe_lab system's model is built with: the system's options under
    the documented ``MOE_LAB_*`` overrides of the environment (``Options.from_environment``, which
    win); None for a v5 system (it builds no moe_lab model). A trainer system's script passes no
    options and moe_lab reads no environment variable: moe_lab's defaults. ImportError without moe_lab."""
    spec = parse(system)
    if spec.library != "moe_lab":
        return None
    from moe_lab.options import Options

    if spec.loop == "trainer" or spec.adapter is not None:
        return Options()

    words_off = {f: False for f in OPTION_WORDS.values()}  # a variant word switches its option on
    asked = Options.build({**words_off, **dict(spec.moe_lab_options)})
    used = Options.from_environment(asked, environ)
    if used != asked:
        overridden = {k: v for k, v in dataclasses.asdict(used).items() if getattr(asked, k) != v}
        log.info("system %s: MOE_LAB_* environment overrides change its options: %s", spec.name, overridden)
    return used


def _v5_distribute(model, dist_config):
    """Apply a v5 ``DistributedConfig`` to a model built by ``from_config`` (v5 only does this
    inside ``from_pretrained``): the same two calls, ``prepare_distribute_model`` and
    ``maybe_distribute_model``. Parameters must be materialised identically on every rank."""
    cls = type(model)
    dist_config, _, mesh = cls.prepare_distribute_model(dist_config)
    return cls.maybe_distribute_model(model, dist_config, mesh)


def build_model(system, config, *, dtype, attn: str, device, world: int, options=None):
    """Build the model of ``system`` (a spec, name or mapping) on ``device`` (parameters in
    ``dtype``), random init under the caller's seed. v5 and moe_lab models draw the same initial
    weights: moe_lab patches the v5 model in place, keeping its parameters. ``options``: the
    moe_lab Options to build with (default ``moe_lab_options(system)``)."""
    import torch
    import transformers

    spec = parse(system)
    if spec.loop == "trainer":
        raise ValueError(f"{spec.name}: a trainer system's model is built by its script (experiments/trainer_cell.py)")
    kw = dict(attn_implementation=attn, dtype=dtype)
    if spec.peer is not None:  # experiments/peers.py: PeerUnavailable (status unavailable) where it cannot
        from . import peers

        return peers.build_model(spec.peer, config, dtype=dtype, attn=attn, device=device, world=world)
    if spec.adapter is not None:  # v5-peft-lora, lora: the library's defaults, then PEFT
        return with_adapter(_build_plain(spec, config, kw, device, world, options), spec)
    if spec.library == "v5":
        check_known(spec)
        if spec.kind == "v5" and world > 1:
            raise ValueError(f"{spec.name} is a one-GPU system; use v5-fsdp2-<impl> or v5-ep on {world} GPUs")
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=spec.experts_impl, **kw)
        if spec.kind == "v5-fsdp2":
            from transformers.distributed import DistributedConfig

            model = _v5_distribute(model, DistributedConfig(fsdp_size=world))
        elif spec.kind == "v5-ep":
            from transformers.distributed import DistributedConfig

            model = _v5_distribute(model, DistributedConfig(tp_size=world, enable_expert_parallel=True))
        return model
    try:
        import moe_lab
    except ImportError as e:
        raise NotImplementedYet(f"moe_lab cannot be imported ({e}); system {spec.name} needs it") from e
    if not hasattr(moe_lab, "AutoModelForCausalLM"):
        raise NotImplementedYet(f"moe_lab has no AutoModelForCausalLM yet; system {spec.name} needs it")
    check_known(spec)  # a name moe_lab does not know fails the cell with the reason
    if options is None:
        options = moe_lab_options(spec)
    if spec.kind == "moe_lab-ep":
        import inspect

        if "ep_size" not in inspect.signature(moe_lab.AutoModelForCausalLM.from_config).parameters:
            raise NotImplementedYet(f"{spec.name}: the installed moe_lab has no expert parallelism (ep_size)")
        if world % spec.ep:
            raise ValueError(f"{spec.name} needs a multiple of {spec.ep} ranks, the cell has {world}")
        names = dict(moe_lab.resolve_backend(spec.moe_backend).names)
        names["dispatch"] = spec.dispatcher
        moe_lab.resolve_backend(names)  # the dispatcher can run here (else BackendUnavailableError: unavailable)
        with torch.device(device):
            return moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=names, ep_size=spec.ep, fsdp=spec.fsdp,
                                                            options=options, **kw)
    if world > 1:
        raise ValueError(f"{spec.name} is a one-GPU system; moe_lab on {world} GPUs needs ep{world}-<dispatcher>-<backend>")
    moe_lab.resolve_backend(spec.moe_backend)
    with torch.device(device):
        return moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=spec.moe_backend, options=options, **kw)


def _build_plain(spec: SystemSpec, config, kw: dict, device, world: int, options):
    """An adapter system's model before PEFT: v5's default experts, or moe_lab with no backend named."""
    import torch
    import transformers

    if world > 1:
        raise ValueError(f"{spec.name} is a one-GPU system, the cell has {world} processes")
    with torch.device(device):
        if spec.library == "v5":
            return transformers.AutoModelForCausalLM.from_config(config, experts_implementation=spec.experts_impl, **kw)
        import moe_lab

        return moe_lab.AutoModelForCausalLM.from_config(config, options=options, **kw)


def with_adapter(model, spec: SystemSpec):
    """``model`` wrapped by ``peft.get_peft_model`` with ``PEFT_LORA`` (only the adapters train)."""
    try:
        import peft
    except ImportError as e:
        raise NotImplementedYet(f"{spec.name} needs PEFT: pip install 'moe_lab[peft]' ({e})") from e
    return peft.get_peft_model(model, peft.LoraConfig(**PEFT_LORA))
