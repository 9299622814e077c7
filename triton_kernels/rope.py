"""Rotary position embedding as one Triton kernel each way, in the three forms of v5's modeling files.

x [B, H, S, D] (any strides, D contiguous), cos/sin [B or 1, S, W] (any strides) broadcast over
heads. Each form rotates D/2 pairs (a_i, b_i) by angle i and writes ``[a * c - b * s, b * c + a * s]``
(the rotated first members, then the second ones):

* ``"rotate_half"`` (Llama, Qwen3-MoE, Mixtral, DeepSeek-V3 without ``rope_interleave``):
  ``x * cos + rotate_half(x) * sin``; a = x[:D/2], b = x[D/2:], W = D, pair i of the first half
  uses cos[i], of the second cos[D/2 + i] (v5's rotary modules make the halves equal).
* ``"half_width"`` (GPT-OSS's ``_apply_rotary_emb``): a, b the halves as above, W = D/2, both halves
  use cos[i].
* ``"interleaved"`` (DeepSeek-V3's ``apply_rotary_pos_emb_interleave``): a = x[0::2], b = x[1::2]
  (pairs interleaved), W = D of which only cos[:D/2] is read (v5 slices it so); the output is in
  halves, as v5's ``torch.cat`` writes it.

v5 computes this with about ten elementwise kernels per tensor (products, a negation, slices, a
concatenation, a sum) and as many in backward. Here each row of D values is read and written once.
None of the three upcasts (cos/sin come in x's dtype), so the kernel rounds where v5 rounds: each
product to x's dtype, then the sum, to nearest-even as PyTorch does (for bf16 on the bits, see
``_rnd``), and is compiled without multiply-add contraction, so forward and backward equal v5's bit for
bit for normal numbers (bf16 checked under the interpreter and, for rotate_half, on the H200 after the
bit rounding; before it, one ulp off there; fp16/fp32 not GPU-checked). Backward, by autograd's rules
applied to v5's expressions (dout = [g1, g2] in halves; c2 = c1, s2 = s1 for the last two forms):

    da = round(g1 * c1) + round(g2 * s2),   db = round(g2 * c2) - round(g1 * s1)

written back where a and b were read (interleaved pairs for ``"interleaved"``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2

MAX_HEAD_DIM = 1024
FORMS = ("rotate_half", "half_width", "interleaved")


@triton.jit
def _rnd(v, dtype: tl.constexpr):
    """Round a float32 value to ``dtype`` and back (a product or sum as PyTorch stores it). For bf16
    the rounding (to nearest, ties to even) is done on the bits: with a cast there and back 24% of
    outputs were one ulp off v5 on the H200 (the cast folded away or a multiply-add contracted, not
    determined), and the interpreter's casts truncate. NaN stays NaN."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    elif dtype == tl.float32:
        return v
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, R, H, S,
                 sxb, sxh, sxs, sob, soh, sos, scb, scs, scd,
                 BACKWARD: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                 SHARED_TRIG: tl.constexpr = False, INTERLEAVED: tl.constexpr = False):
    """Rows r = (b * H + h) * S + s of x; each program BLOCK_R rows of HALF pairs.

    SHARED_TRIG: both members of pair i use cos/sin[i] (the second half of cos/sin is not read).
    INTERLEAVED: pair i is (x[2i], x[2i + 1]) on the interleaved side (the input forward, the output
    backward); the other side is in halves (x[i], x[HALF + i])."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < HALF)[None, :]
    b = rows // (H * S)
    h = (rows // S) % H
    s = rows % S
    x_row = b * sxb + h * sxh + s * sxs
    o_row = b * sob + h * soh + s * sos
    c_row = b * scb + s * scs
    # where a and b of each pair are: on the interleaved side (x forward, out backward) 2i and 2i + 1
    if INTERLEAVED and not BACKWARD:
        xa, xb = cols * 2, cols * 2 + 1
    else:
        xa, xb = cols, cols + HALF
    if INTERLEAVED and BACKWARD:
        oa, ob = cols * 2, cols * 2 + 1
    else:
        oa, ob = cols, cols + HALF
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + x_row[:, None] + xa[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + xb[None, :], mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_row[:, None] + cols[None, :] * scd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_row[:, None] + cols[None, :] * scd, mask=mask, other=0.0).to(tl.float32)
    if SHARED_TRIG:
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(cos_ptr + c_row[:, None] + (HALF + cols[None, :]) * scd, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + c_row[:, None] + (HALF + cols[None, :]) * scd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # x is the output gradient g
        y1 = _rnd(x1 * c1, dtype) + _rnd(x2 * s2, dtype)
        y2 = _rnd(x2 * c2, dtype) - _rnd(x1 * s1, dtype)
    else:
        y1 = _rnd(x1 * c1, dtype) - _rnd(x2 * s1, dtype)
        y2 = _rnd(x2 * c2, dtype) + _rnd(x1 * s2, dtype)
    # rounded first, so the store's cast is exact (the interpreter's casts truncate)
    tl.store(out_ptr + o_row[:, None] + oa[None, :], _rnd(y1, dtype).to(dtype), mask=mask)
    tl.store(out_ptr + o_row[:, None] + ob[None, :], _rnd(y2, dtype).to(dtype), mask=mask)


def launch_flags(form: str) -> dict:
    """The kernel's constexpr flags of ``form``."""
    if form not in FORMS:
        raise ValueError(f"rope: form must be one of {FORMS}, got {form!r}")
    return dict(SHARED_TRIG=form != "rotate_half", INTERLEAVED=form == "interleaved")


def block_sizes(head_dim: int) -> dict:
    """BLOCK_D (pairs per row, a power of two) and BLOCK_R (rows per program) for ``head_dim``."""
    block_d = next_pow2(head_dim // 2)
    return dict(BLOCK_R=max(1, 2048 // block_d), BLOCK_D=block_d)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
            form: str = "rotate_half") -> torch.Tensor:
    B, H, S, D = x.shape
    out = torch.empty_like(x)
    blocks = block_sizes(D)
    rows = B * H * S
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(triton.cdiv(rows, blocks["BLOCK_R"]),)](
        x, cos, sin, out, rows, H, S, *x.stride()[:3], *out.stride()[:3], cos_b, cos.stride(1), cos.stride(2),
        BACKWARD=backward, HALF=D // 2, **blocks, **launch_flags(form), num_warps=4,
        enable_fp_fusion=False)  # PyTorch rounds each product before the sum: no FMA
    return out


def trig_width(head_dim: int, form: str = "rotate_half") -> int:
    """The last dimension cos/sin have in ``form`` for ``head_dim``."""
    launch_flags(form)
    return head_dim // 2 if form == "half_width" else head_dim


def check_rope_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, form: str = "rotate_half") -> None:
    """ValueError unless x [B, H, S, D] (D even, contiguous) and cos/sin [B or 1, S, W] of x's dtype
    and device (W = D, or D/2 in the ``"half_width"`` form), with equal strides (any: GPT-OSS's rotary
    module in v5 5.17 returns them with S, not W, contiguous)."""
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-1] > MAX_HEAD_DIM or x.stride(-1) != 1:
        raise ValueError(f"rope: x must be [batch, heads, seq, head_dim] with an even, contiguous head_dim <= "
                         f"{MAX_HEAD_DIM}; got shape {tuple(x.shape)}, strides {x.stride()}")
    B, _, S, D = x.shape
    W = trig_width(D, form)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[1:] != (S, W) or t.shape[0] not in (1, B):
            raise ValueError(f"rope: {name} must be [batch or 1, {S}, {W}] ({form} form); got shape "
                             f"{tuple(t.shape)}, strides {t.stride()}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"rope: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if cos.stride() != sin.stride():
        raise ValueError(f"rope: cos and sin strides differ ({cos.stride()} vs {sin.stride()})")


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, form):
        ctx.save_for_backward(cos, sin)
        ctx.form = form
        return _launch(x, cos, sin, backward=False, form=form)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return _launch(grad, cos, sin, backward=True, form=ctx.form), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, form: str = "rotate_half") -> torch.Tensor:
    """x [B, H, S, D], cos/sin [B or 1, S, W] (no gradient) -> x rotated in ``form`` (see the module
    docstring; the default ``x * cos + rotate_half(x) * sin``), laid out as ``torch.empty_like(x)``
    (x's strides where x is a dense view, such as v5's transposed q and k)."""
    check_rope_args(x, cos, sin, form)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos/sin must not require gradients (the kernel returns none for them)")
    return _Rope.apply(x, cos, sin, form)
