"""On a CUDA GPU: every family through moe_lab's fast backends in bf16 against v5's grouped_mm in
bf16 (same weights): loss, logits and every gradient by relative norm error; and the loss against
v5's eager experts in float32.

Router ties (see tests/gpu_checks.py): the model-level comparison runs the Triton stages with the
reference router ("triton-experts"); the Triton router is checked against the reference on its own.

Run on the GPU machine: `python -m pytest -q -m gpu tests/test_gpu_parity.py`.
"""
from __future__ import annotations

import pytest
from gpu_checks import check_bf16_against_fp32_v5, check_router_matches_reference_up_to_ties
from tiny_models import FAMILIES

pytestmark = pytest.mark.gpu


TRITON_STAGES_REFERENCE_ROUTER = {"router": "torch", "permutation": "triton", "experts": "triton", "combine": "triton"}
BACKENDS = {"torch": "torch", "triton-experts": TRITON_STAGES_REFERENCE_ROUTER, "triton_gather": {
    **TRITON_STAGES_REFERENCE_ROUTER, "experts": "triton_gather"}}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_backend_against_fp32_v5(family, backend):
    check_bf16_against_fp32_v5(family, BACKENDS[backend])


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_router_matches_reference_up_to_ties(family):
    from moe_lab.stages.router import route_triton

    check_router_matches_reference_up_to_ties(family, "triton", route_triton)
