"""NemotronH (Nemotron 3 Nano) under the whole-step options: its norms, its attention, its loss.

The family's routing, experts and checkpoints are held to v5 in tests/test_model_parity.py. Here:
`fused_norm` runs every `NemotronHRMSNorm` (the block norms and the final norm, weight applied in
float32 before the cast, as GPT-OSS's) through the Triton kernel and leaves the Mamba-2 mixer's gated
norm (`NemotronHRMSNormGated`, another function) as v5 wrote it; `fused_rope` is refused (NemotronH's
attention applies no rotary embedding: nothing to fuse) and, left to its default, stays off with that
reason; `fused_cross_entropy` gives v5's loss. Triton runs under the interpreter on the CPU.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.nemotron_h import modeling_nemotron_h as nemotron

import moe_lab
from markers import needs_interpreter
from tiny_models import assert_same_grads, randomize_correction_bias, tiny_nemotron_h_config


def _pair(config, seed: int = 0, **options):
    """(v5's model, moe_lab's with `options`) with the same weights, correction biases random."""
    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    randomize_correction_bias(reference, seed)
    ours = moe_lab.AutoModelForCausalLM.from_config(config, **options)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _ids(shape=(2, 13), seed=1):
    return torch.randint(0, 61, shape, generator=torch.Generator().manual_seed(seed))


def _weight_multiplied_before_the_cast() -> bool:
    """What this transformers' NemotronHRMSNorm computes, by hand: weight * normed in float32, cast
    last (5.25), or the normed states cast first, then times the weight (5.17)."""
    norm = nemotron.NemotronHRMSNorm(8)
    norm.weight.data = torch.randn(8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    with torch.no_grad():
        out = norm(x)
        last = (norm.weight * normed).to(torch.bfloat16)
        first = norm.weight * normed.to(torch.bfloat16)
    assert (out.dtype == last.dtype and torch.equal(out, last)) != (out.dtype == first.dtype and torch.equal(out, first))
    return out.dtype == last.dtype and torch.equal(out, last)


def test_norm_formula_is_found_by_probing_it():
    """The probe finds the formula this transformers' NemotronHRMSNorm has (it changed between releases)."""
    from moe_lab.training.fused_norm import formula_of

    assert formula_of(nemotron.NemotronHRMSNorm) is _weight_multiplied_before_the_cast()


@needs_interpreter
@pytest.mark.parametrize("latent", [None, 16])
def test_fused_norm_trains_like_v5_and_leaves_the_gated_norm_alone(latent, monkeypatch):
    import triton_kernels.rmsnorm as rmsnorm

    calls = []
    kernel = rmsnorm.rms_norm
    monkeypatch.setattr(rmsnorm, "rms_norm", lambda *a, **k: calls.append(k["weight_last"]) or kernel(*a, **k))
    config = tiny_nemotron_h_config(moe_latent_size=latent)
    reference, ours = _pair(config, moe_backend="torch", fused_norm=True)
    norms = [m for m in ours.modules() if type(m) is nemotron.NemotronHRMSNorm]
    assert len(norms) == 5  # one per block (4) and the final norm
    assert all(hasattr(m, "_moe_lab_plain_forward") for m in norms)
    # the Mamba mixer's gated norm: NemotronHRMSNormGated (5.25) or Zamba2RMSNormGated (5.17)
    gated = [m for m in ours.modules() if type(m).__name__.endswith("RMSNormGated")]
    assert len(gated) == 1 and "forward" not in vars(gated[0]) and not hasattr(gated[0], "_moe_lab_plain_forward")
    ids = _ids()
    want, got = reference(ids, labels=ids), ours(ids, labels=ids)
    assert len(calls) == len(norms) and set(calls) == {_weight_multiplied_before_the_cast()}, \
        "every NemotronHRMSNorm runs the kernel, with v5's formula"
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    want.loss.backward()
    got.loss.backward()
    assert_same_grads(ours, reference, rtol=1e-4, atol=1e-5)


def test_fused_rope_is_refused_nemotron_h_attention_has_no_rotary():
    """NemotronHAttention projects q/k/v and attends with no positional rotation: nothing to fuse,
    so asking for it is refused before the model changes."""
    assert "apply_rotary_pos_emb" not in nemotron.NemotronHAttention.forward.__code__.co_names
    config = tiny_nemotron_h_config()
    with pytest.raises(ValueError, match="no attention module of NemotronHForCausalLM calls"):
        moe_lab.AutoModelForCausalLM.from_config(config, moe_backend="torch", fused_rope=True)


@needs_interpreter
def test_defaults_turn_fused_norm_on_and_keep_fused_rope_off_with_the_reason(monkeypatch):
    """With a Triton device (the interpreter standing in for a GPU) the per-model defaults decide:
    the norms are what the kernel computes (on), there is no rotary (off, and why)."""
    monkeypatch.setattr(moe_lab.hf, "_why_no_triton_device", lambda: None)
    reference, ours = _pair(tiny_nemotron_h_config(), moe_backend="torch")
    assert ours.moe_lab_defaults["fused_norm"] == "on"
    assert ours.moe_lab_defaults["fused_rope"].startswith("off: fused_rope: no attention module")
    ids = _ids((1, 6))
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_fused_cross_entropy_gives_v5s_loss_and_gradients():
    config = tiny_nemotron_h_config()
    reference, ours = _pair(config, moe_backend="torch", fused_cross_entropy=True)
    ids = _ids()
    want, got = reference(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    want.loss.backward()
    got.loss.backward()
    assert_same_grads(ours, reference, rtol=1e-4, atol=1e-5)


def test_nemotron_3_nano_geometry_runs_as_the_family():
    """The benchmarked geometry (experiments/models/nemotron-3-nano.yaml), truncated to its first six
    layers (MEMEM*: Mamba-2, MoE, attention) and shrunk in width, routes through the family: top-6 of
    128 experts with sigmoid scores, correction bias, normalised weights times 2.5, relu2 experts, no
    latent projection."""
    from experiments.models import build_config

    config = build_config("nemotron-3-nano", layers=6)
    assert config.moe_latent_size is None
    spec = moe_lab.FAMILIES["nemotron_h"].routing(config)
    assert (spec.num_experts, spec.top_k, spec.score, spec.scaling, spec.renormalize, spec.has_correction_bias) == (
        128, 6, "sigmoid", 2.5, True, True)
    small = {"hidden_size": 64, "moe_intermediate_size": 16, "moe_shared_expert_intermediate_size": 32,
             "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 8, "vocab_size": 61,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    for key, value in small.items():
        setattr(config, key, value)
    reference, ours = _pair(config, moe_backend="torch")
    assert list(ours.moe_lab_plan) == ["model.layers.1.mixer", "model.layers.3.mixer"]
    assert ours.model.layers[1].mixer.experts_spec.activation_key == "plain:relu2"
    ids = _ids((1, 9))
    want, got = reference(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    want.loss.backward()
    got.loss.backward()
    assert_same_grads(ours, reference, rtol=1e-4, atol=1e-5)


def test_auto_trial_runs_the_routed_experts_on_the_latent_rows(monkeypatch):
    """The "auto" backend measures each candidate on this forward's rows (on a GPU; the CPU runs the
    floor): with a latent projection the router's trial reads the hidden states [T, H] and the
    experts' the projected rows [T, H'], forward and backward."""
    from moe_lab.layer import auto_trial

    _, ours = _pair(tiny_nemotron_h_config(moe_latent_size=16), moe_backend="torch")
    layer = ours.model.layers[1].mixer
    hidden = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    step = auto_trial(hidden, layer.experts, layer.experts_spec, True, layer.dispatcher, router=layer.gate,
                      routing=layer.routing, expert_hidden=layer.fc1_latent_proj(hidden))(layer.choice)
    step()
    assert layer.experts.up_proj.grad is None, "a trial leaves the model's gradients alone"

    ran = []
    planner = layer.planner
    plain = planner.choice_for

    def choice_for(weight, tokens=None, backward=False, trial=None, **kwargs):
        trial(layer.choice)()  # what auto does with each candidate on a GPU
        ran.append((tokens, backward))
        return plain(weight, tokens, backward, trial, **kwargs)

    monkeypatch.setattr(planner, "choice_for", choice_for)
    layer(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)).sum().backward()
    assert ran == [(10, True)]


def test_router_capabilities_cover_nemotron_h_routing_or_say_what_is_missing():
    """The Triton router implements every routing feature NemotronH uses (the parity tests run it);
    TE's fused top-k (softmax families) refuses it, naming the missing features."""
    from moe_lab.registry import LayerNeeds, capabilities

    config = tiny_nemotron_h_config()
    needs = LayerNeeds("nemotron_h", moe_lab.FAMILIES["nemotron_h"].routing(config).features(), "plain:relu2",
                       "cuda", torch.bfloat16)
    assert needs.routing_features == {"sigmoid", "renormalize", "group_limited", "correction_bias", "scaling",
                                      "logits_fp32"}
    assert capabilities("router", "triton").why_not(needs, "router") is None
    te_why = capabilities("router", "te").why_not(needs, "router")
    assert te_why == "does not implement nemotron_h's routing (correction_bias, group_limited, sigmoid)"
