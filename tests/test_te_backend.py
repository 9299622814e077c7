"""The `te` backend on any machine: selection, the error without TransformerEngine, the routing it
takes or declines, the row-map conversions; and that nothing but the te backend imports TE."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moe_lab
from moe_lab.stages.permute import plan_sorted
from moe_lab.stages.router import RoutingSpec
from moe_lab.stages.permute import inverse_to_te_row_map, slot_of_row_from_inverse, te_row_map_to_inverse
from moe_lab.registry import LayerNeeds, capabilities
from moe_lab.stages._requires import why_te_unavailable
from tiny_models import tiny_config

NO_TE = why_te_unavailable() is not None


def test_backend_words_are_registered():
    assert {"te", "te_cutlass"} <= set(moe_lab.available_backends())


@pytest.mark.skipif(not NO_TE, reason="TransformerEngine is usable here")
@pytest.mark.parametrize("word", ["te", "te_cutlass", {"experts": "te"}, {"permutation": "te", "combine": "te"}])
def test_without_te_selection_fails_at_construction_saying_what_to_install(word):
    with pytest.raises(RuntimeError, match=r"moe_lab\[te\]|CUDA GPU"):
        moe_lab.resolve_backend(word)
    config = tiny_config("qwen3_moe")
    with pytest.raises(RuntimeError, match=r"moe_lab\[te\]|CUDA GPU"):
        moe_lab.AutoModelForCausalLM.from_config(config, moe_backend=word)


def test_importing_moe_lab_does_not_import_transformer_engine():
    code = "import sys, moe_lab; moe_lab.resolve_backend('torch'); print('transformer_engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("spec, supported", [
    (RoutingSpec(8, 2, renormalize=True), True),  # Qwen3-MoE (norm_topk_prob), Mixtral
    (RoutingSpec(8, 2), True),  # softmax top-k without renormalising
    (RoutingSpec(8, 2, topk_before_softmax=True), True),  # GPT-OSS
    (RoutingSpec(8, 2, score="sigmoid", n_group=4, topk_group=2, has_correction_bias=True), False),  # DeepSeek-V3
])
def test_te_router_takes_softmax_families_and_declines_the_rest(spec, supported):
    needs = LayerNeeds("family", spec.features(), "glu:silu", "cuda", torch.bfloat16)
    assert (capabilities("router", "te").why_not(needs, "router") is None) == supported


def test_row_map_conversions_match_the_definition():
    """TE's index-map row_id_map puts token t's j-th choice at entry j*T + t (definition written out)."""
    torch.manual_seed(0)
    T, E, k = 37, 6, 3
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    perm = plan_sorted(ids, E)
    inverse = slot_of_row_from_inverse(perm.slot_of_row)  # the map is an involution between the two views
    assert torch.equal(inverse[perm.slot_of_row], torch.arange(T * k))
    te_map = torch.empty(k * T, dtype=torch.int32)
    for t in range(T):
        for j in range(k):
            te_map[j * T + t] = int(inverse[t * k + j])
    assert torch.equal(inverse_to_te_row_map(inverse, T, k), te_map)
    assert torch.equal(te_row_map_to_inverse(te_map, T, k), inverse)
    assert torch.equal(slot_of_row_from_inverse(te_row_map_to_inverse(te_map, T, k)), perm.slot_of_row)


def test_harness_names_the_cutlass_variant():
    from experiments.systems import parse

    assert parse("te-cutlass").moe_backend == "te_cutlass"
    assert parse("ep2-all2all-te-cutlass").moe_backend == "te_cutlass"
    assert parse("ep2-all2all-triton-fsdp").options == (("fsdp", True),)
