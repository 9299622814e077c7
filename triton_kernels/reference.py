"""Plain-PyTorch references for the kernels in this package: readable, slow, the definition of
right. Tests hold the Triton kernels to these. The router's reference is moe_lab's
``moe_lab.stages.router.select_experts`` (the one definition of routing; this package imports
nothing from moe_lab, the router's tests do). Shapes follow the kernels' docstrings:
T tokens, H hidden, E experts, k top-k, S = T*k routed rows, I expert width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _bounds(offsets: torch.Tensor):
    """[(start, end)] rows per expert from int32 cumulative end offsets [E]."""
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


# ---------------------------------------------------------------------------------------------
# Grouped GEMM and the expert MLP
# ---------------------------------------------------------------------------------------------
def grouped_mm_ref(x, w, offsets, bias=None):
    """x [S, K], w [E, K, N], offsets int32 [E], bias [E, N] | None -> [S, N]: one matmul per expert."""
    outs = []
    for e, (s, t) in enumerate(_bounds(offsets)):
        y = x[s:t] @ w[e]
        outs.append(y + bias[e] if bias is not None else y)
    return torch.cat(outs, 0) if outs else x.new_zeros(0, w.shape[2])


def swiglu_ref(gate, up):
    return F.silu(gate) * up


def gpt_oss_act_ref(gate, up, alpha=1.702, limit=7.0):
    """Transformers' GptOssExperts._apply_gate on already-split gate / up."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def relu2_ref(up):
    """Transformers' ACT2FN["relu2"] (ReLUSquaredActivation): square(relu(up)), non-gated."""
    return torch.square(F.relu(up))


NON_GATED = {"relu2": relu2_ref}  # activations of one up projection (gate_up is then up_proj)


def expert_mlp_ref(x, gate_up, down, offsets, activation="swiglu", gate_up_bias=None, down_bias=None,
                   transposed=False, concatenated=None, alpha=1.702, limit=7.0):
    """The per-expert loop, in HF v5 layouts (see expert_mlp). x [S, H] -> [S, H]. For a non-gated
    activation ("relu2") gate_up is the up projection [E, I, H] ([E, H, I] transposed)."""
    if concatenated is None:
        concatenated = not transposed
    outs = []
    for e, (s, t) in enumerate(_bounds(offsets)):
        w_gu = gate_up[e] if transposed else gate_up[e].t()  # [H, 2I]
        w_d = down[e] if transposed else down[e].t()  # [I, H]
        h = x[s:t] @ w_gu
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        if activation in NON_GATED:
            a = NON_GATED[activation](h)
        else:
            i = h.shape[-1] // 2
            gate, up = (h[:, :i], h[:, i:]) if concatenated else (h[:, 0::2], h[:, 1::2])
            a = swiglu_ref(gate, up) if activation == "swiglu" else gpt_oss_act_ref(gate, up, alpha, limit)
        y = a @ w_d
        outs.append(y + down_bias[e] if down_bias is not None else y)
    return torch.cat(outs, 0) if outs else x.new_zeros(0, x.shape[1])


# ---------------------------------------------------------------------------------------------
# Permutation
# ---------------------------------------------------------------------------------------------
def sort_by_expert_ref(ids: torch.Tensor, num_experts: int):
    """ids [T, k] -> (sorted_slots int64 [S], counts int64 [E], offsets int32 [E]).

    sorted_slots is a STABLE sort of the flattened ids: equal experts keep slot order t*k+j."""
    flat = ids.reshape(-1).long()
    sorted_slots = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return sorted_slots, counts, counts.cumsum(0).to(torch.int32)


def inverse_permutation_ref(sorted_slots: torch.Tensor) -> torch.Tensor:
    """inv[slot] = sorted row of that slot."""
    inv = torch.empty_like(sorted_slots)
    inv[sorted_slots] = torch.arange(sorted_slots.numel(), device=sorted_slots.device)
    return inv


def permute_ref(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """x [T, H] -> [S, H]: row r is token sorted_slots[r] // k."""
    return x[sorted_slots // top_k]


def combine_ref(y: torch.Tensor, weights: torch.Tensor, sorted_slots: torch.Tensor) -> torch.Tensor:
    """y [S, H] expert outputs in sorted order, weights [T, k] -> out [T, H]:
    out[t] = sum_j weights[t, j] * y[inv[t*k+j]], summed in fp32, j ascending."""
    T, k = weights.shape
    rows = y[inverse_permutation_ref(sorted_slots)].view(T, k, y.shape[1]).float()
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):
        out = out + weights[:, j:j + 1].float() * rows[:, j]
    return out.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# RMSNorm, rotary embedding, the cross-entropy rows, AdamW
# ---------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_last: bool = False) -> torch.Tensor:
    """v5's two RMSNorm formulas (see rmsnorm.rms_norm), n = x.float() * rsqrt(mean(x^2) + eps):
    weight * n.to(x.dtype), or with ``weight_last`` (GPT-OSS) (weight * n).to(x.dtype)."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * n).to(x.dtype) if weight_last else weight * n.to(x.dtype)


def rotate_half_ref(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D], cos/sin [B or 1, S, D] -> x * cos + rotate_half(x) * sin (v5's
    apply_rotary_pos_emb with cos/sin unsqueezed over the heads)."""
    return x * cos.unsqueeze(1) + rotate_half_ref(x) * sin.unsqueeze(1)


def log_sum_exp_ref(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise max + log(sum(exp(x - max))) in float32, as v5's loss (log_softmax) computes it: NaN
    for a row with a NaN or +inf logit or only -inf ones (torch.logsumexp would give +-inf)."""
    z = logits.float()
    row_max = z.amax(dim=-1, keepdim=True)
    return (row_max + torch.log(torch.exp(z - row_max).sum(dim=-1, keepdim=True))).squeeze(-1)


def adamw_ref(param, grad, exp_avg, exp_avg_sq, *, step: int, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float):
    """One AdamW step as PyTorch's fused CUDA kernel computes it (float32 arithmetic; the decay only
    where weight_decay != 0) -> new (param, exp_avg, exp_avg_sq) in float32."""
    p, g, m, v = (t.float() for t in (param, grad, exp_avg, exp_avg_sq))
    if weight_decay != 0:
        p = p - (lr * weight_decay) * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    step_size = lr / (1 - beta1 ** step)
    p = p - step_size * m / (v.sqrt() / math.sqrt(1 - beta2 ** step) + eps)
    return p, m, v
