"""The token-level path used by the `deepep` dispatcher, on the CPU: the local work on received
tokens (`run_local_experts`) against a per-token loop, forward and gradients, for each backend;
and the dispatcher's refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_lab
from moe_lab.stages._requires import why_triton_unavailable
from moe_lab.parallel.deepep import DeepEPDispatcher, why_deepep_unavailable
from moe_lab.stages.experts import ExpertsSpec
from moe_lab.layer import run_local_experts


class _Experts(torch.nn.Module):
    """v5's standard layout: gate_up_proj [E, 2I, H], down_proj [E, H, I], SiLU GLU."""

    def __init__(self, num_experts, hidden, inter):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(num_experts, hidden, inter) / inter**0.5)
        self.act_fn = F.silu


def _loop(x, local_ids, local_weights, experts):
    out = torch.zeros_like(x)
    for r in range(x.shape[0]):
        for j in range(local_ids.shape[1]):
            e = int(local_ids[r, j])
            if e < 0:
                continue
            gate, up = F.linear(x[r], experts.gate_up_proj[e]).chunk(2)
            out[r] = out[r] + local_weights[r, j] * F.linear(F.silu(gate) * up, experts.down_proj[e])
    return out


def _backends():
    words = ["eager", "torch"]
    if why_triton_unavailable() is None:
        words.append("triton")
    return words


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ["mixed", "no_local_choice_for_some", "nothing_received"])
def test_run_local_experts_matches_a_loop(backend, case):
    torch.manual_seed(0)
    R, H, I, E_local, k = (0 if case == "nothing_received" else 23), 16, 8, 3, 4
    experts = _Experts(E_local, H, I)
    x = torch.randn(R, H, requires_grad=True)
    local_ids = torch.randint(-1, E_local, (R, k))
    if case == "no_local_choice_for_some" and R:
        local_ids[:5] = -1
        local_ids[5] = 1
    local_weights = torch.rand(R, k).masked_fill(local_ids < 0, 0.0).requires_grad_()
    choice = moe_lab.resolve_backend(backend)
    spec = ExpertsSpec(num_experts=2 * E_local)
    got = run_local_experts(x, local_ids, local_weights, experts, spec, choice, E_local)
    ref = _loop(x, local_ids, local_weights, experts)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    if R:
        g = torch.randn_like(ref)
        params = (x, local_weights, experts.gate_up_proj, experts.down_proj)
        got_g = torch.autograd.grad(got, params, g, allow_unused=True)
        ref_g = torch.autograd.grad(ref, params, g, allow_unused=True)
        for a, b in zip(got_g, ref_g):
            torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-5)


def test_deepep_dispatcher_refusals():
    with pytest.raises(ValueError, match="needs expert parallelism"):
        DeepEPDispatcher(ep=None, num_experts=8)

    class _Ctx:
        ep_size = 3
    with pytest.raises(ValueError, match="2, 4 or 8 ranks"):
        DeepEPDispatcher(ep=_Ctx(), num_experts=9)


@pytest.mark.skipif(why_deepep_unavailable() is None, reason="DeepEP is usable here")
def test_without_deepep_selection_says_how_to_build_it():
    with pytest.raises(RuntimeError, match="deepseek-ai/DeepEP"):
        moe_lab.resolve_backend({"dispatch": "deepep"})
