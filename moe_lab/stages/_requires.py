"""What the optional backends need, checked once: Triton (a CUDA GPU, or the interpreter on the
CPU) and TransformerEngine. Each stage module registers its Triton and TE implementations with
these checks and capabilities; the packages are imported only when a stage runs or checks."""
from __future__ import annotations

import functools
import os

import torch

from ..registry import Capabilities

FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16})
# Triton decides at import whether it interprets (its own TRITON_INTERPRET, read once here): then
# its kernels run on CPU tensors too (tests), else on CUDA tensors only
TRITON_INTERPRETS = os.environ.get("TRITON_INTERPRET") == "1"
TRITON = Capabilities(devices=frozenset({"cuda", "cpu"} if TRITON_INTERPRETS else {"cuda"}), graph_safe=True,
                      traceable=False)
TE = Capabilities(devices=frozenset({"cuda"}), traceable=False)


def why_triton_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed: pip install 'moe_lab[triton]' (triton>=3.6)"
    if not torch.cuda.is_available() and not TRITON_INTERPRETS:
        return "Triton kernels need a CUDA GPU; on the CPU set TRITON_INTERPRET=1 before importing (slow: for tests)"
    return None


@functools.cache
def kernels():
    import triton_kernels

    return triton_kernels


INSTALL_HINT = "pip install 'moe_lab[te]' (transformer-engine[pytorch]>=2.8) on a machine with a CUDA GPU"


def why_te_unavailable() -> str | None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or TE's own error when its CUDA libraries are missing
        return f"TransformerEngine cannot be imported ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "TransformerEngine kernels need a CUDA GPU and none is visible"
    return None


@functools.cache
def te():
    import transformer_engine.pytorch as te

    return te
