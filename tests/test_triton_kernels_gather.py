"""expert_mlp_gathered (gather in the GEMM prologue) against the PyTorch reference of
permute -> expert MLP, forward and every gradient, gated (swiglu, gpt_oss) and non-gated (relu2):
under the interpreter on the CPU, compiled (fp32, exact products) on a GPU."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis_profiles import examples

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
from triton_kernels import expert_mlp_gathered, sort_by_expert  # noqa: E402
from triton_kernels._common import interpreting  # noqa: E402
from triton_kernels.reference import NON_GATED, expert_mlp_ref  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"


@examples(ci=12)
@given(
    activation=st.sampled_from(["swiglu", "gpt_oss"]),
    num_experts=st.sampled_from([1, 3, 6]),
    k=st.integers(1, 4),
    tokens=st.integers(1, 20),
    hidden=st.sampled_from([8, 13]),
    inter=st.sampled_from([4, 7]),
    all_to_one=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gathered_mlp_matches_reference(activation, num_experts, k, tokens, hidden, inter, all_to_one, seed):
    transposed = activation == "gpt_oss"
    _check_gathered(activation, transposed, transposed, num_experts, k, tokens, hidden, inter, all_to_one, seed)


@examples(ci=5)
@given(
    transposed=st.booleans(),
    bias=st.booleans(),
    num_experts=st.sampled_from([1, 3, 6]),
    k=st.integers(1, 4),
    tokens=st.integers(1, 20),
    hidden=st.sampled_from([8, 13]),
    inter=st.sampled_from([4, 7]),
    all_to_one=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gathered_relu2_mlp_matches_reference(transposed, bias, num_experts, k, tokens, hidden, inter, all_to_one,
                                              seed):
    """Non-gated relu2 experts (up projection [E, I, H] or [E, H, I]) through the gathered MLP."""
    _check_gathered("relu2", transposed, bias, num_experts, k, tokens, hidden, inter, all_to_one, seed)


def _check_gathered(activation, transposed, bias, num_experts, k, tokens, hidden, inter, all_to_one, seed):
    k = min(k, num_experts)
    g = torch.Generator().manual_seed(seed)
    if all_to_one:
        ids = torch.stack([torch.roll(torch.arange(num_experts), 0)[:k] for _ in range(tokens)])
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    def leaf(t):
        return t.to(DEVICE).requires_grad_()

    ids = ids.to(DEVICE)
    x = leaf(torch.randn(tokens, hidden, generator=g))
    width = inter if activation in NON_GATED else 2 * inter  # non-gated: gate_up is the up projection
    shape_gu = (num_experts, hidden, width) if transposed else (num_experts, width, hidden)
    shape_dn = (num_experts, inter, hidden) if transposed else (num_experts, hidden, inter)
    gate_up = leaf(0.3 * torch.randn(shape_gu, generator=g))
    down = leaf(0.3 * torch.randn(shape_dn, generator=g))
    b_gu = leaf(0.1 * torch.randn(num_experts, width, generator=g)) if bias else None
    b_dn = leaf(0.1 * torch.randn(num_experts, hidden, generator=g)) if bias else None
    slots, counts, offsets, inv = sort_by_expert(ids, num_experts, return_inverse=True)

    got = expert_mlp_gathered(x, slots, inv, k, gate_up, down, offsets, activation=activation,
                              gate_up_bias=b_gu, down_bias=b_dn, transposed=transposed)
    rows = x[slots // k]
    want = expert_mlp_ref(rows, gate_up, down, offsets, activation=activation, gate_up_bias=b_gu,
                          down_bias=b_dn, transposed=transposed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    upstream = torch.randn(got.shape, generator=g).to(DEVICE)
    inputs = [t for t in (x, gate_up, down, b_gu, b_dn) if t is not None]
    for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
