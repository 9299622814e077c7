"""AdamW step as one elementwise Triton kernel per parameter tensor.

Each element is read once (parameter, gradient, both moments) and written once (parameter, both
moments), with the arithmetic in float32 whatever the storage dtype, as PyTorch's fused AdamW does:

    p <- p - lr * weight_decay * p          (only where weight_decay != 0, as PyTorch's fused kernel)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Bytes per element with bf16 storage: 14 (read p, g, m, v; write p, m, v), so the step over N
parameters costs at best 14 N / (copy bandwidth).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr_wd, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                  step_size, inv_sqrt_bc2, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DECAY:  # skipped without weight decay: an inf parameter stays inf (inf - 0 * inf would be NaN)
        p = p - lr_wd * p  # lr * weight_decay from the host: 1 - lr*wd in fp32 would round the decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place (all contiguous, same shape; any
    float dtypes) for optimizer step number ``step`` (1 for the first). Scalars may be 0-d tensors."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"AdamW step: {name} has shape {tuple(t.shape)}, the parameter {tuple(param.shape)}")
    for name, t in (("parameter", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"AdamW step: the {name} of the parameter of shape {tuple(param.shape)} is not "
                             f"contiguous (strides {t.stride()}); the Triton AdamW wants contiguous tensors")
    step, lr, beta1, beta2 = int(step), float(lr), float(beta1), float(beta2)
    eps, weight_decay = float(eps), float(weight_decay)
    if step < 1:
        raise ValueError(f"AdamW step: step counts from 1, got {step}")
    n = param.numel()
    if n == 0:
        return
    step_size = lr / (1.0 - beta1 ** step)
    inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step)
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](param, grad, exp_avg, exp_avg_sq, n, lr * weight_decay, beta1,
                                           1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, inv_sqrt_bc2,
                                           DECAY=weight_decay != 0, BLOCK=BLOCK, num_warps=8)
