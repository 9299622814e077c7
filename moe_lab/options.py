"""Every behaviour switch of moe_lab in one typed object.

    opts = moe_lab.Options(fused_cross_entropy=True, fused_norm=True)
    model = moe_lab.AutoModelForCausalLM.from_pretrained(path, moe_backend="triton", options=opts)

The same fields may be given as keyword arguments of ``from_pretrained`` / ``from_config`` /
``patch_model`` (``fused_norm=True``); an unknown name is a TypeError there. Two kinds of switches:

- model options change what this model runs (fused loss, norms, rotary, CUDA graphs, substitution);
- process settings steer code shared by every model of the process (input checks on the host, the
  Triton kernels' TF32 / TMA / autotuning, pinned tiles and weight-gradient kernel). Building a model applies them; a later
  model with other settings replaces them, with a warning.

The library reads no environment variable. ``Options.from_environment()`` is the one place the
documented ``MOE_LAB_*`` overrides are read (benchmarks use it: ``experiments.cell``):
``MOE_LAB_HOST_CHECKS``, ``MOE_LAB_TRITON_TF32``, ``MOE_LAB_TRITON_TMA``, ``MOE_LAB_TRITON_AUTOTUNE``,
``MOE_LAB_TRITON_DW`` (on/off: unset keeps the default, "", "0", "false" are off, anything else on) and
``MOE_LAB_TRITON_PIN`` (a path), ``MOE_LAB_AUTO_CACHE`` (on/off) and ``MOE_LAB_CACHE_DIR`` (a path).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

logger = logging.getLogger(__name__)

# field -> environment override (benchmarks only; see the module docstring)
ENVIRONMENT_OVERRIDES = {
    "host_checks": "MOE_LAB_HOST_CHECKS",
    "tf32": "MOE_LAB_TRITON_TF32",
    "tma": "MOE_LAB_TRITON_TMA",
    "autotune": "MOE_LAB_TRITON_AUTOTUNE",
    "autotune_pin": "MOE_LAB_TRITON_PIN",
    "triton_weight_grad": "MOE_LAB_TRITON_DW",
    "auto_cache": "MOE_LAB_AUTO_CACHE",
    "auto_cache_dir": "MOE_LAB_CACHE_DIR",
}
PROCESS_SETTINGS = ("host_checks", "tf32", "tma", "autotune", "autotune_pin", "triton_weight_grad", "auto_cache",
                    "auto_cache_dir")
PATH_SETTINGS = ("autotune_pin", "auto_cache_dir")  # a path or None; the others are on/off
# model options whose default (None) is decided per model: on where they run and keep v5's results
AUTOMATIC = ("fused_norm", "fused_rope")


def switch_on(value: str | None, default: bool = False) -> bool:
    """How an on/off override reads: unset -> ``default``; "", "0", "false" -> off; anything else on."""
    return default if value is None else value.strip().lower() not in ("", "0", "false")


@dataclass(frozen=True)
class Options:
    """moe_lab's switches; the defaults are exact (every fast path held to its reference).

    fused_cross_entropy: the training loss as a chunked LM-head + cross-entropy (no full logits, so
        off by default: a training forward with labels returns no logits).
    fused_norm: every RMSNorm as one Triton kernel each way.
    fused_rope: the rotary embedding of q and k as one Triton kernel each way (the rotate-half form,
        GPT-OSS's half-width form, DeepSeek-V3's interleaved pairs).
        For these two, None (the default) decides per model: on where a CUDA GPU and Triton are
        there and the model's norms / rotary are what the kernel computes (the same function as v5's,
        held to it by tests), else off; `model.moe_lab_defaults` says what was decided and why.
    cuda_graphs: replay every decoder layer as CUDA graphs (Triton backends, one process).
    substitute: where a chosen stage cannot run a layer as asked, run the reference instead and
        record it in ``model.moe_lab_plan`` (off: such a model is refused with the reason).
    host_checks: validate expert ids and labels on the host also on a GPU (one wait for the device
        per MoE layer); off: device-side assertions there. The CPU always checks on the host.
    tf32: fp32 inputs of the Triton GEMMs may use TF32 tensor cores (not exact).
    tma: the experimental tensor-descriptor (TMA) GEMM tiles where the tensors allow them.
    autotune: time every candidate tile per shape; off: the first candidate of each kernel.
    autotune_pin: a JSON of recorded autotune choices (a block.json or a cell record) to re-use.
    triton_weight_grad: the Triton kernel computes the bf16 experts' weight gradients of the Triton
        stages (off: torch's grouped_mm, faster in every comparison on record; gathered rows always
        take the Triton kernel).
    auto_cache: the "auto" backend keeps its measured decisions on disk and reuses them in later
        processes (`moe_lab.auto_cache`); off: every process measures again.
    auto_cache_dir: where (None: ``~/.cache/moe_lab``).
    """

    fused_cross_entropy: bool = False
    fused_norm: bool | None = None
    fused_rope: bool | None = None
    cuda_graphs: bool = False
    substitute: bool = False
    host_checks: bool = False
    tf32: bool = False
    tma: bool = False
    autotune: bool = True
    autotune_pin: str | None = None
    triton_weight_grad: bool = False
    auto_cache: bool = True
    auto_cache_dir: str | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "autotune_pin":
                if value is not None and not Path(value).is_file():
                    raise FileNotFoundError(f"Options(autotune_pin={value!r}): no such file (a JSON of recorded "
                                            "autotune choices, e.g. a block.json or a cell record)")
            elif field.name == "auto_cache_dir":
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"Options.auto_cache_dir must be a directory path (str) or None, got {value!r}")
            elif field.name in AUTOMATIC and value is None:
                continue
            elif not isinstance(value, bool):
                allowed = "True, False or None (decided per model)" if field.name in AUTOMATIC else "True or False"
                raise TypeError(f"Options.{field.name} must be {allowed}, got {value!r}")

    @classmethod
    def build(cls, options: "Options | Mapping | None" = None, **switches) -> "Options":
        """``options`` (an Options or a mapping of its fields) with ``switches`` on top."""
        known = {f.name for f in dataclasses.fields(cls)}
        base = dict(dataclasses.asdict(options)) if isinstance(options, Options) else dict(options or {})
        for source in (base, switches):
            unknown = set(source) - known
            if unknown:
                raise TypeError(f"unknown moe_lab option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{**base, **switches})

    @classmethod
    def from_environment(cls, options: "Options | Mapping | None" = None, environ: Mapping | None = None) -> "Options":
        """``options`` with the documented ``MOE_LAB_*`` overrides of ``environ`` (default os.environ)."""
        environ = os.environ if environ is None else environ
        base = cls.build(options)
        changes = {}
        for name, variable in ENVIRONMENT_OVERRIDES.items():
            if variable in environ:
                value = environ[variable]
                changes[name] = (value or None) if name in PATH_SETTINGS else switch_on(value, getattr(base, name))
        return dataclasses.replace(base, **changes)

    def changed(self) -> dict:
        """The fields that differ from the defaults, in field order."""
        default = Options()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def key(self) -> str:
        """A result-key suffix naming the non-default switches ("" for the defaults), e.g. "+tf32"."""
        parts = []
        for name, value in self.changed().items():
            parts.append(f"+{name}" if value is True else f"+no_{name}" if value is False else f"+{name}={value}")
        return "".join(parts)

    def process_settings(self) -> dict:
        return {name: getattr(self, name) for name in PROCESS_SETTINGS}


_applied: dict | None = None  # the process settings in force, once a model applied them


def current_host_checks() -> bool:
    return bool(_applied and _applied["host_checks"])


def current_auto_cache() -> tuple[bool, str | None]:
    """(keep auto's decisions on disk, the directory or None for the default): the settings in force."""
    settings = _applied or Options().process_settings()
    return settings["auto_cache"], settings["auto_cache_dir"]


def apply_process_settings(options: Options) -> None:
    """Put ``options``' process settings in force (see the module docstring)."""
    global _applied
    wanted = options.process_settings()
    if _applied is not None and _applied != wanted:
        changed = {k: (_applied[k], v) for k, v in wanted.items() if _applied[k] != v}
        logger.warning("moe_lab: process settings change for every model of this process: %s", changed)
    _applied = wanted
    kernel_defaults = Options()
    if ("triton_kernels" not in sys.modules and not options.autotune_pin
            and all(getattr(options, k) == getattr(kernel_defaults, k)
                    for k in ("tf32", "tma", "autotune", "triton_weight_grad"))):
        return  # the kernels start with these settings: no need to import them for a model that may not use them
    try:
        from triton_kernels import settings as kernel_settings
    except ImportError:  # Triton is optional; its settings matter only to its stages
        return
    kernel_settings.configure(tf32=options.tf32, tma=options.tma, autotune=options.autotune,
                              weight_grad="triton" if options.triton_weight_grad else "torch")
    if options.autotune_pin:
        from triton_kernels.autotune_choices import pin_autotune_choices

        pin_autotune_choices(options.autotune_pin)
