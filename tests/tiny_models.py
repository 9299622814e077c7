"""Tiny random configs of each supported family, small enough for fast CPU tests, a v5 / moe_lab pair
with the same weights, and a gradient comparison."""
from __future__ import annotations

import torch
import transformers

COMMON = dict(vocab_size=61, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, tie_word_embeddings=False)


def tiny_config(family: str, num_experts: int = 6, top_k: int = 2, layers: int = 2, **overrides):
    """A tiny v5 config of `family` ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe", "olmoe")."""
    if family == "qwen3_moe":
        kw = dict(COMMON, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=layers,
                  num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True)
        cls = transformers.Qwen3MoeConfig
    elif family == "mixtral":
        kw = dict(COMMON, intermediate_size=24, num_hidden_layers=layers, num_local_experts=num_experts,
                  num_experts_per_tok=top_k)
        cls = transformers.MixtralConfig
    elif family == "gpt_oss":
        kw = dict(COMMON, intermediate_size=24, num_hidden_layers=layers, num_local_experts=num_experts,
                  num_experts_per_tok=top_k, sliding_window=16, layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2))
        cls = transformers.GptOssConfig
    elif family == "deepseek_v3":
        kw = dict(COMMON, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=layers + 1,
                  first_k_dense_replace=1, n_routed_experts=num_experts, num_experts_per_tok=top_k,
                  n_group=2 if num_experts % 2 == 0 else 1, topk_group=1, n_shared_experts=1,
                  routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16,
                  qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
        kw.pop("head_dim")
        kw.update(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cls = transformers.DeepseekV3Config
    elif family == "qwen2_moe":
        kw = dict(COMMON, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                  num_hidden_layers=layers, num_experts=num_experts, num_experts_per_tok=top_k)
        cls = transformers.Qwen2MoeConfig
    elif family == "olmoe":
        kw = dict(COMMON, intermediate_size=24, num_hidden_layers=layers, num_experts=num_experts,
                  num_experts_per_tok=top_k)
        cls = transformers.OlmoeConfig
    else:
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]
GENERIC = ["qwen2_moe", "olmoe"]


def v5_and_moe_lab(config, seed: int = 0, **options):
    """(a plain v5 model, a moe_lab model with ``options``) of ``config``, with the same weights."""
    import copy

    import moe_lab

    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    ours = moe_lab.AutoModelForCausalLM.from_config(copy.deepcopy(config), **options)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def assert_same_grads(model, reference, *, rtol: float, atol: float, where: str = "") -> None:
    """Every parameter's gradient in ``model`` equals the same-named one in ``reference``; parameters
    with no gradient in either (frozen, unused) are skipped."""
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if param.grad is not None or grads[name].grad is not None:
            torch.testing.assert_close(param.grad, grads[name].grad, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{where}{name}: {m}")


NEMOTRON_H = "nemotron_h"


def tiny_nemotron_h_config(num_experts: int = 6, top_k: int = 2, n_group: int | None = None, topk_group: int = 1,
                           **overrides):
    """A tiny v5 NemotronH config: Mamba-2, MoE, attention, MoE blocks (two MoE layers, relu2 experts
    and shared expert, routed_scaling_factor 2.5). n_group: 2 where the experts split into groups of
    at least two (v5 scores a group by its two best experts), else 1."""
    if n_group is None:
        n_group = 2 if num_experts % 2 == 0 and num_experts >= 4 else 1
    kw = dict(vocab_size=61, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, tie_word_embeddings=False,
              layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
              mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=4, conv_kernel=4,
              n_routed_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=24,
              moe_shared_expert_intermediate_size=20, intermediate_size=24, mlp_hidden_act="relu2",
              routed_scaling_factor=2.5, n_group=n_group, topk_group=topk_group, norm_topk_prob=True)
    kw.update(overrides)
    return transformers.NemotronHConfig(**kw)


def family_config(family: str, num_experts: int = 6, top_k: int = 2, **overrides):
    """`tiny_config`, or `tiny_nemotron_h_config` for "nemotron_h"."""
    if family == NEMOTRON_H:
        return tiny_nemotron_h_config(num_experts, top_k, **overrides)
    return tiny_config(family, num_experts=num_experts, top_k=top_k, **overrides)


def randomize_correction_bias(model, seed: int = 0, scale: float = 0.05) -> None:
    """Give every `e_score_correction_bias` buffer of ``model`` random values (v5 initialises them to
    zero), of the size of the spread of the sigmoid scores of a freshly initialised router, so the
    bias changes which experts are chosen without deciding every choice alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * scale)
