"""Which configuration the Triton autotuner chose for each kernel and key, recorded and re-applied.

``autotune_choices() -> {"module.kernel": {"key": "BLOCK_M: 128, ..., num_warps: 8, ..."}}`` covers
every autotuned kernel of this package that has run in this process (an untouched kernel has no
entry). Benchmarks and harness cells record it, so a table says which tiles produced its times.

``pin_autotune_choices(source)`` puts such choices back into the autotuners' caches, so a later run
uses the same tiles without timing candidates again (a rerun of a table on another machine, or an
A/B that should differ in one thing only). ``source``: the mapping, or a JSON file holding it or
holding it under ``"autotune"`` (``block.json``, ``triton_kernels_bench.json``, a cell record).
``moe_lab.Options(autotune_pin=path)`` pins a file when a model is built. Pinned keys are never
timed; a kernel run with a single candidate (the interpreter, ``autotune=False``) ignores them.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import warnings
from pathlib import Path

import triton
from triton.runtime.autotuner import Autotuner

_MODULES = ("grouped_gemm", "grouped_gemm_tma", "expert_mlp", "lora_gemm", "permute", "router", "rmsnorm", "rope", "cross_entropy", "adamw")


# kernels recorded under the module they lived in before (records stay pinnable)
RENAMED = {"grouped_gemm._grouped_mm_tma_kernel": "grouped_gemm_tma._grouped_mm_tma_kernel",
           "grouped_gemm._grouped_mm_dw_tma_kernel": "grouped_gemm_tma._grouped_mm_dw_tma_kernel"}


def all_autotuners() -> dict:
    """``{"module.kernel": Autotuner}`` for every autotuned kernel of this package."""
    tuners = {}
    for name in _MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                tuners[f"{name}.{attr}"] = obj
    return tuners


def autotune_choices() -> dict:
    return {name: {str(key): str(cfg) for key, cfg in tuner.cache.items()}
            for name, tuner in all_autotuners().items() if tuner.cache}


def autotune_lines(choices: dict) -> list[str]:
    """One console line per kernel and key: ``autotune <kernel> <key>: <config>``."""
    return [f"autotune {kernel} {key}: {config}" for kernel, by_key in choices.items() for key, config in by_key.items()]


def config_from_string(text: str) -> triton.Config:
    """The ``triton.Config`` that ``str(config)`` printed: ``"BLOCK_M: 128, num_warps: 8, ..."``."""
    options = set(inspect.signature(triton.Config.__init__).parameters) - {"self", "kwargs"}
    kwargs, extra = {}, {}
    for item in text.split(", "):
        name, _, value = item.partition(": ")
        parsed = ast.literal_eval(value)
        (extra if name in options else kwargs)[name] = parsed
    return triton.Config(kwargs, **extra)


def _misfit(tuner: Autotuner, key: tuple, config: triton.Config) -> str | None:
    """Why a recorded (key, config) cannot stand for this kernel as it is now, or None. A key holds
    the values of the tuner's key arguments, then the dtypes of the tensor arguments; a config
    names the kernel's tile parameters."""
    values = [k for k in key if not (isinstance(k, str) and k.startswith("torch."))]
    if len(values) != len(tuner.keys):
        return f"its key has {len(values)} values, the kernel's autotune key {len(tuner.keys)} ({', '.join(tuner.keys)})"
    wanted = set(tuner.configs[0].kwargs)
    if set(config.kwargs) != wanted:
        return f"its config sets {sorted(config.kwargs)}, the kernel's candidates {sorted(wanted)}"
    return None


def pin_autotune_choices(source) -> int:
    """Put recorded choices into the autotuners' caches; returns how many keys were pinned.
    Raises ValueError for a kernel this package does not have; a choice recorded for an older form
    of a kernel (another key or other tile parameters) is skipped with a warning."""
    if not isinstance(source, dict):
        source = json.loads(Path(source).read_text())
    choices = source.get("autotune", source)
    tuners = all_autotuners()
    pinned = 0
    for kernel, by_key in choices.items():
        kernel = RENAMED.get(kernel, kernel)
        if kernel not in tuners:
            raise ValueError(f"pinned autotune choices name {kernel!r}, which is not an autotuned kernel of "
                             f"triton_kernels (known: {', '.join(sorted(tuners))})")
        for key, text in by_key.items():
            parsed, config = ast.literal_eval(key), config_from_string(text)
            why = _misfit(tuners[kernel], parsed, config)
            if why:
                warnings.warn(f"not pinned: {kernel} {key}: {why} (recorded by an older version of the kernel)",
                              stacklevel=2)
                continue
            tuners[kernel].cache[parsed] = config
            pinned += 1
    return pinned

