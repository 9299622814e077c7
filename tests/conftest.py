"""Shared pytest setup.

Triton chooses between compiling and interpreting when a kernel is decorated (at import), so
the choice is made here, before any test module imports a kernel: without CUDA, Triton kernels can
only run under the interpreter (``TRITON_INTERPRET=1``). Tests marked ``gpu`` are skipped there.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency of the project
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One config per autotuned kernel: the tests try many small shapes, and autotuning each would
    # compile every candidate tile (minutes); the benchmarks time the autotuned kernels.
    from triton_kernels import settings as _kernel_settings

    _kernel_settings.configure(autotune=False)


@pytest.fixture(autouse=True)
def _own_auto_decision_cache(tmp_path_factory, monkeypatch):
    """Each test reads and writes its own auto-decision cache (moe_lab.auto_cache's default
    directory), never the user's, and no test sees another's measured decisions."""
    from moe_lab import auto_cache

    monkeypatch.setattr(auto_cache, "DEFAULT_DIR", tmp_path_factory.mktemp("moe_lab_cache"))


try:  # the property tests' settings profiles (hypothesis_profiles.py); HYPOTHESIS_PROFILE picks one
    from hypothesis_profiles import load_profile
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    load_profile()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
