"""The fused RMSNorm (Triton, interpreter here) equals v5's RMSNorm modules, forward and gradients, for
both formulas, and a model with `fused_norm=True` trains like v5. float32 pins the math; the two
formulas differ only in bf16 rounding, which tests/test_step_kernels_gpu.py checks on the GPU."""
from __future__ import annotations


import pytest
import torch
import transformers
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

import moe_lab
from markers import needs_interpreter
from tiny_models import assert_same_grads, tiny_config, v5_and_moe_lab
from triton_kernels.rmsnorm import rms_norm

pytestmark = needs_interpreter


@pytest.mark.parametrize("norm_class,weight_last", [(Qwen3MoeRMSNorm, False), (GptOssRMSNorm, True)])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 100), (0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_v5_module(norm_class, weight_last, shape, dtype):
    torch.manual_seed(sum(shape))
    norm = norm_class(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]) * 0.5 + 1)
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    want = norm(x)
    want_dx, want_dw = torch.autograd.grad(want, [x, norm.weight], dy)
    got = rms_norm(x, norm.weight, norm.variance_epsilon, weight_last=weight_last)
    got_dx, got_dw = torch.autograd.grad(got, [x, norm.weight], dy)
    assert got.dtype == want.dtype and got_dw.dtype == want_dw.dtype
    # fp32: same math; bf16: one rounding apart (the interpreter truncates casts), dw summed in fp32 here
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_dx, want_dx, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(got_dw, want_dw, **tol)
    else:
        assert float((got_dw.float() - want_dw.float()).norm() / want_dw.float().norm().clamp_min(1e-6)) < 2e-2


def test_rms_norm_refuses_mismatched_weight():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)


FAMILY_NORMS = {"qwen3_moe": ("qwen3_moe", "Qwen3MoeRMSNorm", False), "mixtral": ("mixtral", "MixtralRMSNorm", False),
                "gpt_oss": ("gpt_oss", "GptOssRMSNorm", True), "deepseek_v3": ("deepseek_v3", "DeepseekV3RMSNorm", False),
                "qwen2_moe": ("qwen2_moe", "Qwen2MoeRMSNorm", False), "olmoe": ("olmoe", "OlmoeRMSNorm", False)}


@pytest.mark.parametrize("family", sorted(FAMILY_NORMS))
def test_each_family_norm_formula_is_found_by_probing_it(family):
    """Pure PyTorch, bf16 on the CPU (round to nearest): the probe names GPT-OSS's weight-first formula
    and the Llama style for the others, as their v5 sources write them."""
    import importlib

    from moe_lab.training.fused_norm import formula_of

    module_name, class_name, weight_last = FAMILY_NORMS[family]
    norm_class = getattr(importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}"), class_name)
    assert formula_of(norm_class) is weight_last


def test_a_norm_with_another_formula_is_refused():
    from moe_lab.training.fused_norm import formula_of

    class GemmaStyleRMSNorm(Qwen3MoeRMSNorm):
        def forward(self, x):
            n = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (n * (1.0 + self.weight.float())).to(x.dtype)

    with pytest.raises(ValueError, match="neither RMSNorm formula"):
        formula_of(GemmaStyleRMSNorm)


@pytest.mark.parametrize("family", sorted(FAMILY_NORMS))
def test_model_with_fused_norm_trains_like_v5(family, monkeypatch):
    import triton_kernels.rmsnorm as rmsnorm

    calls = []
    kernel = rmsnorm.rms_norm
    monkeypatch.setattr(rmsnorm, "rms_norm", lambda *a, **k: calls.append(k["weight_last"]) or kernel(*a, **k))
    config = tiny_config(family)
    reference, ours = v5_and_moe_lab(config, moe_backend="torch", fused_norm=True)
    norms = [m for m in ours.modules() if type(m).__name__.endswith("RMSNorm")]
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    want, got = reference(ids, labels=ids), ours(ids, labels=ids)
    assert len(calls) >= len(norms) and set(calls) == {FAMILY_NORMS[family][2]}, "every norm runs the kernel"
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(ours, reference, rtol=1e-4, atol=1e-5)


def test_backward_programs_loop_over_several_row_blocks(monkeypatch):
    """More row blocks than backward programs: each program sums its blocks' dw."""
    import triton_kernels.rmsnorm as rmsnorm

    monkeypatch.setattr(rmsnorm, "MAX_BWD_PROGRAMS", 3)
    torch.manual_seed(0)
    x = torch.randn(37, 1000, requires_grad=True)  # 4 rows per block: 10 blocks over 3 programs
    w = torch.randn(1000, requires_grad=True)
    dy = torch.randn(37, 1000)
    got = torch.autograd.grad(rms_norm(x, w, 1e-5), [x, w], dy)
    want = torch.autograd.grad(w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)), [x, w], dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_fall_back_to_v5_with_a_warning(caplog):
    """A float32 weight with bf16 input (autocast-style) runs v5's own forward, said once."""
    from moe_lab.training.fused_norm import enable_fused_norm

    model = torch.nn.Module()
    model.norm = Qwen3MoeRMSNorm(32)
    assert enable_fused_norm(model) == 1
    x = torch.randn(3, 32).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="moe_lab.training.fused_norm"):
        out = model.norm(x)
        model.norm(x)
    torch.testing.assert_close(out, model.norm._moe_lab_plain_forward(x))
    assert sum("v5's own forward runs there" in r.message for r in caplog.records) == 1


def test_from_pretrained_with_fused_norm_keeps_checkpoints_standard(tmp_path):
    """Loading with fused_norm=True gives v5's loss; saving writes the same tensors v5 reads."""
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    reference.save_pretrained(tmp_path / "v5")
    ours = moe_lab.AutoModelForCausalLM.from_pretrained(tmp_path / "v5", moe_backend="torch", fused_norm=True)
    assert all(hasattr(m, "_moe_lab_plain_forward") for m in ours.modules() if type(m).__name__.endswith("RMSNorm"))
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(ids, labels=ids).loss, reference(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)


def test_formula_probe_ignores_the_callers_default_device():
    """Models are built under ``with torch.device("cuda")``; the probe's CPU generator must not follow
    that default (seen on the H200: "Expected a 'cuda' device type for generator"). Meta stands in
    for another device here."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from moe_lab.training.fused_norm import formula_of

    with torch.device("meta"):
        assert formula_of(Qwen3MoeRMSNorm) is False
