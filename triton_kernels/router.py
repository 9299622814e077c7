"""Router: logits [T, E] -> (weights fp32 [T, k], ids int64 [T, k]) in one kernel, with a
backward to the logits (ids are not differentiable).

Modes (``mode=``):
- ``"softmax"`` (Qwen3-MoE, Mixtral): ``p = softmax(logits)``, take the k largest, weights
  ``p[ids]``, optionally renormalised to sum to 1 (``renormalize=True``; Mixtral's
  softmax-over-top-k equals this). Selection is done on the logits, which order exactly like
  the softmax (except where the softmax underflows to equal zeros).
- ``"topk_softmax"`` (GPT-OSS): the k largest logits, weights ``softmax`` over those k.
- ``"sigmoid"`` (DeepSeek-V3): ``s = sigmoid(logits)``; selection on ``s + correction_bias``;
  with ``n_group > 1`` only the ``topk_group`` groups (of E/n_group consecutive experts) whose
  top-2 biased scores sum highest are eligible (the others are masked to -inf; Transformers masks
  them to 0.0, which differs only when eligible biased scores are negative); weights are the
  UNbiased ``s[ids]``, optionally renormalised by ``sum + 1e-20``.
All modes multiply the weights by ``routed_scaling_factor``.

Ties: among equal scores the LOWEST expert index is chosen (likewise for groups). The ids of a
row come out in selection order (descending score). The reference the tests hold this kernel to,
moe_lab's ``moe_lab.stages.router.select_experts``, breaks ties the same way (a stable descending
sort).

NaN and inf order as ``torch.topk`` / ``torch.sort`` order them: -inf < finite < +inf < NaN, all
NaNs equal (-0.0 equals 0.0). A NaN score is therefore chosen first and its weight is NaN, as in
v5: a NaN logit in "topk_softmax" makes the row's k weights NaN; in "sigmoid" the NaN expert's
group ranks first (its top-2 sum is NaN), the expert is chosen, and its weight (all k with
``renormalize``) is NaN. In "softmax" a NaN or +inf logit, or a row of -inf logits, makes every
probability NaN: v5's ``topk`` then ranks k equal (NaN) scores, so here the tie rule picks experts
0..k-1, weights NaN. Comparisons use integer keys (``_order_key``), so the order does not depend
on how a GPU's or the interpreter's ``max`` treats NaN (Triton's ``tl.max`` ignores NaN).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2

MODES = {"softmax": 0, "topk_softmax": 1, "sigmoid": 2}


@triton.jit
def _order_key(x):
    """int32 keys that order float32 ``x`` as torch.sort does: -inf < ... < -0.0 == 0.0 < ... < +inf
    < NaN, every NaN equal (and above +inf). Integer comparisons: no NaN rules of ``tl.max`` apply."""
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -mag, mag)  # sign and magnitude -> two's complement; -0.0 -> 0
    return tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)


@triton.jit
def _pick_max(keys, cand, cols, BLOCK: tl.constexpr):
    """Per row: the lowest index among candidates holding the largest key (``_order_key``); BLOCK
    where a row has no candidate."""
    m = tl.max(tl.where(cand, keys, -0x7FFFFFFF), axis=1)  # below every key (-inf's is -0x7F800000)
    hit = cand & (keys == m[:, None])
    return tl.min(tl.where(hit, cols[None, :], BLOCK), axis=1)


@triton.jit
def _value_at(vals, idx, cols):
    """Per row: ``vals[row, idx[row]]`` (NaN and inf included; 0.0 where idx is out of range)."""
    return tl.sum(tl.where(cols[None, :] == idx[:, None], vals, 0.0), axis=1)


@triton.jit
def _group_mask(choice, cmask, cols, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                GROUP_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_G: tl.constexpr):
    """Eligibility [BLOCK_T, BLOCK_E] of experts under group-limited routing: a group scores the sum
    of its two largest ``choice`` values (as v5's ``topk(2).values.sum()``: NaN if either is NaN,
    inf + -inf = NaN), the TOPK_GROUP best groups are kept (NaN first, ties to the lowest group)."""
    grp = cols // GROUP_SIZE
    gcols = tl.arange(0, BLOCK_G)
    gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
    keys = _order_key(choice)
    for gi in tl.static_range(N_GROUP):
        ing = cmask & (grp == gi)[None, :]
        i1 = _pick_max(keys, ing, cols, BLOCK_E)
        m1 = _value_at(choice, i1, cols)
        if GROUP_SIZE >= 2:
            i2 = _pick_max(keys, ing & (cols[None, :] != i1[:, None]), cols, BLOCK_E)
            m1 += _value_at(choice, i2, cols)
        gscore = tl.where(gcols[None, :] == gi, m1[:, None], gscore)
    gkeys = _order_key(gscore)
    keep = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int1)
    gvalid = (gcols < N_GROUP)[None, :]
    for _ in tl.static_range(TOPK_GROUP):
        g = _pick_max(gkeys, gvalid & (keep == 0), gcols, BLOCK_G)
        keep = keep | (gcols[None, :] == g[:, None])
    elig = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for gi in tl.static_range(N_GROUP):
        kg = tl.max(tl.where(gcols[None, :] == gi, keep.to(tl.int32), 0), axis=1) > 0
        elig = elig | ((grp == gi)[None, :] & kg[:, None])
    return elig


@triton.jit
def _load_logits_tile(logits_ptr, T, E, stride_l, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's tokens [BLOCK_T] (and mask), expert columns [BLOCK_E] (mask [1, BLOCK_E]) and
    their logits in fp32 [BLOCK_T, BLOCK_E], padding columns at -inf (they never win; padding rows
    stay finite)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    cols = tl.arange(0, BLOCK_E)
    cmask = (cols < E)[None, :]
    z = tl.load(logits_ptr + toks.to(tl.int64)[:, None] * stride_l + cols[None, :],
                mask=tmask[:, None] & cmask, other=0.0).to(tl.float32)
    return toks, tmask, cols, cmask, tl.where(cmask, z, float("-inf"))


@triton.jit
def _router_fwd_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, stride_l, scale,
    MODE: tl.constexpr, K: tl.constexpr, RENORM: tl.constexpr, EPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    toks, tmask, cols, cmask, z = _load_logits_tile(logits_ptr, T, E, stride_l, BLOCK_T, BLOCK_E)
    if MODE == 0:
        zmax = tl.max(tl.where(cmask, z, float("-inf")), axis=1)  # (ignores NaN: exp(NaN) makes the sum NaN)
        ez = tl.where(cmask, tl.exp(z - zmax[:, None]), 0.0)
        vals = ez / tl.sum(ez, axis=1)[:, None]
        # select on the logits, which order like the probabilities; where those are all NaN (a NaN or
        # +inf logit, or only -inf ones) v5's topk ranks k equal NaNs: the tie rule takes 0..k-1
        degenerate = tl.max(tl.where(cmask & (vals != vals), 1, 0), axis=1) > 0
        sel = tl.where(degenerate[:, None], 0.0, z)
    elif MODE == 1:
        vals = z
        sel = z
    else:
        vals = tl.sigmoid(z)
        sel = vals
        if HAS_BIAS:
            sel = sel + tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
        if N_GROUP > 1:
            elig = _group_mask(sel, cmask, cols, N_GROUP, TOPK_GROUP, GROUP_SIZE, BLOCK_T, BLOCK_E, BLOCK_G)
            sel = tl.where(elig, sel, float("-inf"))

    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    v = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    keys = _order_key(sel)
    for j in tl.static_range(K):
        idx = _pick_max(keys, cmask & (taken == 0), cols, BLOCK_E)  # K <= E: always a candidate
        hot = cols[None, :] == idx[:, None]
        taken = taken | hot
        vj = tl.sum(tl.where(hot, vals, 0.0), axis=1)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        v = tl.where(kcols[None, :] == j, vj[:, None], v)
    kmask = (kcols < K)[None, :]
    if MODE == 1:
        vmax = tl.max(tl.where(kmask, v, float("-inf")), axis=1)
        ev = tl.where(kmask, tl.exp(v - vmax[:, None]), 0.0)
        v = ev / tl.sum(ev, axis=1)[:, None]
    elif RENORM:
        v = v / (tl.sum(tl.where(kmask, v, 0.0), axis=1)[:, None] + EPS)
    out = toks.to(tl.int64)[:, None] * K + kcols[None, :]
    omask = tmask[:, None] & kmask
    tl.store(w_ptr + out, v * scale, mask=omask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=omask)


@triton.jit
def _router_bwd_kernel(
    logits_ptr, ids_ptr, dw_ptr, dl_ptr, T, E, stride_l, stride_dl, scale,
    MODE: tl.constexpr, K: tl.constexpr, RENORM: tl.constexpr, EPS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    toks, tmask, cols, cmask, z = _load_logits_tile(logits_ptr, T, E, stride_l, BLOCK_T, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    kmask = (kcols < K)[None, :]
    out = toks.to(tl.int64)[:, None] * K + kcols[None, :]
    ids = tl.load(ids_ptr + out, mask=tmask[:, None] & kmask, other=-1).to(tl.int32)
    g = tl.load(dw_ptr + out, mask=tmask[:, None] & kmask, other=0.0).to(tl.float32) * scale
    if MODE == 0:
        zmax = tl.max(tl.where(cmask, z, float("-inf")), axis=1)
        ez = tl.where(cmask, tl.exp(z - zmax[:, None]), 0.0)
        vals = ez / tl.sum(ez, axis=1)[:, None]
    elif MODE == 1:
        vals = z
    else:
        vals = tl.sigmoid(z)
    # values at the chosen ids, [BLOCK_T, BLOCK_K]
    v = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(K):
        idj = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        vj = tl.sum(tl.where(cols[None, :] == idj[:, None], vals, 0.0), axis=1)
        v = tl.where(kcols[None, :] == j, vj[:, None], v)
    if MODE == 1:
        vmax = tl.max(tl.where(kmask, v, float("-inf")), axis=1)
        ev = tl.where(kmask, tl.exp(v - vmax[:, None]), 0.0)
        q = ev / tl.sum(ev, axis=1)[:, None]
        dsel = q * (g - tl.sum(g * q, axis=1)[:, None])  # softmax backward over the k logits
    elif RENORM:
        zs = tl.sum(tl.where(kmask, v, 0.0), axis=1)[:, None] + EPS
        zs = tl.where(zs == 0.0, 1.0, zs)  # only padding rows (past T) have zs == 0
        q = v / zs
        dsel = (g - tl.sum(g * q, axis=1)[:, None]) / zs
    else:
        dsel = g
    # scatter the per-choice gradient onto the expert columns
    dv = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(K):
        idj = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        dj = tl.sum(tl.where(kcols[None, :] == j, dsel, 0.0), axis=1)
        dv = tl.where(cols[None, :] == idj[:, None], dj[:, None], dv)
    if MODE == 0:
        dz = vals * (dv - tl.sum(vals * dv, axis=1)[:, None])
    elif MODE == 1:
        dz = dv
    else:
        dz = dv * (1.0 - vals) * vals  # torch's sigmoid backward: grad * (1 - y) * y
    tl.store(dl_ptr + toks.to(tl.int64)[:, None] * stride_dl + cols[None, :],
             dz.to(dl_ptr.dtype.element_ty), mask=tmask[:, None] & cmask)


def _blocks(E: int):
    be = next_pow2(max(E, 2))
    if interpreting():
        return 64, be, 4
    return max(1, 2048 // be), be, 4


class Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, k, mode_id, renorm, eps, n_group, topk_group, scale):
        T, E = logits.shape
        w = torch.empty((T, k), dtype=torch.float32, device=logits.device)
        ids = torch.empty((T, k), dtype=torch.int64, device=logits.device)
        if T:
            logits_c = logits if logits.stride(1) == 1 else logits.contiguous()
            bt, be, nw = _blocks(E)
            _router_fwd_kernel[(triton.cdiv(T, bt),)](
                logits_c, bias if bias is not None else logits_c, w, ids, T, E, logits_c.stride(0), float(scale),
                MODE=mode_id, K=k, RENORM=renorm, EPS=eps, HAS_BIAS=bias is not None,
                N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_SIZE=E // n_group,
                BLOCK_T=bt, BLOCK_E=be, BLOCK_K=next_pow2(k), BLOCK_G=next_pow2(max(n_group, 2)),
                num_warps=nw)
        ctx.mark_non_differentiable(ids)
        ctx.save_for_backward(logits, ids)
        ctx.cfg = (k, mode_id, renorm, eps, scale)
        return w, ids

    @staticmethod
    def backward(ctx, dw, _dids):
        logits, ids = ctx.saved_tensors
        k, mode_id, renorm, eps, scale = ctx.cfg
        T, E = logits.shape
        dl = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
        if T:
            logits_c = logits if logits.stride(1) == 1 else logits.contiguous()
            dw = dw.contiguous()
            bt, be, nw = _blocks(E)
            _router_bwd_kernel[(triton.cdiv(T, bt),)](
                logits_c, ids, dw, dl, T, E, logits_c.stride(0), dl.stride(0), float(scale),
                MODE=mode_id, K=k, RENORM=renorm, EPS=eps,
                BLOCK_T=bt, BLOCK_E=be, BLOCK_K=next_pow2(k), num_warps=nw)
        return dl, None, None, None, None, None, None, None, None


def route(
    logits: torch.Tensor,
    top_k: int,
    mode: str = "softmax",
    renormalize: bool = False,
    correction_bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
):
    """Route tokens to experts.

    Args:
        logits: [T, E] router logits (any float dtype; computed in fp32).
        top_k: k, 1 <= k <= E.
        mode: "softmax" | "topk_softmax" | "sigmoid" (see the module docstring).
        renormalize: make the k weights sum to 1 ("softmax": sum; "sigmoid": sum + 1e-20).
        correction_bias: [E] added to the sigmoid scores for selection only ("sigmoid").
        n_group, topk_group: group-limited choice ("sigmoid"); E % n_group == 0.
        routed_scaling_factor: multiplies the weights.
    Returns:
        weights fp32 [T, k] (differentiable w.r.t. logits), ids int64 [T, k] in selection order.
    """
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    if mode not in MODES:
        raise ValueError(f"route: unknown mode {mode!r}; choose from {sorted(MODES)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"route: top_k={top_k} must be in [1, E={E}]")
    if mode != "sigmoid" and (correction_bias is not None or n_group != 1):
        raise ValueError("route: correction_bias / n_group apply to mode='sigmoid' only")
    if mode == "sigmoid":
        if n_group < 1 or E % n_group:
            raise ValueError(f"route: E={E} experts do not split into n_group={n_group} groups")
        if n_group == 1:
            topk_group = 1
        elif not (1 <= topk_group <= n_group and topk_group * (E // n_group) >= top_k):
            raise ValueError(f"route: topk_group={topk_group} of n_group={n_group} groups "
                             f"({E // n_group} experts each) cannot hold top_k={top_k}")
        if correction_bias is not None and correction_bias.shape != (E,):
            raise ValueError(f"route: correction_bias must be [E={E}], got {tuple(correction_bias.shape)}")
    else:
        n_group, topk_group = 1, 1
    bias = correction_bias.detach().contiguous() if correction_bias is not None else None
    renorm = bool(renormalize) and mode != "topk_softmax"
    eps = 1e-20 if mode == "sigmoid" else 0.0
    return Route.apply(logits, bias, int(top_k), MODES[mode], renorm, eps, int(n_group), int(topk_group),
                       float(routed_scaling_factor))
