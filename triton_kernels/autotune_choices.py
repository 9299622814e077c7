"""Which configuration the Triton autotuner chose for each kernel and key, for result manifests.

``autotune_choices() -> {"module.kernel": {"key": "BLOCK_M: 128, ..., num_warps: 8, ..."}}`` covers
every autotuned kernel of this package that has run in this process (an untouched kernel has no
entry). Benchmarks record it so a table says which tiles produced its times.
"""
from __future__ import annotations

import importlib

from triton.runtime.autotuner import Autotuner

_MODULES = ("grouped_gemm", "expert_mlp", "permute", "router", "rmsnorm", "rope", "cross_entropy", "adamw")


def autotune_choices() -> dict:
    choices = {}
    for name in _MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, Autotuner) and obj.cache:
                choices[f"{name}.{attr}"] = {str(key): str(cfg) for key, cfg in obj.cache.items()}
    return choices
