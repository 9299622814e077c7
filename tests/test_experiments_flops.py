"""FLOP counting of experiments/flops.py against hand counts."""
import math

import pytest
from transformers import DeepseekV3Config, GptOssConfig, Qwen3MoeConfig

from experiments import flops, models


def tiny_qwen():
    return Qwen3MoeConfig(hidden_size=8, intermediate_size=16, moe_intermediate_size=6, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=1, vocab_size=10)


def test_tiny_qwen_hand_count():
    cfg, seq, batch = tiny_qwen(), 4, 2
    # q,k,v,o: 2*8*(2*4 + 2*1*4) + 2*(2*4)*8 = 256 + 128
    attn_proj = 384
    # QK^T and PV: 2 matmuls * 2 FLOPs * heads 2 * head_dim 4 * mean keys seen (causal, half of 4 = 2)
    attn_scores = 4 * 2 * 4 * 2
    router = 2 * 8 * 4
    experts = 2 * 3 * (2 * 8 * 6)  # top-2, gate/up/down
    lm_head = 2 * 8 * 10
    fwd = attn_proj + attn_scores + router + experts + lm_head
    assert fwd == 1248
    parts = flops.forward_flops_per_token(cfg, seq)
    assert parts["attn_proj"] == attn_proj and parts["attn_scores"] == attn_scores
    assert parts["moe_router"] == router and parts["moe_experts"] == experts and parts["lm_head"] == lm_head
    assert flops.train_flops_per_token(cfg, seq) == 3 * 1248
    assert flops.train_step_flops(cfg, batch, seq) == 3 * 1248 * batch * seq == 29952


def test_attention_context_half_and_window():
    assert flops.attention_context(4096) == 2048
    assert flops.attention_context(100, window=200) == 50
    # window 2 over 4 tokens: keys seen 1,2,2,2 counted as W^2/2 + (S-W)*W = 2 + 4 -> 6/4
    assert flops.attention_context(4, window=2) == 1.5


def test_sparse_step_and_dense_layers():
    cfg = tiny_qwen()
    cfg.num_hidden_layers, cfg.mlp_only_layers = 2, [0]
    plan = flops.layer_plan(cfg)
    assert [lk.ffn for lk in plan] == ["dense", "moe"]
    assert flops.forward_flops_per_token(cfg, 4)["dense_mlp"] == 3 * 2 * 8 * 16


def test_mla_and_shared_experts_hand_count():
    cfg = DeepseekV3Config(hidden_size=8, intermediate_size=16, moe_intermediate_size=6, num_attention_heads=2,
                           num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                           first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=3, q_lora_rank=None,
                           qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, num_hidden_layers=1, vocab_size=10)
    p = flops.forward_flops_per_token(cfg, 4)
    q = 2 * 8 * 2 * 4
    kv = 2 * 8 * (3 + 2) + 2 * 3 * 2 * (2 + 2)
    o = 2 * 2 * 2 * 8
    assert p["attn_proj"] == q + kv + o
    assert p["attn_scores"] == 2 * 2 * (4 + 2) * 2
    assert p["moe_shared"] == 3 * 2 * 8 * 6


def test_gpt_oss_sliding_layers():
    cfg = GptOssConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=6, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, num_local_experts=4, num_experts_per_tok=2,
                       sliding_window=2, vocab_size=10, layer_types=["sliding_attention", "full_attention"])
    p = flops.forward_flops_per_token(cfg, 4)
    assert p["attn_scores"] == 4 * 2 * 4 * (1.5 + 2.0)


@pytest.mark.parametrize("name", models.available())
def test_every_geometry_has_a_flop_count(name):
    layers = {"nemotron-3-nano": 6}.get(name, 2)
    cfg = models.build_config(name, layers)
    assert cfg.num_hidden_layers == layers or len(getattr(cfg, "layers_block_type", [])) == layers
    f = flops.train_flops_per_token(cfg, 1024)
    assert f > 0 and math.isfinite(f)


def test_peak_table():
    assert flops.peak_tflops("h200") == 989.0 and flops.peak_tflops("cpu") is None
