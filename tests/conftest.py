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


# CI runs the suite twice: on the newest transformers setup.cfg admits, then on the oldest. The second run
# (`pytest -m "not once"`, .ci/run) leaves out the tests below, whose outcome the transformers version
# cannot change, or whose transformers calls other tests make on both versions:
ONCE_MODULES = {
    # kernels, JAX and the performance model against their references: no transformers model in them
    "test_triton_kernels.py", "test_triton_kernels_gather.py", "test_compile_check.py", "test_jax_layer.py",
    "test_jax_overhead_smoke.py", "test_lora_memory.py", "test_token_level_dispatch.py", "test_ep_model.py",
    # the harness and the README (the harness runs on transformers' oldest admitted version on the GPU machine)
    "test_experiments_figures.py", "test_experiments_grid.py", "test_experiments_distributed.py",
    "test_experiments_interrupt.py", "test_experiments_sweep.py", "test_ep_overlap_probe.py", "test_ablation.py",
    "test_peers.py", "test_step_breakdown.py", "test_property_run.py", "test_readme_commands.py",
    # the notebooks call from_config and a forward, as the parity tests do on both versions
    "test_notebooks.py",
}


# moe_lab's own expert-parallel machinery (replication, empty ranks, FSDP2 beside it, its own mesh); the
# transformers side of EP (loading, the Trainer, saving, v5's plans) is tested on both versions
ONCE_TESTS = {
    "test_expert_parallel.py": {"test_skewed_routing_leaves_ranks_without_rows", "test_experts_replicated_over_two_groups",
                                "test_fsdp2_for_the_rest_of_the_model", "test_replicas_agree_when_one_gets_no_rows",
                                "test_own_mesh_accumulation_and_clipping"},
}


def pytest_collection_modifyitems(config, items):
    once = pytest.mark.once
    for item in items:
        if item.path.name in ONCE_MODULES or item.originalname in ONCE_TESTS.get(item.path.name, ()):
            item.add_marker(once)
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
