"""Checkpoints stay standard HF checkpoints both ways; bad input gets a clear error."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import moe_lab
from moe_lab.registry import register_stage, resolve_backend
from tiny_models import FAMILIES, tiny_config


def _ids(vocab, shape=(2, 8), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_to_moe_lab_train_save_back_to_vanilla(family, tmp_path):
    """The issue's new-user story: v5 saves, moe_lab loads, trains a step, saves; v5 loads the same logits."""
    torch.manual_seed(0)
    vanilla = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    vanilla.save_pretrained(tmp_path / "v5")
    ours = moe_lab.AutoModelForCausalLM.from_pretrained(tmp_path / "v5", moe_backend="torch")
    assert any(isinstance(m, moe_lab.MoELayer) for m in ours.modules())
    input_ids = _ids(vanilla.config.vocab_size)
    torch.testing.assert_close(ours(input_ids).logits, vanilla(input_ids).logits, rtol=1e-4, atol=1e-5)

    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    ours(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    ours.save_pretrained(tmp_path / "trained")

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert not any(isinstance(m, moe_lab.MoELayer) for m in reloaded.modules())
    after = ours(input_ids).logits
    assert not torch.allclose(after, vanilla(input_ids).logits), "the training step must change the model"
    torch.testing.assert_close(reloaded(input_ids).logits, after, rtol=1e-5, atol=1e-6)


def test_saved_keys_are_v5_keys(tmp_path):
    torch.manual_seed(0)
    vanilla = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    vanilla.save_pretrained(tmp_path / "v5")
    moe_lab.AutoModelForCausalLM.from_pretrained(tmp_path / "v5").save_pretrained(tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "v5" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_per_expert_checkpoint_loads(tmp_path):
    """An older-style checkpoint with one tensor per expert (gate_proj/up_proj/down_proj) loads
    through v5's weight conversion into moe_lab's fused 3D experts."""
    torch.manual_seed(0)
    vanilla = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    vanilla.save_pretrained(tmp_path / "fused")
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    per_expert = {}
    for key, tensor in fused.items():
        if key.endswith("experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                per_expert[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e].contiguous()
                per_expert[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e].contiguous()
        elif key.endswith("experts.down_proj"):
            for e in range(tensor.shape[0]):
                per_expert[key.replace("down_proj", f"{e}.down_proj.weight")] = tensor[e].contiguous()
        else:
            per_expert[key] = tensor
    (tmp_path / "fused" / "model.safetensors").unlink()
    save_file(per_expert, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    ours = moe_lab.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", moe_backend="eager")
    input_ids = _ids(vanilla.config.vocab_size)
    torch.testing.assert_close(ours(input_ids).logits, vanilla(input_ids).logits, rtol=1e-4, atol=1e-5)


def test_unknown_backend_is_refused_before_loading():
    with pytest.raises(ValueError, match="unknown moe_backend 'fast'.*available backends: auto, eager"):
        moe_lab.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), moe_backend="fast")


def test_unknown_stage_and_implementation_are_refused():
    with pytest.raises(ValueError, match="unknown stages"):
        resolve_backend({"routing": "torch"})
    with pytest.raises(ValueError, match="the experts stage has no implementation 'nope'"):
        resolve_backend({"experts": "nope"})


def test_per_stage_mapping_mixes_backends():
    choice = resolve_backend({"experts": "eager"})
    assert choice.names["experts"] == "eager" and choice.names["permutation"] == "torch"
    assert resolve_backend("eager").label == "eager"
    model = moe_lab.AutoModelForCausalLM.from_config(tiny_config("mixtral"), moe_backend={"combine": "eager"})
    assert "combine=eager" in model.moe_lab_backend


def test_stage_that_cannot_run_here_is_refused():
    register_stage("experts", "needs-gpu-test", lambda *a: None, lambda: "needs a CUDA GPU; none is visible")
    with pytest.raises(RuntimeError, match="experts stage 'needs-gpu-test' cannot run here: needs a CUDA GPU"):
        moe_lab.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), moe_backend={"experts": "needs-gpu-test"})


def test_dense_model_is_refused_with_its_model_type():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(moe_lab.UnsupportedModelError, match="model type 'llama'.*no sparse MoE block"):
        moe_lab.AutoModelForCausalLM.from_config(config)


def test_experts_with_unknown_gating_are_refused():
    """A v5 experts class with its own gating function that moe_lab does not implement."""
    from transformers.models.qwen2_moe import modeling_qwen2_moe as m

    class OddExperts(m.Qwen2MoeExperts):
        def _apply_gate(self, gate_up):
            return gate_up[..., : gate_up.shape[-1] // 2]

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2_moe"))
    model.model.layers[0].mlp.experts.__class__ = OddExperts
    with pytest.raises(moe_lab.UnsupportedModelError, match="'qwen2_moe'.*OddExperts.*own gating function"):
        moe_lab.patch_model(model)
    assert type(model.model.layers[1].mlp.experts).__name__ == "Qwen2MoeExperts", "nothing half-patched"


def test_bad_expert_ids_get_a_clear_error():
    from moe_lab.stages.permute import plan_sorted

    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        plan_sorted(torch.tensor([[0, 4]]), 4)


def test_triton_without_gpu_or_interpreter_says_what_to_do(monkeypatch):
    import torch

    from moe_lab.stages._requires import why_triton_unavailable

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from moe_lab.stages import _requires

    monkeypatch.setattr(_requires, "TRITON_INTERPRETS", False)  # as if Triton had been imported without the interpreter
    with pytest.raises(RuntimeError, match="router stage 'triton' cannot run here: Triton kernels need a CUDA GPU; "
                                           "on the CPU set TRITON_INTERPRET=1"):
        moe_lab.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), moe_backend="triton")
    assert why_triton_unavailable() is not None
