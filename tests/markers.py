"""Shared test markers."""
import pytest

from triton_kernels._common import interpreting

# Tests that run Triton kernels on CPU tensors: only under the interpreter (conftest sets
# TRITON_INTERPRET=1 on machines without CUDA; on a GPU machine these are skipped).
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="runs Triton on CPU tensors: TRITON_INTERPRET=1")
