"""The torch LoRA experts (`GroupedLoRAMLP`, issue 25) keep less for backward and compute the same bits.

Held against the composed autograd ops they replace (`_composed_lora_mlp` after the permutation
stage, then the combine stage): output and the gradients of the hidden states, the routing weights
and every LoRA factor bit for bit, in fp32 and bf16 (fp32 adapters on bf16 weights, as PEFT keeps
them), SwiGLU and GPT-OSS's biased clamped SwiGLU, random routing that leaves experts empty, the
factors laid out as PEFT's parameter views. Saved-tensor hooks count what autograd keeps (distinct
storages, the parameters' own not counted): at least the permuted rows [S, H], the activation's
output and intermediate [S, I] x 2 and, for bf16, the factors' casts fewer, for the token rows
[T, H] and the gather's index more.
"""
import pytest
import torch
from transformers.activations import ACT2FN

from moe_lab.lora import ExpertsLoRA, LoRAFactors, lora_choice, lora_experts_grouped_mm
from moe_lab.lora.experts import _composed_lora_mlp
from moe_lab.registry import resolve_backend
from moe_lab.stages.experts import ExpertsSpec, first_weight

from memory_testing import saved_bytes

T, K_TOP, E, H, I, R = 48, 4, 8, 32, 16, 4  # R = 4: bf16 rows of 8 bytes, grouped_mm's zero-padding path
S = T * K_TOP
SPECS = {"swiglu": ExpertsSpec(E),
         "gpt_oss": ExpertsSpec(E, transposed=True, interleaved=True, has_bias=True, activation="gpt_oss"),
         "relu2": ExpertsSpec(E, gated=False, activation="plain", act_name="relu2")}  # Nemotron-H's non-gated experts


def _case(spec, dtype, seed=0):
    """(frozen experts module, ExpertsLoRA with PEFT-layout factors, hidden [T, H], ids [T, k], weights [T, k], params)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Module()
    first, width = ("gate_up_proj", 2 * I) if spec.gated else ("up_proj", I)
    shapes = ((E, H, width), (E, I, H)) if spec.transposed else ((E, width, H), (E, H, I))
    setattr(m, first, torch.nn.Parameter((torch.randn(*shapes[0], generator=g) * 0.3).to(dtype), requires_grad=False))
    m.down_proj = torch.nn.Parameter((torch.randn(*shapes[1], generator=g) * 0.3).to(dtype), requires_grad=False)
    if spec.has_bias:
        m.gate_up_proj_bias = torch.nn.Parameter((torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype),
                                                 requires_grad=False)
        m.down_proj_bias = torch.nn.Parameter((torch.randn(E, H, generator=g) * 0.1).to(dtype), requires_grad=False)
    m.act_fn = torch.nn.SiLU() if spec.gated else ACT2FN["relu2"]
    lora, params = {}, []
    for name, (n_in, n_out) in {first: (H, width), "down_proj": (I, H)}.items():
        # PEFT's storage, fp32: lora_A [r*E, in], lora_B [out, r*E]; the bridge's views of them
        lora_a = (torch.randn(R * E, n_in, generator=g) * 0.5).requires_grad_()
        lora_b = (torch.randn(n_out, R * E, generator=g) * 0.5).requires_grad_()
        params += [lora_a, lora_b]
        lora[name] = LoRAFactors(lora_a.view(E, R, n_in).transpose(1, 2), lora_b.view(n_out, R, E).permute(2, 1, 0), 2.0)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(T, E, generator=g)
    logits[:, :2] = -1e9  # experts 0 and 1 get no row
    ids = logits.topk(K_TOP, dim=1).indices
    weights = torch.softmax(logits.gather(1, ids), dim=1).to(dtype).requires_grad_()
    return m, ExpertsLoRA(m, lora), hidden, ids, weights, params


def _stages(hidden, ids, weights, view, spec, choice):
    """The composed ops one stage at a time: permutation, the LoRA MLP op by op, combine."""
    rows, perm = choice.permutation(hidden, ids, E)
    eor = perm.expert_of_row() if spec.has_bias else None
    y = _composed_lora_mlp(rows.to(first_weight(view, spec).dtype), perm.offsets, view, spec, eor)
    return choice.combine(y, perm, weights, hidden.dtype)


def _assert_same_bits(got, want, leaves, dtype):
    assert torch.equal(got, want)
    cotangent = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for leaf, g_new, g_old in zip(leaves, torch.autograd.grad(got, leaves, cotangent),
                                  torch.autograd.grad(want, leaves, cotangent)):
        assert g_new.dtype == g_old.dtype == leaf.dtype
        assert torch.equal(g_new, g_old), tuple(leaf.shape)


@pytest.mark.parametrize("permutation", ["torch", "triton"])
@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_lora_experts_keep_less_and_compute_the_same_bits(dtype, kind, permutation):
    if permutation == "triton":
        pytest.importorskip("triton")
    spec = SPECS[kind]
    module, view, hidden, ids, weights, params = _case(spec, dtype)
    choice = resolve_backend({"router": "torch", "permutation": permutation, "experts": "torch", "combine": "torch"})
    lora, note = lora_choice(choice, spec, substitute=False, expert_parallel=False, weight=first_weight(module, spec))
    fused = lora.impls["experts"].fused
    assert fused is not None and lora.impls["experts"].caps.fuses_with == permutation
    assert note.startswith("torch+lora")
    frozen = [p for p in module.parameters()]
    leaves = [hidden, weights] + params

    want, old_bytes = saved_bytes(lambda: _stages(hidden, ids, weights, view, spec, choice), frozen + params)
    got, new_bytes = saved_bytes(lambda: fused(hidden, ids, weights, view, spec, lora), frozen + params)
    _assert_same_bits(got, want, leaves, dtype)

    size = torch.empty((), dtype=dtype).element_size()
    # the permuted rows, and the activation's [S, I] tensors: output and intermediate (GLU), or the one
    # relu2 keeps (relu's output, which its square and the down GEMM share)
    dropped = S * H * size + (2 if spec.gated else 1) * S * I * size
    if dtype != torch.float32:  # the factors' casts to the weights' dtype
        width = 2 * I if spec.gated else I  # the first projection's output
        dropped += 2 * E * R * (H + width + I + H) * size
    kept = T * H * size + 2 * S * 8  # the token rows and at most two int64 [S] indices of the gather
    assert new_bytes <= old_bytes - dropped + kept, (new_bytes, old_bytes, dropped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_lora_experts_stage_on_permuted_rows_is_the_composed_ops(dtype):
    """The experts stage alone (rows [S, H] in, as under a non-local dispatch): the same bits, and
    the activation's output and intermediate not kept."""
    spec = SPECS["swiglu"]
    module, view, hidden, ids, weights, params = _case(spec, dtype, seed=2)
    choice = resolve_backend("torch")
    rows, perm = choice.permutation(hidden.detach(), ids, E)
    rows.requires_grad_()
    frozen = list(module.parameters())
    want, old_bytes = saved_bytes(lambda: _composed_lora_mlp(rows, perm.offsets, view, spec, None), frozen + params)
    got, new_bytes = saved_bytes(lambda: lora_experts_grouped_mm(rows, perm.counts, perm.offsets, view, spec),
                                  frozen + params)
    _assert_same_bits(got, want, [rows] + params, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    assert new_bytes <= old_bytes - 2 * S * I * size, (new_bytes, old_bytes)
