"""What one MoE layer keeps for backward, counted on the CPU with saved-tensor hooks.

The H200 benchmark measures activation memory with the CUDA allocator; this test holds the same
property on any machine: moe_lab's torch backend must not keep more than v5's grouped_mm does
(it once kept a float32 copy of every routed row in its combine, and a padded copy of the weights).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import moe_lab
from memory_testing import saved_bytes
from tiny_models import tiny_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_keeps_no_more_than_v5_grouped_mm(dtype):
    config = tiny_config("qwen3_moe", num_experts=8, top_k=4, hidden_size=64, moe_intermediate_size=32)
    torch.manual_seed(0)
    v5 = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm").to(dtype)
    ours = moe_lab.patch_model(copy.deepcopy(v5), "torch")
    hidden = torch.randn(1, 512, 64, dtype=dtype, requires_grad=True)
    v5_block, our_block = v5.model.layers[0].mlp, ours.model.layers[0].mlp
    _, v5_bytes = saved_bytes(lambda: v5_block(hidden), list(v5_block.parameters()))
    _, our_bytes = saved_bytes(lambda: our_block(hidden), list(our_block.parameters()))
    routed_rows_bytes = 512 * 4 * 64 * hidden.element_size()  # one copy of the S x H routed rows
    assert our_bytes <= v5_bytes + routed_rows_bytes // 4, (our_bytes, v5_bytes)


def test_gather_in_prologue_keeps_no_permuted_copy():
    """triton_gather saves at least one [S, H] copy less than triton (the permuted rows)."""
    config = tiny_config("qwen3_moe", num_experts=8, top_k=4, hidden_size=64, moe_intermediate_size=32)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    hidden = torch.randn(1, 128, 64, requires_grad=True)
    saved = {}
    for backend in ("triton", "triton_gather"):
        block = moe_lab.patch_model(copy.deepcopy(base), backend).model.layers[0].mlp
        _, saved[backend] = saved_bytes(lambda: block(hidden), list(block.parameters()))
    permuted_rows_bytes = 128 * 4 * 64 * 4  # S x H float32
    row_index_bytes = 128 * 4 * 8  # the token of each row (int64), kept instead
    assert saved["triton_gather"] <= saved["triton"] - permuted_rows_bytes + row_index_bytes, saved
