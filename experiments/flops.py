"""Analytic model FLOPs of one training step, and peak FLOP/s per GPU model (for MFU).

Convention (written down once, used everywhere):

* A matmul of [m, k] x [k, n] costs 2*m*k*n FLOPs. Only matmuls (and the attention score/value
  products) are counted; norms, activations, softmax, routing sort/scatter and the optimizer are not.
* Per token, forward:
  - GQA attention: q/k/v/o projections 2*H*(nh*hd + 2*nkv*hd) + 2*nh*hd*H; scores and values
    4*nh*hd*ctx, where ctx is the mean number of keys a query sees. Causal attention is counted at
    one half: ctx = S/2 for a sequence of S tokens; a sliding window W gives
    ctx = (W*W/2 + (S-W)*W)/S for S > W (= S/2 when W >= S).
  - MLA (DeepSeek-V3): q = 2*H*nh*dqk (or 2*H*rq + 2*rq*nh*dqk with a query low rank rq),
    kv = 2*H*(rkv + d_rope) + 2*rkv*nh*(d_nope + dv), o = 2*nh*dv*H; scores 2*nh*(dqk + dv)*ctx.
  - MoE: router 2*H*E; routed experts k * m * 2*He*I with m = 3 matmuls for gated (SwiGLU) experts
    and m = 2 for non-gated ones (NemotronH relu2), He = latent size where the model projects to one
    (+ 2 * 2*H*He for the two latent projections); shared experts m * 2*H*I_shared.
  - Dense MLP: m * 2*H*I.
  - Mamba-2 mixer (NemotronH): in_proj 2*H*(2*di + 2*g*ds + nh), out_proj 2*di*H, causal conv
    2*kw*(di + 2*g*ds), state-space scan approximated as 3 * 2*di*ds (state update, readout and
    chunk-state passing; the intra-chunk quadratic term is left out).
  - LM head 2*H*V; the embedding lookup costs nothing.
* Training step = forward + backward = 3 x forward (backward = 2 x forward). Recomputation under
  activation checkpointing is not counted: these are model FLOPs (MFU), not hardware FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peak per GPU, in TFLOP/s, used as the MFU denominator.
# Vendor spec sheets, dense (no 2:4 sparsity). Measured note: on one H200 a bf16 8192^3 matmul
# reaches about 790 TFLOP/s (80% of 989), the practical ceiling of a single GEMM.
PEAK_TFLOPS_BF16 = {
    "h200": 989.0,
    "h100": 989.0,
    "a100": 312.0,
    "b200": 2250.0,
    "l40s": 362.0,
}
MEASURED_CEILING_NOTE = "H200: bf16 8192^3 matmul measured at ~790 TFLOP/s (0.80 of the 989 spec peak)"


def peak_tflops(gpu: str | None) -> float | None:
    """Spec bf16 dense peak for a normalised GPU name (``h200``), or None (CPU, unknown GPU)."""
    if not gpu:
        return None
    return PEAK_TFLOPS_BF16.get(gpu.lower())


@dataclass(frozen=True)
class LayerKind:
    mixer: str | None  # "attn" | "sliding_attn" | "mla" | "mamba" | None
    ffn: str | None  # "moe" | "dense" | None


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def layer_plan(cfg) -> list[LayerKind]:
    """What each decoder layer holds, read from a v5 config."""
    mt = cfg.model_type
    n = cfg.num_hidden_layers
    if mt == "qwen3_moe":
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        dense_only = set(getattr(cfg, "mlp_only_layers", None) or [])
        return [LayerKind("attn", "moe" if (i not in dense_only and cfg.num_experts > 0 and (i + 1) % step == 0)
                          else "dense") for i in range(n)]
    if mt == "mixtral":
        kind = "sliding_attn" if getattr(cfg, "sliding_window", None) else "attn"
        return [LayerKind(kind, "moe") for _ in range(n)]
    if mt == "gpt_oss":
        return [LayerKind("sliding_attn" if t == "sliding_attention" else "attn", "moe") for t in cfg.layer_types[:n]]
    if mt == "deepseek_v3":
        k = cfg.first_k_dense_replace
        return [LayerKind("mla", "dense" if i < k else "moe") for i in range(n)]
    if mt == "nemotron_h":
        table = {"mamba": LayerKind("mamba", None), "linear_attention": LayerKind("mamba", None),
                 "moe": LayerKind(None, "moe"), "attention": LayerKind("attn", None),
                 "full_attention": LayerKind("attn", None), "mlp": LayerKind(None, "dense")}
        return [table[t] for t in cfg.layers_block_type]
    raise NotImplementedError(f"FLOP count: model_type {mt!r} is not described in experiments/flops.py")


def attention_context(seq: int, window: int | None = None) -> float:
    """Mean number of keys one query attends to under causal masking (counted at one half)."""
    if window is None or window >= seq:
        return seq / 2.0
    return (window * window / 2.0 + (seq - window) * window) / seq


def _gated(cfg) -> bool:
    act = _get(cfg, "mlp_hidden_act", "hidden_act", default="silu")
    return cfg.model_type != "nemotron_h" and act != "relu2"


def forward_flops_per_token(cfg, seq: int) -> dict[str, float]:
    """Forward FLOPs per token, split into parts (attention, moe, dense_mlp, mamba, lm_head)."""
    H = cfg.hidden_size
    parts = {"attn_proj": 0.0, "attn_scores": 0.0, "moe_router": 0.0, "moe_experts": 0.0,
             "moe_shared": 0.0, "dense_mlp": 0.0, "mamba": 0.0, "lm_head": 2.0 * H * cfg.vocab_size}
    m = 3 if _gated(cfg) else 2
    for lk in layer_plan(cfg):
        if lk.mixer in ("attn", "sliding_attn"):
            nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
            hd = _get(cfg, "head_dim", default=H // nh)
            parts["attn_proj"] += 2 * H * (nh * hd + 2 * nkv * hd) + 2 * nh * hd * H
            window = cfg.sliding_window if lk.mixer == "sliding_attn" else None
            parts["attn_scores"] += 4 * nh * hd * attention_context(seq, window)
        elif lk.mixer == "mla":
            nh = cfg.num_attention_heads
            dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
            dqk = dn + dr
            rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
            q = 2 * H * nh * dqk if not rq else 2 * H * rq + 2 * rq * nh * dqk
            kv = 2 * H * (rkv + dr) + 2 * rkv * nh * (dn + dv)
            parts["attn_proj"] += q + kv + 2 * nh * dv * H
            parts["attn_scores"] += 2 * nh * (dqk + dv) * attention_context(seq)
        elif lk.mixer == "mamba":
            nh, hd, ds, g = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
            di = nh * hd
            parts["mamba"] += (2 * H * (2 * di + 2 * g * ds + nh) + 2 * di * H
                               + 2 * cfg.conv_kernel * (di + 2 * g * ds) + 3 * 2 * di * ds)
        if lk.ffn == "moe":
            E = _get(cfg, "num_experts", "n_routed_experts", "num_local_experts")
            k = cfg.num_experts_per_tok
            I = _get(cfg, "moe_intermediate_size", "intermediate_size")
            latent = getattr(cfg, "moe_latent_size", None)
            He = latent or H
            parts["moe_router"] += 2 * H * E
            parts["moe_experts"] += k * m * 2 * He * I + (2 * 2 * H * latent if latent else 0)
            if cfg.model_type == "nemotron_h":
                parts["moe_shared"] += m * 2 * H * cfg.moe_shared_expert_intermediate_size
            elif getattr(cfg, "n_shared_experts", None):
                parts["moe_shared"] += m * 2 * H * I * cfg.n_shared_experts
        elif lk.ffn == "dense":
            parts["dense_mlp"] += m * 2 * H * cfg.intermediate_size
    return parts


def train_flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward) per token."""
    return 3.0 * sum(forward_flops_per_token(cfg, seq).values())


def train_step_flops(cfg, batch: int, seq: int) -> float:
    """Model FLOPs of one training step on ``batch`` sequences of ``seq`` tokens (one GPU's share)."""
    return train_flops_per_token(cfg, seq) * batch * seq
