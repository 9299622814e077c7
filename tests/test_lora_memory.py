"""What the Triton LoRA experts keep for backward (issue 25), counted on the CPU with saved-tensor
hooks, and that keeping less changes no bit.

The LoRA path with the triton permutation (`gathered_lora_experts_triton`) keeps the token rows
[T, H] instead of the permuted rows [S, H], and the gate_up output [S, 2I] instead of the
activation's [S, I] output and intermediate (both recomputed in backward). Held against the same
kernels run one stage at a time (permute, LoRA GEMM, activation, LoRA GEMM, combine): the same
output and gradients bit for bit, and at least those tensors fewer bytes.
"""
import pytest
import torch

pytest.importorskip("triton")

from moe_lab.lora import ExpertsLoRA, LoRAFactors, lora_choice  # noqa: E402
from moe_lab.registry import resolve_backend  # noqa: E402
from moe_lab.stages.experts import ExpertsSpec, activation_fn  # noqa: E402
from moe_lab.stages.permute import plan_triton  # noqa: E402
from triton_kernels import combine, permute  # noqa: E402
from triton_kernels.lora_gemm import grouped_lora_linear  # noqa: E402

from memory_testing import saved_bytes  # noqa: E402

T, K_TOP, E, H, I, R = 64, 4, 8, 32, 16, 4
S = T * K_TOP


class _Experts(torch.nn.Module):
    """A v5-layout experts module: gate_up_proj [E, 2I, H], down_proj [E, H, I], SiLU."""

    def __init__(self, dtype, g):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H, generator=g).to(dtype) / H ** 0.5,
                                               requires_grad=False)
        self.down_proj = torch.nn.Parameter(torch.randn(E, H, I, generator=g).to(dtype) / I ** 0.5,
                                            requires_grad=False)
        self.act_fn = torch.nn.SiLU()


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = _Experts(dtype, g)
    factors = {
        "gate_up_proj": LoRAFactors(torch.randn(E, H, R, generator=g).to(dtype).requires_grad_(),
                                    torch.randn(E, R, 2 * I, generator=g).to(dtype).requires_grad_(), 2.0),
        "down_proj": LoRAFactors(torch.randn(E, I, R, generator=g).to(dtype).requires_grad_(),
                                 torch.randn(E, R, H, generator=g).to(dtype).requires_grad_(), 2.0),
    }
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(T, E, generator=g)
    ids = logits.topk(K_TOP, dim=1).indices
    weights = torch.softmax(logits.gather(1, ids), dim=1).to(dtype).requires_grad_()
    return module, ExpertsLoRA(module, factors), hidden, ids, weights


def _one_stage_at_a_time(hidden, ids, weights, view, spec):
    """The same kernels with every intermediate an autograd input: rows, gate_up, activation."""
    perm = plan_triton(ids, E)
    rows = permute(hidden, perm.slot_of_row, K_TOP, perm.inverse)
    l1, l2 = view.lora["gate_up_proj"], view.lora["down_proj"]
    gate_up = grouped_lora_linear(rows, view.gate_up_proj.transpose(1, 2), perm.offsets, l1.a, l1.b, l1.scale)
    act = activation_fn(view, spec)(gate_up)
    y = grouped_lora_linear(act, view.down_proj.transpose(1, 2), perm.offsets, l2.a, l2.b, l2.scale)
    return combine(y, weights, perm.slot_of_row, perm.inverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_lora_experts_keep_less_and_compute_the_same_bits(dtype):
    module, view, hidden, ids, weights = _case(dtype)
    spec = ExpertsSpec(num_experts=E)
    choice = resolve_backend({"router": "triton", "permutation": "triton", "experts": "triton_gather",
                              "combine": "triton"})
    lora, _ = lora_choice(choice, spec, substitute=False, expert_parallel=False, weight=module.gate_up_proj)
    fused = lora.impls["experts"].fused
    assert fused is not None and lora.impls["experts"].caps.fuses_with == "triton"
    params = [module.gate_up_proj, module.down_proj] + [t for f in view.lora.values() for t in (f.a, f.b)]
    leaves = [hidden, weights] + params[2:]

    want, old_bytes = saved_bytes(lambda: _one_stage_at_a_time(hidden, ids, weights, view, spec), params)
    got, new_bytes = saved_bytes(lambda: fused(hidden, ids, weights, view, spec, lora), params)
    assert torch.equal(got, want)
    cotangent = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for g_new, g_old in zip(torch.autograd.grad(got, leaves, cotangent), torch.autograd.grad(want, leaves, cotangent)):
        assert torch.equal(g_new, g_old)

    size = hidden.element_size()
    dropped = S * H * size + 2 * S * I * size  # the permuted rows, the activation's output and intermediate
    assert new_bytes <= old_bytes - dropped + T * H * size, (new_bytes, old_bytes)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_peft_lora_through_the_gathered_triton_experts(family):
    """Whole models: the gathered LoRA path (GPU default's stages) equals PEFT on vanilla v5."""
    from test_lora import _assert_same_step, _lora_config, _peft_pair

    backend = {"router": "triton", "permutation": "triton", "experts": "triton_gather", "combine": "triton"}
    reference, ours = _peft_pair(family, seed=3, lora=_lora_config(r=5, alpha=10), moe_backend=backend)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    assert _assert_same_step(reference, ours, ids) == 4
    (plan,) = ours.base_model.model.moe_lab_plan.values()
    assert plan["lora"].startswith("triton_gather+lora")
