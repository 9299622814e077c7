"""moe_lab.Options: one typed object for every switch; the MOE_LAB_* overrides read in one place."""
import subprocess
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.options import ENVIRONMENT_OVERRIDES, Options

ROOT = Path(__file__).resolve().parents[1]


def test_options_refuse_unknown_names_and_bad_values(tmp_path):
    with pytest.raises(TypeError, match="fused_nrom"):
        Options.build(fused_nrom=True)
    with pytest.raises(TypeError, match="must be True or False"):
        Options(tf32="yes")
    with pytest.raises(FileNotFoundError, match="autotune_pin"):
        Options(autotune_pin=str(tmp_path / "missing.json"))


def test_environment_overrides_read_as_documented(tmp_path):
    pin = tmp_path / "block.json"
    pin.write_text("{}")
    opts = Options.from_environment(environ={"MOE_LAB_TRITON_TF32": "1", "MOE_LAB_TRITON_AUTOTUNE": "0",
                                             "MOE_LAB_HOST_CHECKS": "", "MOE_LAB_TRITON_PIN": str(pin)})
    assert opts.tf32 and not opts.autotune and not opts.host_checks and opts.autotune_pin == str(pin)
    assert Options.from_environment(Options(tma=True), environ={}).tma  # unset keeps what was asked
    assert opts.changed() == {"tf32": True, "autotune": False, "autotune_pin": str(pin)}
    assert opts.key() == f"+tf32+no_autotune+autotune_pin={pin}"
    assert Options().key() == ""
    assert Options(fused_norm=False).key() == "+no_fused_norm" and Options(fused_rope=True).key() == "+fused_rope"
    with pytest.raises(TypeError, match="True, False or None"):
        Options(fused_norm="yes")
    with pytest.raises(TypeError, match="must be True or False"):
        Options(fused_cross_entropy=None)


def test_no_moe_lab_variable_is_read_outside_options():
    """The library and the kernels read no MOE_LAB_* variable except in moe_lab/options.py."""
    out = subprocess.run(["git", "grep", "-n", "-E", r"environ.*MOE_LAB_|MOE_LAB_[A-Z_]+\"?\)", "--",
                          "moe_lab", "triton_kernels"], cwd=ROOT, capture_output=True, text=True).stdout
    offenders = [line for line in out.splitlines() if not line.startswith("moe_lab/options.py")]
    assert offenders == [], offenders
    assert set(ENVIRONMENT_OVERRIDES.values()) <= set((ROOT / "moe_lab" / "options.py").read_text().split("``"))


def test_from_config_takes_options_and_keyword_switches(tiny_qwen3_config=None):
    from tiny_models import tiny_config

    config = tiny_config("qwen3_moe")
    model = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch", options=Options(fused_norm=False))
    assert model.moe_lab_options == Options(fused_norm=False)
    if not torch.cuda.is_available():  # the CPU: the kernels' defaults stay off
        assert model.moe_lab_defaults == {"fused_rope": "off: no CUDA GPU here"}
    with pytest.raises(TypeError, match="unknown moe_lab option"):
        moe_lab.AutoModelForCausalLM.from_config(config, options={"fused_loss": True})


def test_patch_model_takes_the_same_options():
    import transformers
    from tiny_models import tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    moe_lab.patch_model(model, "torch", options=Options(autotune=False), substitute=True)
    assert model.moe_lab_options == Options(autotune=False, substitute=True)
    with pytest.raises(TypeError, match="unknown moe_lab option"):
        moe_lab.patch_model(transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")), "torch", fused=True)


def _rotates_backwards(q, k, cos, sin, unsqueeze_dim=1):
    """A rotary function of none of the kernel's forms (rotate-half by the negated angles)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import rotate_half

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos - rotate_half(q) * sin, k * cos - rotate_half(k) * sin


@pytest.mark.parametrize("family, rope", [("qwen3_moe", "on"), ("gpt_oss", "on"), ("deepseek_v3", "on"),
                                          ("qwen3_moe-other-rotary", "off: fused_rope")])
def test_default_kernel_options_turn_on_where_they_compute_v5s_function(monkeypatch, family, rope):
    """With a Triton device (here: the interpreter, standing in for a GPU), fused_norm and fused_rope
    default to on where the model's norms and rotary are what the kernels compute (the rotate-half
    form, GPT-OSS's half-width form, DeepSeek-V3's interleaved pairs); a model the kernel refuses (here
    a modeling file whose rotary function is none of these) keeps v5's function, and the plan of
    defaults says why. Outputs match v5's either way."""
    import transformers
    from tiny_models import tiny_config
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    monkeypatch.setattr(moe_lab.hf, "_why_no_triton_device", lambda: None)
    if family.endswith("-other-rotary"):
        family = family.removesuffix("-other-rotary")
        monkeypatch.setattr(modeling_qwen3_moe, "apply_rotary_pos_emb", _rotates_backwards)
    config = tiny_config(family)
    torch.manual_seed(0)
    model = moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch")
    assert model.moe_lab_defaults["fused_norm"] == "on"
    assert model.moe_lab_defaults["fused_rope"].startswith(rope)
    opted_in = [hasattr(m, "_moe_lab_rope_plain_forward") for m in model.modules()
                if type(m).__name__.endswith("Attention")]
    assert opted_in and all(flag == (rope == "on") for flag in opted_in)
    torch.manual_seed(0)
    vanilla = transformers.AutoModelForCausalLM.from_config(config)
    tokens = torch.randint(0, config.vocab_size, (1, 6))
    torch.testing.assert_close(model(tokens).logits, vanilla(tokens).logits, rtol=1e-5, atol=1e-5)
