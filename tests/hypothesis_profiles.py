"""Hypothesis settings profiles of the property tests, picked by the ``HYPOTHESIS_PROFILE``
environment variable (``conftest.py`` loads it before any test module is imported):

- ``ci`` (the default): random cases, new ones every run (not derandomized), a small fixed budget
  per test (``examples(ci=N)``: each test names what it can afford under the interpreter), no
  deadline, no shrinking (minutes under the interpreter), and a failing case printed with its
  ``@reproduce_failure`` blob so it can be replayed.
- ``gpu``: at least 1,000 cases per property test, for a device run of the compiled kernels
  (``HYPOTHESIS_PROFILE=gpu python -m pytest tests/test_kernel_properties.py tests/test_triton_kernels.py``).
- ``repro``: the ``ci`` budgets, derandomized (the same cases every run), shrinking failures, for
  bisecting and reading a failure.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

CI_PROFILES = ("ci", "repro")
GPU_EXAMPLES = 1000

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# no shrinking on CI: under the interpreter it can take minutes; the failing case and its blob print
# as drawn, and the "repro" profile (or a local rerun, which replays it from .hypothesis/) shrinks it
settings.register_profile("ci", max_examples=10, derandomize=False,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target], **_common)
settings.register_profile("gpu", max_examples=GPU_EXAMPLES, derandomize=False, **_common)
settings.register_profile("repro", max_examples=10, derandomize=True, **_common)


def load_profile() -> str:
    """Load the profile ``HYPOTHESIS_PROFILE`` names (``ci`` when unset); returns its name."""
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    return name


def examples(ci: int) -> settings:
    """Settings of one property test: ``ci`` cases under the ``ci`` / ``repro`` profiles, else the
    loaded profile's budget (at least ``ci``); everything else comes from the profile."""
    if settings.get_current_profile_name() in CI_PROFILES:
        return settings(max_examples=ci)
    return settings(max_examples=max(ci, settings.default.max_examples))
