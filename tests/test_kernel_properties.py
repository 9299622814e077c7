"""Property tests of every Triton kernel against its plain-PyTorch reference (triton_kernels.reference;
the router's is moe_lab.stages.router.select_experts), forward and gradients, on random shapes AND
non-finite or huge inputs: NaN, +-inf, +-1e30 (whose products overflow float32) and 6e4 sprinkled
over inputs and upstream gradients.

The contract (issue 18): NaN and inf propagate exactly as in v5. Every output and gradient holds NaN,
+inf and -inf in exactly the elements where the reference holds them, ids are the reference's (ties
and NaN ordered as torch.topk orders them, ties to the lowest expert), and the finite elements agree
within a tolerance scaled by the magnitude of what was summed into them. Kernel outputs are
allocated NaN-filled ("poisoned"), so an element a kernel forgets to write fails too.

Random cases every run within a small budget per test (hypothesis_profiles.py: ``ci``; the ``gpu``
profile runs >= 1000 per test on a device). The last test holds a whole MoE block of each family
and backend to v5 itself with NaN and inf router logits.
"""
from __future__ import annotations

import contextlib
import copy
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
from hypothesis import example, given, strategies as st  # noqa: E402
from hypothesis_profiles import examples  # noqa: E402

from moe_lab.stages.router import RoutingSpec, select_experts  # noqa: E402
import triton_kernels as tk  # noqa: E402
from triton_kernels import reference as ref  # noqa: E402
from triton_kernels._common import interpreting  # noqa: E402
from triton_kernels.adamw import adamw_step_  # noqa: E402
from triton_kernels.cross_entropy import logsumexp_and_target, softmax_grad_  # noqa: E402
from triton_kernels.rmsnorm import rms_norm  # noqa: E402
from triton_kernels.rope import rope  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
# the interpreter's numpy warns of every overflow and NaN these tests make on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
INF, NAN = float("inf"), float("nan")

# what a case may sprinkle over a tensor; "row" kinds fill a whole row (a token's logits all -inf, ...)
SPECIAL = {"nan": NAN, "inf": INF, "-inf": -INF, "huge": 1e30, "-huge": -1e30, "big": 6e4,
           "row:-inf": -INF, "row:nan": NAN, "row:huge": 1e30}
specials = st.lists(st.sampled_from(sorted(SPECIAL)), max_size=3)  # [] is the plain, finite case
few_specials = st.lists(st.sampled_from(["nan", "inf", "-inf", "huge", "-huge"]), max_size=2)
# A product that overflows inside a sum (1e30 * 1e30 + ...) is implementation-defined: with a fused
# multiply-add the exact product joins the sum (inf + -1e60 = inf), without it the product is inf
# first (inf - inf = NaN); BLAS libraries, cuBLAS and Triton's dot differ there, and so do torch's CPU
# and GPU. Where products are summed (GEMMs, combine, dot products), 1e30 goes into one operand only.
no_huge = st.lists(st.sampled_from(sorted(k for k in SPECIAL if "huge" not in k)), max_size=3)
few_no_huge = st.lists(st.sampled_from(["nan", "inf", "-inf"]), max_size=2)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like return NaN-filled (float) or -12345-filled (int) tensors."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(NAN)
        elif t.dtype != torch.bool:
            t.fill_(-12345)
        return t

    with mock.patch.object(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k))):
        yield


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def sprinkle(t, kinds, seed, frac=0.08):
    """A copy of ``t`` (CPU, float) with each value of ``kinds`` (keys of SPECIAL) at a few random
    elements, or filling a random row for the "row:" kinds."""
    out = t.detach().clone()
    if out.numel() == 0:
        return out
    g = torch.Generator().manual_seed(seed)
    for kind in kinds:
        if kind.startswith("row:"):
            rows = out.reshape(-1, out.shape[-1])
            rows[int(torch.randint(0, rows.shape[0], (1,), generator=g))] = SPECIAL[kind]
        else:
            flat = out.view(-1)
            count = 1 + int(torch.randint(0, max(1, int(flat.numel() * frac)), (1,), generator=g))
            flat[torch.randint(0, flat.numel(), (count,), generator=g)] = SPECIAL[kind]
    return out


def dev(t, dtype=None):
    """``t`` on the kernels' device (in ``dtype``), as a fresh leaf that requires grad."""
    t = t.to(DEVICE) if dtype is None else t.to(dtype).to(DEVICE)
    return t.detach().clone().requires_grad_(True)


def _where(mask, a, b, limit=4):
    idx = mask.nonzero()[:limit].tolist()
    return ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.4g} vs {b[tuple(i)].item():.4g}" for i in idx)


def assert_matches(actual, expected, what, rtol=1e-5, atol=1e-6, scale=None):
    """NaN, +inf and -inf in exactly the same elements; each finite element within
    ``rtol * scale + atol`` (``scale``: |expected| by default, or a bound on the magnitudes summed
    into each element, broadcast to its shape)."""
    a, b = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    kinds = (("NaN", a.isnan(), b.isnan()), ("+inf", a == INF, b == INF), ("-inf", a == -INF, b == -INF))
    for name, in_a, in_b in kinds:
        differ = in_a != in_b
        if differ.any():
            raise AssertionError(f"{what}: {name} in {int(differ.sum())} element(s) where the reference differs "
                                 f"(kernel vs reference at {_where(differ, a, b)})")
    finite = torch.isfinite(b)
    s = b.abs() if scale is None else scale.detach().float().cpu().expand_as(b)
    tolerance = torch.nan_to_num(rtol * s + atol, nan=INF)
    off = finite & ~((a - b).abs() <= tolerance)
    if off.any():
        raise AssertionError(f"{what}: {int(off.sum())} finite element(s) off "
                             f"(kernel vs reference at {_where(off, a, b)})")


def select_experts_ref(logits, top_k, mode="softmax", renormalize=False, correction_bias=None, n_group=1,
                       topk_group=1, routed_scaling_factor=1.0):
    """The router's reference, moe_lab's ``select_experts``, called with ``tk.route``'s arguments:
    logits [T, E] -> (weights fp32 [T, k], ids int64 [T, k]) computed from the float32 logits."""
    score = {"softmax": "softmax", "topk_softmax": "softmax", "sigmoid": "sigmoid"}[mode]
    spec = RoutingSpec(logits.shape[-1], top_k, score=score, topk_before_softmax=mode == "topk_softmax",
                       renormalize=renormalize, n_group=n_group, topk_group=topk_group,
                       has_correction_bias=correction_bias is not None, scaling=routed_scaling_factor,
                       weights_in_logits_dtype=False, renormalize_eps=1e-20 if score == "sigmoid" else 0.0)
    return select_experts(logits.float(), spec, correction_bias)


def row_scale(t):
    """Per row of ``t`` [..., n], the largest finite magnitude (1 at least), broadcastable to ``t``."""
    f = t.detach().float().cpu()
    return torch.where(torch.isfinite(f), f.abs(), 0.0).amax(dim=-1, keepdim=True).clamp(min=1.0)


def tensor_scale(t):
    f = t.detach().float().cpu()
    return torch.where(torch.isfinite(f), f.abs(), 0.0).max().clamp(min=1.0) if f.numel() else torch.tensor(1.0)


def bounds(fn, inputs, upstream):
    """(|fn|(|inputs|), gradients of <|upstream|, that>): for a function bilinear in its inputs, a
    bound on the magnitudes summed into each output and each gradient element."""
    leaves = [t.detach().abs().cpu().float().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream.detach().abs().cpu().float(), allow_unused=True)
    return out.detach(), grads


def distinct_ids(T, k, E, seed):
    """ids [T, k]: k distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]


def counts_of(E, S, seed):
    g = torch.Generator().manual_seed(seed)
    active = torch.nonzero(torch.rand(E, generator=g) < 0.7).flatten()
    if active.numel() == 0:
        active = torch.tensor([E - 1])
    return torch.bincount(active[torch.randint(0, active.numel(), (S,), generator=g)], minlength=E)


# ---------------------------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------------------------
@st.composite
def router_cases(draw):
    mode = draw(st.sampled_from(["softmax", "topk_softmax", "sigmoid"]))
    E = draw(st.integers(1, 16))
    k = draw(st.integers(1, min(6, E)))
    kw = dict(mode=mode, top_k=k, renormalize=draw(st.booleans()),
              routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
    if mode == "sigmoid":
        n_group = draw(st.sampled_from([d for d in range(1, min(E, 8) + 1) if E % d == 0]))
        min_groups = -(-k // (E // n_group))
        kw.update(n_group=n_group, topk_group=draw(st.integers(min_groups, n_group)),
                  bias=draw(st.sampled_from(["none", "finite", "special"])))
    return E, kw


@examples(ci=30)
@given(case=router_cases(), T=st.integers(1, 40), kinds=specials, grad_kinds=few_specials,
       seed=st.integers(0, 2**16))
@example(case=(8, dict(mode="sigmoid", top_k=2, renormalize=True, routed_scaling_factor=2.5, n_group=4,
                       topk_group=2, bias="finite")), T=3, kinds=["nan"], grad_kinds=[], seed=0)
@example(case=(8, dict(mode="topk_softmax", top_k=2, renormalize=False, routed_scaling_factor=1.0)), T=3,
         kinds=["nan", "inf"], grad_kinds=[], seed=1)
@example(case=(6, dict(mode="softmax", top_k=3, renormalize=True, routed_scaling_factor=1.0)), T=4,
         kinds=["row:-inf", "inf", "nan"], grad_kinds=[], seed=2)
def test_route_nonfinite(case, T, kinds, grad_kinds, seed):
    """ids equal select_experts' (NaN ranks first, as in torch.topk; softmax rows whose probabilities
    are all NaN take experts 0..k-1), weights and dlogits hold NaN / inf where the reference does."""
    E, kw = case
    kw = dict(kw)
    bias = kw.pop("bias", "none")
    if bias != "none":
        b = randn(E, seed=seed + 1, scale=0.5)
        if bias == "special":
            b = sprinkle(b, [["nan", "inf", "-inf"][seed % 3]], seed)
        kw["correction_bias"] = b.to(DEVICE)
    z = dev(sprinkle(randn(T, E, seed=seed, scale=2.0), kinds, seed))
    with poisoned():
        w, ids = tk.route(z, **kw)
    w_ref, ids_ref = select_experts_ref(z, **kw)
    assert torch.equal(ids.cpu(), ids_ref.cpu()), f"ids {ids.tolist()} vs reference {ids_ref.tolist()}"
    assert_matches(w, w_ref, "weights")
    dw = sprinkle(randn(T, kw["top_k"], seed=seed + 2), grad_kinds, seed + 3).to(DEVICE)
    with poisoned():
        (gz,) = torch.autograd.grad(w, z, dw)
    (gz_ref,) = torch.autograd.grad(w_ref, z, dw)
    # a bound on the terms of each row's gradient: 4 max|dw| * scaling / (the sum that renormalises)
    norm = torch.ones(T, 1)
    if kw["renormalize"] and kw["mode"] != "topk_softmax":
        raw, _ = select_experts_ref(z.detach(), **{**kw, "renormalize": False, "routed_scaling_factor": 1.0})
        norm = raw.sum(-1, keepdim=True).abs().clamp(max=1.0).cpu()
    bound = 4 * dw.abs().amax(-1, keepdim=True).cpu() * kw["routed_scaling_factor"] / norm
    assert_matches(gz, gz_ref, "dlogits", rtol=1e-5, atol=1e-6, scale=torch.maximum(bound, row_scale(gz_ref)))


# ---------------------------------------------------------------------------------------------
# sort, permute, combine
# ---------------------------------------------------------------------------------------------
@examples(ci=15)
@given(T=st.integers(0, 30), E=st.integers(1, 9), k=st.integers(1, 4), H=st.integers(1, 40),
       kinds=specials, w_kinds=no_huge, grad_kinds=few_no_huge, seed=st.integers(0, 2**16))
@example(T=5, E=3, k=2, H=4, kinds=["nan", "inf", "huge"], w_kinds=["-inf"], grad_kinds=["inf"], seed=0)
def test_permute_and_combine_nonfinite(T, E, k, H, kinds, w_kinds, grad_kinds, seed):
    k = min(k, E)
    ids = distinct_ids(T, k, E, seed).to(DEVICE)
    with poisoned():
        slots, counts, offsets, inv = tk.sort_by_expert(ids, E, return_inverse=True)
    r_slots, r_counts, r_offsets = ref.sort_by_expert_ref(ids, E)
    assert torch.equal(slots, r_slots) and torch.equal(counts, r_counts) and torch.equal(offsets, r_offsets)

    x = dev(sprinkle(randn(T, H, seed=seed), kinds, seed))
    with poisoned():
        xs = tk.permute(x, slots, k, inv)
    xs_ref = ref.permute_ref(x, slots, k)
    assert_matches(xs, xs_ref, "permute", rtol=0, atol=0)
    dxs = sprinkle(randn(T * k, H, seed=seed + 1), grad_kinds, seed + 1).to(DEVICE)
    with poisoned():
        (gx,) = torch.autograd.grad(xs, x, dxs)
    (gx_ref,) = torch.autograd.grad(xs_ref, x, dxs)
    assert_matches(gx, gx_ref, "permute dx", scale=bounds(lambda a: ref.permute_ref(a, slots.cpu(), k), [x], dxs)[1][0])

    y = dev(sprinkle(randn(T * k, H, seed=seed + 2), kinds, seed + 2))
    w = dev(sprinkle(torch.rand(T, k, generator=torch.Generator().manual_seed(seed)), w_kinds, seed + 3))
    with poisoned():
        out = tk.combine(y, w, slots, inv)
    out_ref = ref.combine_ref(y, w, slots)
    dout = sprinkle(randn(T, H, seed=seed + 4), grad_kinds, seed + 4).to(DEVICE)
    out_bound, (dy_bound, dw_bound) = bounds(lambda a, b: ref.combine_ref(a, b, slots.cpu()), [y, w], dout)
    assert_matches(out, out_ref, "combine", scale=out_bound)
    with poisoned():
        gy, gw = torch.autograd.grad(out, (y, w), dout)
    gy_ref, gw_ref = torch.autograd.grad(out_ref, (y, w), dout)
    assert_matches(gy, gy_ref, "combine dy", scale=dy_bound)
    assert_matches(gw, gw_ref, "combine dweights", rtol=1e-5, scale=dw_bound)


# ---------------------------------------------------------------------------------------------
# grouped GEMM and the fused expert MLP
# ---------------------------------------------------------------------------------------------
@examples(ci=12)
@given(E=st.integers(1, 5), S=st.integers(0, 40), K=st.integers(1, 40), N=st.integers(1, 40),
       transposed_w=st.booleans(), bias=st.booleans(), bf16=st.booleans(), kinds=no_huge,
       huge_in=st.sampled_from(["x", "w", "dy"]), grad_kinds=few_no_huge, seed=st.integers(0, 2**16))
@example(E=3, S=20, K=8, N=6, transposed_w=False, bias=True, bf16=False, kinds=["inf", "-inf", "nan"], huge_in="x",
         grad_kinds=["inf"], seed=0)
def test_grouped_mm_nonfinite(E, S, K, N, transposed_w, bias, bf16, kinds, huge_in, grad_kinds, seed):
    """y = x @ w[e] (+ bias), dx, dw, dbias: NaN / inf from the inputs reach the elements they reach
    in torch's matmuls (1e30 in one of x, w, dy: see no_huge); bf16 against float32 on the same values."""
    huge = ["huge", "-huge"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    offsets = counts_of(E, S, seed).cumsum(0).to(torch.int32).to(DEVICE)
    values = [sprinkle(randn(S, K, seed=seed), kinds + huge * (huge_in == "x"), seed).to(dtype),
              sprinkle(randn(*((E, N, K) if transposed_w else (E, K, N)), seed=seed + 1),
                       kinds[::-1] + huge * (huge_in == "w"), seed + 1).to(dtype)]
    if bias:
        values.append(sprinkle(randn(E, N, seed=seed + 2), kinds + huge[:1], seed + 2).to(dtype))
    inputs = [dev(t) for t in values]
    inputs_ref = [dev(t.float()) for t in values]

    def fn(x, base, *b, impl):
        w = base.transpose(1, 2) if transposed_w else base
        return impl(x, w, offsets if impl is tk.grouped_mm else offsets.cpu(), *b)

    with poisoned():
        y = fn(*inputs, impl=tk.grouped_mm)
    y_ref = fn(*inputs_ref, impl=ref.grouped_mm_ref)
    dy = sprinkle(randn(S, N, seed=seed + 3), grad_kinds + huge * (huge_in == "dy"), seed + 3).to(dtype).to(DEVICE)
    y_bound, grad_bounds = bounds(lambda *t: fn(*t, impl=ref.grouped_mm_ref), inputs_ref, dy)
    tol = dict(rtol=2e-2, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    assert y.dtype == dtype
    assert_matches(y, y_ref, "y", scale=y_bound, **tol)
    with poisoned():
        grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, dy.float())
    for name, g, gr, bound in zip(("dx", "dw", "dbias"), grads, grads_ref, grad_bounds):
        assert_matches(g, gr, name, scale=bound, **tol)


def _mlp_tensors(E, S, H, I, act, transposed, bias, kinds, seed):
    """x, gate_up, down, gate_up_bias, down_bias with ``kinds`` (no 1e30) sprinkled over the first
    three and the bias, and 1e30 in down_proj only (without 6e4 elsewhere): the one operand whose
    huge values never meet another large value in a GEMM, forward or backward (see no_huge). A
    non-gated act (relu2) gets the up projection (I columns, not 2I) in gate_up's place."""
    wscale = 1.0 if act == "gpt_oss" else H ** -0.5
    width = I if act in ref.NON_GATED else 2 * I
    gate_up = randn(*((E, H, width) if transposed else (E, width, H)), seed=seed + 1, scale=wscale)
    down = randn(*((E, I, H) if transposed else (E, H, I)), seed=seed + 2, scale=I ** -0.5)
    x = randn(S, H, seed=seed)
    huge = ["huge", "-huge"][: seed % 3] if "big" not in kinds else []  # act from 6e4 inputs is ~1e10
    tensors = [sprinkle(x, kinds, seed), sprinkle(gate_up, kinds[1:], seed + 1),
               sprinkle(down, kinds[2:] + huge, seed + 2)]
    if bias:
        tensors += [sprinkle(randn(E, width, seed=seed + 3), kinds[:1], seed + 3), randn(E, H, seed=seed + 4)]
    else:
        tensors += [None, None]
    return [dev(t) if t is not None else None for t in tensors]


@examples(ci=10)
@given(E=st.integers(1, 4), T=st.integers(1, 16), k=st.integers(1, 3), H=st.integers(1, 24), I=st.integers(1, 12),
       act=st.sampled_from(["swiglu", "gpt_oss"]), gathered=st.booleans(), bias=st.booleans(),
       kinds=no_huge, grad_kinds=few_no_huge, seed=st.integers(0, 2**16))
@example(E=3, T=8, k=2, H=8, I=4, act="gpt_oss", gathered=False, bias=True, kinds=["nan", "big", "-inf"],
         grad_kinds=[], seed=1)
@example(E=2, T=6, k=1, H=5, I=3, act="swiglu", gathered=True, bias=False, kinds=["big", "inf"],
         grad_kinds=["nan"], seed=2)
@example(E=1, T=8, k=3, H=6, I=4, act="swiglu", gathered=False, bias=True, kinds=[], grad_kinds=["inf", "-inf"],
         seed=65536)  # a small activation (cancellation in gate_up) times a 1e30 down weight
def test_expert_mlp_nonfinite(E, T, k, H, I, act, gathered, bias, kinds, grad_kinds, seed):
    """The fused MLP (and its gathered form) vs permute + the per-expert loop: NaN from a clamp's
    input stays NaN (gpt_oss), inf * 0 and inf - inf land where v5's do, forward and every gradient."""
    _check_expert_mlp_nonfinite(E, T, k, H, I, act, act == "gpt_oss", gathered, bias, kinds, grad_kinds, seed)


@examples(ci=6)
@given(E=st.integers(1, 4), T=st.integers(1, 16), k=st.integers(1, 3), H=st.integers(1, 24), I=st.integers(1, 12),
       transposed=st.booleans(), gathered=st.booleans(), bias=st.booleans(),
       kinds=no_huge, grad_kinds=few_no_huge, seed=st.integers(0, 2**16))
@example(E=3, T=8, k=2, H=8, I=4, transposed=False, gathered=False, bias=False, kinds=["nan", "big", "-inf"],
         grad_kinds=["inf"], seed=1)
@example(E=4, T=3, k=1, H=5, I=3, transposed=True, gathered=True, bias=True, kinds=["inf", "-inf"],
         grad_kinds=["-inf", "nan"], seed=2)  # a zero-row expert among them
@example(E=1, T=8, k=3, H=6, I=4, transposed=False, gathered=True, bias=True, kinds=[], grad_kinds=["inf"],
         seed=65536)  # 1e30 down weights
def test_expert_mlp_relu2_nonfinite(E, T, k, H, I, transposed, gathered, bias, kinds, grad_kinds, seed):
    """Non-gated relu2 experts (Nemotron-H), both layouts, as the gated test: relu keeps NaN, -inf
    becomes 0, and relu's backward passes nothing (not inf * 0) where h <= 0."""
    _check_expert_mlp_nonfinite(E, T, k, H, I, "relu2", transposed, gathered, bias, kinds, grad_kinds, seed)


def _check_expert_mlp_nonfinite(E, T, k, H, I, act, transposed, gathered, bias, kinds, grad_kinds, seed):
    k = min(k, E)
    ids = distinct_ids(T, k, E, seed).to(DEVICE)
    slots, _, offsets, inv = tk.sort_by_expert(ids, E, return_inverse=True)
    S = T * k
    x, gate_up, down, bgu, bd = _mlp_tensors(E, T if gathered else S, H, I, act, transposed, bias, kinds, seed)
    kw = dict(activation=act, gate_up_bias=bgu, down_bias=bd, transposed=transposed)
    with poisoned():
        if gathered:
            y = tk.expert_mlp_gathered(x, slots, inv, k, gate_up, down, offsets, **kw)
        else:
            y = tk.expert_mlp(x, gate_up, down, offsets, **kw)
    rows = ref.permute_ref(x, slots, k) if gathered else x
    y_ref = ref.expert_mlp_ref(rows, gate_up, down, offsets.cpu(), **kw)
    # the error of an output sums the rounding of everything summed into it, cancellation included:
    # bounded by the same MLP on magnitudes (|silu(g)| <= silu(|g|), relu(h)^2 <= relu(|h|)^2)
    with torch.no_grad():
        mags = {n: (t.abs() if t is not None else None) for n, t in dict(gate_up_bias=bgu, down_bias=bd).items()}
        bound = ref.expert_mlp_ref(rows.abs(), gate_up.abs(), down.abs(), offsets.cpu(), **{**kw, **mags})
    assert_matches(y, y_ref, "y", rtol=1e-4, scale=torch.maximum(row_scale(y_ref), bound.float().cpu()))
    inputs = [t for t in (x, gate_up, down, bgu, bd) if t is not None]
    dy = sprinkle(randn(S, H, seed=seed + 5), grad_kinds, seed + 5).to(DEVICE)
    with poisoned():
        grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, g, gr in zip(("dx", "dgate_up", "ddown", "dbias_gu", "dbias_down"), grads, grads_ref):
        assert_matches(g, gr, name, rtol=1e-4, scale=tensor_scale(gr))


def _layer(x, logits, gate_up, down, E, k, mode, impl):
    kw = {}
    if mode == "softmax":
        kw = dict(renormalize=True)
    elif mode == "sigmoid":  # DeepSeek-V3: two groups where E is even, the fewest kept groups that hold k
        n_group = 2 if E % 2 == 0 else 1
        kw = dict(renormalize=True, n_group=n_group, topk_group=-(-k // (E // n_group)), routed_scaling_factor=2.5)
    if impl == "triton":
        w, ids = tk.route(logits, k, mode, **kw)
        slots, _, offsets, inv = tk.sort_by_expert(ids, E, return_inverse=True)
        ys = tk.expert_mlp(tk.permute(x, slots, k, inv), gate_up, down, offsets, "swiglu")
        return tk.combine(ys, w, slots, inv)
    w, ids = select_experts_ref(logits, k, mode, **kw)
    slots, _, offsets = ref.sort_by_expert_ref(ids, E)
    ys = ref.expert_mlp_ref(ref.permute_ref(x, slots, k), gate_up, down, offsets.cpu(), "swiglu")
    return ref.combine_ref(ys, w, slots)


@examples(ci=8)
@given(T=st.integers(1, 12), E=st.sampled_from([3, 4, 6]), k=st.integers(1, 3), H=st.integers(2, 16),
       mode=st.sampled_from(["softmax", "topk_softmax", "sigmoid"]), logit_kinds=specials, x_kinds=few_no_huge,
       seed=st.integers(0, 2**16))
@example(T=6, E=4, k=2, H=8, mode="sigmoid", logit_kinds=["nan"], x_kinds=[], seed=0)
@example(T=6, E=4, k=2, H=8, mode="topk_softmax", logit_kinds=["nan", "inf"], x_kinds=["-inf"], seed=1)
def test_moe_layer_nonfinite(T, E, k, H, mode, logit_kinds, x_kinds, seed):
    """route -> sort -> permute -> expert MLP -> combine, all Triton, against the reference chain:
    a NaN logit reaches the output and every gradient where it does in the reference."""
    k = min(k, E)
    I = 6
    x = dev(sprinkle(randn(T, H, seed=seed), x_kinds, seed))
    logits = dev(sprinkle(randn(T, E, seed=seed + 1, scale=2.0), logit_kinds, seed + 1))
    gate_up, down = dev(randn(E, 2 * I, H, seed=seed + 2, scale=0.3)), dev(randn(E, H, I, seed=seed + 3, scale=0.3))
    with poisoned():
        out = _layer(x, logits, gate_up, down, E, k, mode, "triton")
    out_ref = _layer(x, logits, gate_up, down, E, k, mode, "ref")
    assert_matches(out, out_ref, "out", rtol=1e-4, scale=row_scale(out_ref))
    dout = randn(T, H, seed=seed + 4).to(DEVICE)
    with poisoned():
        grads = torch.autograd.grad(out, (x, logits, gate_up, down), dout)
    grads_ref = torch.autograd.grad(out_ref, (x, logits, gate_up, down), dout)
    for name, g, gr in zip(("dx", "dlogits", "dgate_up", "ddown"), grads, grads_ref):
        assert_matches(g, gr, name, rtol=1e-4, scale=tensor_scale(gr))


# ---------------------------------------------------------------------------------------------
# RMSNorm, RoPE
# ---------------------------------------------------------------------------------------------
@examples(ci=40)
@given(shape=st.sampled_from([(0, 8), (1, 1), (5, 33), (2, 3, 16), (9, 70)]), bf16=st.booleans(),
       weight_last=st.booleans(), kinds=specials, grad_kinds=few_specials, seed=st.integers(0, 2**16))
@example(shape=(4, 8), bf16=False, weight_last=False, kinds=["inf", "huge", "nan"], grad_kinds=[], seed=0)
@example(shape=(1, 1), bf16=False, weight_last=False, kinds=["-huge"], grad_kinds=[], seed=1)  # x, w = -1e30
def test_rms_norm_nonfinite(shape, bf16, weight_last, kinds, grad_kinds, seed):
    """Both formulas, forward and gradients; dx follows autograd's order, so a sum that overflows
    (sum(dy * w * x) with x = w = -1e30) gives NaN where v5's does."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = dev(sprinkle(randn(*shape, seed=seed, scale=2.0), kinds, seed), dtype)
    w = dev(sprinkle(randn(shape[-1], seed=seed + 1) * 0.5 + 1, kinds[:1] if seed % 2 else [], seed + 1), dtype)
    with poisoned():
        y = rms_norm(x, w, 1e-6, weight_last=weight_last)
    y_ref = ref.rms_norm_ref(x, w, 1e-6, weight_last)
    tol = 3e-2 if bf16 else 1e-5
    assert y.dtype == dtype
    assert_matches(y, y_ref, "y", rtol=tol, atol=tol)
    dy = sprinkle(randn(*shape, seed=seed + 2), grad_kinds, seed + 2).to(dtype).to(DEVICE)
    with poisoned():
        gx, gw = torch.autograd.grad(y, (x, w), dy)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    # magnitudes summed into dx = dn * r + (-0.5 * sum(dn * x)) * r^3 / H * 2x (dn = dy * w) and dw = sum(dy * n)
    h, dn = x.detach().float().cpu(), (dy.float() * w.detach().float()).cpu()
    r = torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
    dx_bound = dn.abs() * r + (dn * h).abs().sum(-1, keepdim=True) * r ** 3 / h.shape[-1] * h.abs()
    dw_bound = (dy.float().cpu() * h * r).abs().reshape(-1, h.shape[-1]).sum(0)
    assert_matches(gx, gx_ref, "dx", rtol=tol * 10, atol=1e-5, scale=dx_bound)
    assert_matches(gw, gw_ref, "dweight", rtol=tol * 10, atol=1e-5, scale=dw_bound)


@examples(ci=40)
@given(B=st.integers(1, 2), heads=st.integers(1, 3), S=st.integers(1, 6), half=st.integers(1, 12),
       cos_batch=st.booleans(), transposed=st.booleans(), bf16=st.booleans(), kinds=specials,
       grad_kinds=few_specials, seed=st.integers(0, 2**16))
@example(B=1, heads=2, S=3, half=4, cos_batch=False, transposed=True, bf16=True, kinds=["big", "inf", "nan"],
         grad_kinds=["-huge"], seed=0)
def test_rope_nonfinite(B, heads, S, half, cos_batch, transposed, bf16, kinds, grad_kinds, seed):
    """Bit for bit v5's x * cos + rotate_half(x) * sin (products rounded to x's dtype, then the sum),
    NaN and inf included (inf * 0 at position 0's sin = 0 is NaN in both)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    D = 2 * half
    if transposed:  # the projection wrote [B, S, H, D]; x [B, H, S, D] is a strided view of it
        base = dev(sprinkle(randn(B, S, heads, D, seed=seed), kinds, seed), dtype)
        x = base.transpose(1, 2)
    else:
        base = x = dev(sprinkle(randn(B, heads, S, D, seed=seed), kinds, seed), dtype)
    angles = torch.arange(S)[:, None] * (1.0 / 10000 ** (torch.arange(half) / half))[None, :]
    angles = torch.cat([angles, angles], dim=-1)[None].expand(B if cos_batch else 1, S, D)
    angles = angles * (1 + randn(1, seed=seed).abs())
    cos, sin = angles.cos().to(dtype).to(DEVICE).contiguous(), angles.sin().to(dtype).to(DEVICE).contiguous()
    with poisoned():
        y = rope(x, cos, sin)
    y_ref = ref.rope_ref(x, cos, sin)
    assert_matches(y, y_ref, "y", rtol=0, atol=0)
    dy = sprinkle(randn(B, heads, S, D, seed=seed + 1), grad_kinds, seed + 1).to(dtype).to(DEVICE)
    with poisoned():
        (gx,) = torch.autograd.grad(y, base, dy)
    (gx_ref,) = torch.autograd.grad(y_ref, base, dy)
    assert_matches(gx, gx_ref, "dx", rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# cross-entropy rows and the chunked loss
# ---------------------------------------------------------------------------------------------
@examples(ci=25)
@given(N=st.integers(1, 10), V=st.integers(1, 300), bf16=st.booleans(), kinds=specials,
       ignored=st.integers(0, 3), slice_at=st.floats(0, 1), seed=st.integers(0, 2**16))
@example(N=6, V=5, bf16=False, kinds=["nan", "inf", "row:-inf"], ignored=1, slice_at=0.0, seed=0)
def test_cross_entropy_rows_nonfinite(N, V, bf16, kinds, ignored, slice_at, seed):
    """logsumexp_and_target: lse - target is v5's per-token loss (F.cross_entropy on float32 logits),
    NaN for a NaN or +inf logit or an all -inf row; softmax_grad_ on a vocabulary slice is the
    gradient of v5's loss (an ignored row: 0, or NaN if its logits are)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(seed)
    logits = sprinkle(randn(N, V, seed=seed, scale=3.0), kinds, seed).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:ignored]] = -100
    labels = labels.to(DEVICE)
    with poisoned():
        lse, target = logsumexp_and_target(logits, labels)
    z = logits.float()
    scale = row_scale(z).squeeze(-1)
    assert_matches(lse, ref.log_sum_exp_ref(z), "lse", scale=scale)
    counted = labels != -100
    want_target = torch.where(counted, z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    assert_matches(target, want_target, "target", rtol=0, atol=0)
    leaf = z.detach().clone().requires_grad_(True)
    per_token = F.cross_entropy(leaf, labels, ignore_index=-100, reduction="none")  # v5's loss, per token
    assert_matches((lse - target)[counted], per_token[counted], "loss", scale=scale[counted.cpu()])

    weights = torch.where(counted, torch.rand(N, generator=g).to(DEVICE) + 0.5, 0.0)  # fused_ce's row scale
    (dz,) = torch.autograd.grad((per_token * weights).sum(), leaf)
    start = int(slice_at * (V - 1))
    stop = max(start + 1, V - int(slice_at * V / 3))
    with poisoned():
        got = softmax_grad_(logits[:, start:stop].clone(), ref.log_sum_exp_ref(z), labels,
                            weights.float().contiguous(), start)
    assert got.dtype == dtype
    # exp(x - lse) carries lse's rounding: a relative error of about eps * |lse| (6e4: 4e-3)
    want = dz[:, start:stop].to(dtype)
    rtol = 2e-2 if bf16 else 1e-5
    assert_matches(got, want, "dlogits", rtol=rtol, atol=1e-2 if bf16 else 1e-6,
                   scale=want.float().abs().cpu() * (1 + scale[:, None] * 5e-7 / rtol))


@examples(ci=15)
@given(N=st.integers(1, 12), H=st.integers(1, 12), V=st.integers(2, 40), impl=st.sampled_from(["torch", "triton"]),
       kinds=few_no_huge, weight_kinds=few_specials, chunk_rows=st.integers(1, 5), seed=st.integers(0, 2**16))
@example(N=6, H=4, V=9, impl="torch", kinds=["inf"], weight_kinds=[], chunk_rows=2, seed=0)
@example(N=6, H=4, V=9, impl="triton", kinds=["nan", "-inf"], weight_kinds=["huge"], chunk_rows=2, seed=1)
def test_linear_cross_entropy_nonfinite_as_v5(N, H, V, impl, kinds, weight_kinds, chunk_rows, seed):
    """moe_lab's chunked loss (torch and Triton row kernels) against v5's: F.linear then
    F.cross_entropy on float32 logits (mean over labelled tokens), the loss and both gradients.
    An inf logit gives NaN as in v5, not torch.logsumexp's inf."""
    from moe_lab.training.fused_ce import linear_cross_entropy

    g = torch.Generator().manual_seed(seed)
    hidden = dev(sprinkle(randn(N, H, seed=seed), kinds, seed))
    weight = dev(sprinkle(randn(V, H, seed=seed + 1, scale=0.5), weight_kinds, seed + 1))
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    labels = labels.to(DEVICE)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_bytes=chunk_rows * V * 4, impl=impl)
    want = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)
    logits_max = tensor_scale(F.linear(hidden, weight))
    assert_matches(loss, want, "loss", rtol=1e-5, scale=logits_max)
    grads = torch.autograd.grad(loss, (hidden, weight))
    grads_ref = torch.autograd.grad(want, (hidden, weight))
    # the softmax from the saved log-sum-exp is off by about eps * |lse| relative (huge logits: anything),
    # so each gradient may be off by ~1e-6 * max|logit| * max|the other GEMM operand|
    for name, got, expected, other in zip(("dhidden", "dweight"), grads, grads_ref, (weight, hidden)):
        slack = 1e-6 * logits_max * tensor_scale(other)
        assert_matches(got, expected, f"{impl} {name}", rtol=1e-4, atol=float(slack), scale=tensor_scale(expected))


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------
@examples(ci=40)
@given(n=st.integers(1, 5000), bf16=st.booleans(), weight_decay=st.sampled_from([0.0, 0.1]), step=st.integers(1, 4),
       p_kinds=few_specials, g_kinds=specials, state_kinds=few_specials, seed=st.integers(0, 2**16))
@example(n=8, bf16=False, weight_decay=0.0, step=1, p_kinds=["inf", "-inf"], g_kinds=["huge"], state_kinds=[], seed=0)
@example(n=8, bf16=False, weight_decay=0.1, step=2, p_kinds=["nan", "huge"], g_kinds=["inf", "-inf"],
         state_kinds=["inf"], seed=1)
def test_adamw_step_nonfinite(n, bf16, weight_decay, step, p_kinds, g_kinds, state_kinds, seed):
    """One step against PyTorch's fused AdamW formula: NaN and inf in parameters, gradients and
    moments go where they go there (an inf parameter stays inf without weight decay)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    p = sprinkle(randn(n, seed=seed), p_kinds, seed).to(dtype).to(DEVICE)
    g = sprinkle(randn(n, seed=seed + 1), g_kinds, seed + 1).to(dtype).to(DEVICE)
    m = sprinkle(randn(n, seed=seed + 2, scale=0.1), state_kinds, seed + 2).to(dtype).to(DEVICE)
    v = sprinkle(randn(n, seed=seed + 3, scale=0.1).square(), state_kinds[::-1], seed + 3).abs().to(dtype).to(DEVICE)
    hyper = dict(step=step, lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=weight_decay)
    want = ref.adamw_ref(p, g, m, v, **hyper)
    adamw_step_(p, g, m, v, **hyper)
    tol = dict(rtol=2e-2, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for name, got, expected in zip(("param", "exp_avg", "exp_avg_sq"), (p, m, v), want):
        assert got.dtype == dtype
        assert_matches(got, expected.to(dtype), name, **tol)


# ---------------------------------------------------------------------------------------------
# a whole MoE block of each family and backend against v5, with NaN and inf router logits
# ---------------------------------------------------------------------------------------------
BLOCK_FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]
SOFTMAX_FAMILIES = ("qwen3_moe", "mixtral")


def _nonfinite_block_pair(family, backend):
    """A v5 MoE block (6 experts, top-2; DeepSeek-V3 with 2 groups, one kept) whose router gives
    expert 2 the logit inf * hidden[:, 0], and the same block under moe_lab's ``backend``."""
    import moe_lab
    import transformers
    from tiny_models import tiny_config

    config = tiny_config(family, num_experts=6, top_k=2)
    torch.manual_seed(4)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    block = model.model.layers[-1].mlp
    router = block.router if family == "gpt_oss" else block.gate
    with torch.no_grad():
        router.weight[2] = 0.0
        router.weight[2, 0] = INF
        if family == "gpt_oss":
            router.bias[2] = 0.0
    model = model.to(DEVICE)
    ours = copy.deepcopy(model)
    moe_lab.patch_model(ours, backend)
    return block, ours.model.layers[-1].mlp


@pytest.mark.parametrize("backend", ["eager", "torch", "triton", "triton_gather"])
@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_moe_block_keeps_nan_and_inf_as_v5(family, backend):
    """Tokens whose hidden[:, 0] is > 0, < 0 or 0 give expert 2 a +inf, -inf or NaN router logit.
    v5 turns the NaN ones (and the +inf ones under softmax) into NaN outputs; moe_lab's block must
    give NaN in the same output elements and gradients. (The issue: the Triton router used to route
    around the NaN expert on DeepSeek-V3 and GPT-OSS and return finite outputs.)

    Under a softmax router (Qwen3-MoE, Mixtral) such a token's probabilities are all NaN and v5's
    topk picks k of them in an order torch does not define; every moe_lab router takes experts
    0..k-1 (select_experts' tie rule), so there the expert weights' gradients are not compared, only
    the output, the hidden states' and the router's gradients."""
    block, layer = _nonfinite_block_pair(family, backend)
    hidden = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(5))
    hidden[0, :3, 0] = torch.tensor([0.0, 1.0, -1.0])  # NaN, +inf, -inf logits for expert 2
    hidden[1, 4, 0] = 0.0
    hidden = hidden.to(DEVICE)
    dout = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    results = []
    for module in (block, layer):
        x = hidden.clone().requires_grad_(True)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(out, [x, *params.values()], dout, allow_unused=True)
        results.append((out, dict(zip(["hidden", *params], grads))))
    (ref_out, ref_grads), (our_out, our_grads) = results
    assert ref_out.isnan().any(), "the case must give v5 NaN outputs"
    assert_matches(our_out, ref_out, f"{family}/{backend} output", rtol=1e-4, atol=1e-5)
    undefined = family in SOFTMAX_FAMILIES
    for name, expected in ref_grads.items():
        if undefined and "expert" in name:
            continue
        got = our_grads[name]
        if expected is None or got is None:
            assert expected is None and got is None or (expected if got is None else got).eq(0).all(), name
            continue
        assert_matches(got, expected, f"{family}/{backend} d{name}", rtol=1e-4, atol=1e-5)
