"""Process-wide switches of the kernels: TF32 products, TMA tiles, autotuning.

The kernels read these at launch (``current()``); ``configure(...)`` changes them. Nothing here reads
the environment: ``moe_lab.Options`` sets them when a model is built, and benchmarks pass them
explicitly. They are process-wide because what they steer is too (the autotuners' caches, the
compiled kernels).

- ``tf32``: fp32 GEMM inputs may use TF32 tensor cores (not exact); off: "ieee" fp32 products.
- ``tma``: the forward GEMM tiles move by tensor descriptors where the tensors allow it
  (experimental; the pointer kernels are the default; see ``triton_kernels.grouped_gemm_tma``).
- ``autotune``: time every candidate tile per shape key; off: the first candidate of each list
  (GPU tests over many shapes, where tuning each would compile dozens of kernels).
- ``weight_grad``: who computes the experts' weight gradients (``dw[e] = x[rows of e]^T dy[rows of
  e]``) where the rows are not gathered: ``"torch"`` (``torch.nn.functional.grouped_mm``, ragged K;
  bf16 only, CUTLASS on the GPU: faster than this package's kernel in every comparison on record,
  ``results/report/kernels.md`` and issue 21's H100 table, see ``results/NOTES.md``) or ``"triton"`` (the pointer kernel). Other dtypes and gathered rows always
  take the Triton kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSettings:
    tf32: bool = False
    tma: bool = False
    autotune: bool = True
    weight_grad: str = "torch"

    def __post_init__(self):
        if self.weight_grad not in ("torch", "triton"):
            raise ValueError(f"weight_grad must be 'torch' or 'triton', got {self.weight_grad!r}")


_current = KernelSettings()


def current() -> KernelSettings:
    return _current


def configure(**changes) -> KernelSettings:
    """Set some switches (``configure(tf32=True)``); returns the settings that were in force."""
    global _current
    unknown = set(changes) - {f.name for f in dataclasses.fields(KernelSettings)}
    if unknown:
        raise TypeError(f"unknown kernel settings {sorted(unknown)}; known: tf32, tma, autotune, weight_grad")
    previous, _current = _current, dataclasses.replace(_current, **changes)
    if previous.autotune != _current.autotune:
        _apply_autotune(_current.autotune)
    return previous


def _apply_autotune(on: bool) -> None:
    """Give every autotuner of the package its full candidate list (on) or the first one (off)."""
    from .autotune_choices import all_autotuners

    for tuner in all_autotuners().values():
        full = tuner.__dict__.setdefault("_moe_lab_all_configs", list(tuner.configs))
        tuner.configs = full if on else full[:1]
