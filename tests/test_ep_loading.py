"""The checkpoint reader of expert-parallel loading: every layout v5 writes, whole and in expert slices."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moe_lab.parallel.loading import _CheckpointReader, _checkpoint_files, _is_tied
from tiny_models import FAMILIES, tiny_config


@pytest.mark.parametrize("family", FAMILIES + ["olmoe"])
def test_reader_rebuilds_every_tensor_and_expert_slices(family, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, num_experts=4))
    model.save_pretrained(tmp_path)
    reader = _CheckpointReader(_checkpoint_files(Path(tmp_path)))
    for name, tensor in model.state_dict().items():
        if _is_tied(model, name):
            continue
        assert reader.can_read(name), name
        assert torch.equal(reader.read(name, None), tensor), name
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert torch.equal(reader.read(name, (1, 3, 4)), tensor[1:3]), name
    assert not reader.can_read("model.layers.0.mlp.nonexistent.weight")


def test_quantised_checkpoints_go_through_v5(tmp_path):
    """A checkpoint with scale tensors (fp8 block quantisation) is not read raw by the EP loader."""
    from safetensors.torch import load_file, save_file

    from moe_lab.parallel.loading import load_local_experts

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", num_experts=4))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    def shard(model):
        raise AssertionError("a quantised checkpoint must be refused before the model is built")

    assert load_local_experts(tmp_path, shard) is None
