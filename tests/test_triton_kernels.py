"""Triton kernels vs their plain-PyTorch references, forward and gradients.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here and in
conftest.py before any kernel is imported) on CPU tensors, with small shapes and few hypothesis
examples (new random ones each run: tests/hypothesis_profiles.py); with CUDA the same tests run
compiled on the GPU, and the ``gpu``-marked ones add bf16 checks at larger shapes. Every kernel
output is allocated "poisoned" (NaN / sentinel ints), so an element a kernel forgets to write fails
the comparison.
"""
import contextlib
import os
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# (with CUDA, conftest.py pins one config per autotuned kernel)

pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis_profiles import examples  # noqa: E402

from moe_lab.stages.router import RoutingSpec, select_experts  # noqa: E402
import triton_kernels as tk  # noqa: E402
from triton_kernels import reference as ref  # noqa: E402
from triton_kernels import settings as kernel_settings  # noqa: E402
from triton_kernels._common import interpreting  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
# random cases within a fixed budget on CI, >= 1000 per test under HYPOTHESIS_PROFILE=gpu
# (tests/hypothesis_profiles.py)
FAST = examples(ci=10)
CHEAP = examples(ci=15)  # for the kernels that interpret quickly
gpu = pytest.mark.gpu
needs_compiled_cuda = pytest.mark.skipif(interpreting() or not torch.cuda.is_available(),
                                         reason="needs CUDA with compiled (not interpreted) Triton")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like return NaN-filled (float) or -12345-filled (int) tensors."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-12345)
        return t

    with mock.patch.object(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k))):
        yield


def make_counts(E, S, seed, mode):
    """Row counts [E] summing to S. mode: 'random' (some experts empty), 'one' (all rows to one
    expert), 'uniform'."""
    g = torch.Generator().manual_seed(seed)
    if mode == "one":
        counts = torch.zeros(E, dtype=torch.int64)
        counts[int(torch.randint(0, E, (1,), generator=g))] = S
        return counts
    if mode == "uniform":
        active = torch.arange(E)
    else:
        active = torch.nonzero(torch.rand(E, generator=g) < 0.6).flatten()
        if active.numel() == 0:
            active = torch.tensor([E - 1])
    return torch.bincount(active[torch.randint(0, active.numel(), (S,), generator=g)], minlength=E)


def offsets_of(counts):
    return counts.cumsum(0).to(torch.int32).to(DEVICE)


def rand(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def assert_close(actual, expected, rtol=1e-4, atol=1e-4, what=""):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_close_rel(actual, expected, tol, what=""):
    """max |a - b| <= tol * max |b| (for bf16, where elementwise rtol is meaningless near 0)."""
    a, b = actual.float(), expected.float()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err, mag = (a - b).abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0
    assert err <= tol * max(mag, 1e-6), f"{what}: max err {err:.3g} vs max |ref| {mag:.3g} (tol {tol})"


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


shape_modes = st.sampled_from(["random", "one", "uniform"])


# ---------------------------------------------------------------------------------------------
# grouped GEMM
# ---------------------------------------------------------------------------------------------
@FAST
@given(E=st.integers(1, 9), S=st.integers(0, 90), K=st.integers(1, 80), N=st.integers(1, 80),
       mode=shape_modes, transposed_w=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
@example(E=3, S=0, K=5, N=7, mode="random", transposed_w=True, bias=True, seed=0)
@example(E=5, S=70, K=70, N=70, mode="one", transposed_w=True, bias=False, seed=1)
@example(E=7, S=90, K=33, N=65, mode="random", transposed_w=False, bias=True, seed=2)
def test_grouped_mm_fp32(E, S, K, N, mode, transposed_w, bias, seed):
    counts = make_counts(E, S, seed, mode)
    offsets = offsets_of(counts)
    x = leaf(rand(S, K, seed=seed))
    base = leaf(rand(E, N, K, seed=seed + 1) if transposed_w else rand(E, K, N, seed=seed + 1))
    b = leaf(rand(E, N, seed=seed + 2)) if bias else None
    w = base.transpose(1, 2) if transposed_w else base
    with poisoned():
        y = tk.grouped_mm(x, w, offsets, b)
    y_ref = ref.grouped_mm_ref(x, w, offsets, b)
    assert y.shape == (S, N) and y.dtype == x.dtype
    assert_close(y, y_ref, what="y")
    dy = rand(S, N, seed=seed + 3)
    inputs = (x, base) + ((b,) if bias else ())
    with poisoned():
        grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, g, gr in zip(("dx", "dw", "db"), grads, grads_ref):
        assert_close(g, gr, what=name)
    assert grads[1].stride() == base.stride(), "dw should come back in the parameter's layout"


def test_grouped_mm_bf16():
    E, K, N = 6, 72, 40
    counts = torch.tensor([0, 40, 3, 0, 17, 1])
    S = int(counts.sum())
    offsets = offsets_of(counts)
    x = rand(S, K, seed=1, dtype=torch.bfloat16)
    w = rand(E, N, K, seed=2, dtype=torch.bfloat16).transpose(1, 2)
    xr, wr = leaf(x.float()), leaf(w.float())
    x, w = leaf(x), leaf(w)
    with poisoned():
        y = tk.grouped_mm(x, w, offsets)
    y_ref = ref.grouped_mm_ref(xr, wr, offsets)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, y_ref, 2e-2, "y")
    dy = rand(S, N, seed=3, dtype=torch.bfloat16)
    with poisoned():
        gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(y_ref, (xr, wr), dy.float())
    assert_close_rel(gx, rx, 2e-2, "dx")
    assert_close_rel(gw, rw, 2e-2, "dw")
    assert_close_rel(gw[0], torch.zeros_like(rw[0]), 0.0, "dw of an empty expert")


class _CountingKernel:
    """Wraps a Triton kernel; counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("transposed_w", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_mm_tma_matches_the_pointer_kernel(monkeypatch, transposed_w, bias):
    """settings tma=True: the tensor-descriptor kernels (forward, the input gradient on the
    transpose view; the weight gradient stays on the pointer kernel) against the reference and the
    pointer kernels, with empty
    experts, an expert over several M-tiles and N narrower than a tile (the descriptors clip at each
    expert's last row)."""
    from triton_kernels import grouped_gemm, grouped_gemm_tma

    E, K, N = 6, 72, 40
    counts = torch.tensor([0, 70, 3, 0, 17, 1])
    S = int(counts.sum())
    offsets = offsets_of(counts)
    x = rand(S, K, seed=11, dtype=torch.bfloat16)
    base = rand(E, N, K, seed=12, dtype=torch.bfloat16) if transposed_w else rand(E, K, N, seed=12, dtype=torch.bfloat16)
    b = rand(E, N, seed=13, dtype=torch.bfloat16) if bias else None
    xr, br, baser = leaf(x.float()), (leaf(b.float()) if bias else None), leaf(base.float())
    x, base, b = leaf(x), leaf(base), (leaf(b) if bias else None)
    inputs = (x, base) + ((b,) if bias else ())
    dy = rand(S, N, seed=14, dtype=torch.bfloat16)

    def run():
        w = base.transpose(1, 2) if transposed_w else base
        with poisoned():
            y = tk.grouped_mm(x, w, offsets, b)
            return (y,) + torch.autograd.grad(y, inputs, dy)

    forward = _CountingKernel(grouped_gemm_tma._grouped_mm_tma_kernel)
    weight_grad = _CountingKernel(grouped_gemm_tma._grouped_mm_dw_tma_kernel)
    monkeypatch.setattr(grouped_gemm_tma, "_grouped_mm_tma_kernel", forward)
    monkeypatch.setattr(grouped_gemm_tma, "_grouped_mm_dw_tma_kernel", weight_grad)
    monkeypatch.setattr(kernel_settings, "_current", kernel_settings.KernelSettings(tma=True))
    y, gx, gw, *gb = run()
    assert forward.launches == 2, "a TMA kernel did not run"
    assert weight_grad.launches == 0, "the weight gradient stays on the pointer kernel under settings tma=True"
    y_ref = ref.grouped_mm_ref(xr, baser.transpose(1, 2) if transposed_w else baser, offsets, br)
    rx, rw, *rb = torch.autograd.grad(y_ref, (xr, baser) + ((br,) if bias else ()), dy.float())
    assert_close_rel(y, y_ref, 1e-2, "y")
    assert_close_rel(gx, rx, 1e-2, "dx")
    assert_close_rel(gw, rw, 2e-2, "dw")
    assert_close_rel(gw[0], torch.zeros_like(rw[0]), 0.0, "dw of an empty expert")
    if bias:
        assert_close_rel(gb[0], rb[0], 2e-2, "dbias")
    monkeypatch.setattr(kernel_settings, "_current", kernel_settings.KernelSettings(tma=False))
    for name, tma, pointer in zip(("y", "dx"), (y, gx), run()):  # (dw, dbias: the pointer kernel both times)
        if interpreting():  # same tiles, same order: bit for bit
            assert_close(tma, pointer, rtol=0, atol=0, what=f"{name}: TMA vs pointer kernel")
        else:  # compiled, the two may pick other tiles (another accumulation order)
            assert_close_rel(tma, pointer, 1e-2, f"{name}: TMA vs pointer kernel")
    assert (forward.launches, weight_grad.launches) == (2, 0)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("transposed_like", [False, True])
def test_weight_grad_kernels_agree_with_the_reference(gather, transposed_like):
    """Every weight-gradient kernel (``DW_IMPLS``; ``tma`` only without a gather) against
    per-expert ``x_e^T @ dy_e``, with empty experts (zeros), an expert over several row steps,
    K and N not multiples of the tiles, dbias, and the result in the layout of ``like``."""
    from triton_kernels import grouped_gemm

    E, K, N = 5, 72, 40
    counts = torch.tensor([0, 140, 3, 0, 17])  # 140 rows: several row steps for any BLOCK_S <= 64
    S = int(counts.sum())
    offsets = offsets_of(counts)
    T = 29
    src = torch.randint(0, T, (S,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bf16 = torch.bfloat16  # (what tensor descriptors take)
    x = rand(T if gather else S, K, seed=21, dtype=bf16)
    dy = rand(S, N, seed=22, dtype=bf16)
    like = rand(E, N, K, seed=23, dtype=bf16).transpose(1, 2) if transposed_like else rand(E, K, N, seed=23, dtype=bf16)
    rows = x[src] if gather else x
    ends = offsets.tolist()
    want = torch.stack([rows[a:b].double().T @ dy[a:b].double() for a, b in zip([0] + ends[:-1], ends)])
    want_db = torch.stack([dy[a:b].double().sum(0) for a, b in zip([0] + ends[:-1], ends)])
    impls = [i for i in grouped_gemm.DW_IMPLS if not (gather and i in ("tma", "torch"))]
    for impl in impls:
        with poisoned():
            dw, db = grouped_gemm.grouped_mm_weight_grad(x, dy, offsets, like, with_bias=True,
                                                         src_rows=src if gather else None, impl=impl)
        assert dw.stride() == like.stride(), f"{impl}: dw not in the weight's layout"
        assert_close_rel(dw, want, 1e-2, f"{impl}: dw")
        assert_close_rel(db, want_db, 1e-2, f"{impl}: dbias")
        assert_close_rel(dw[0], want[0], 0.0, f"{impl}: dw of an empty expert")
    if gather:
        for impl in ("tma", "torch"):
            with pytest.raises(ValueError, match="without a gather"):
                grouped_gemm.grouped_mm_weight_grad(x, dy, offsets, like, src_rows=src, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_gemm.grouped_mm_weight_grad(x, dy, offsets, like, impl="cutlass")


def test_weight_grad_default_follows_the_setting(monkeypatch):
    """bf16 rows without a gather go to torch's grouped_mm unless ``weight_grad="triton"``; float32
    rows and gathered rows always to the pointer kernel; a bad setting is refused."""
    from triton_kernels import grouped_gemm

    x16, x32 = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8)
    src = torch.zeros(4, dtype=torch.int64)
    monkeypatch.setattr(kernel_settings, "_current", kernel_settings.KernelSettings())
    assert grouped_gemm.default_dw_impl(x16, x16, None) == "torch"
    assert grouped_gemm.default_dw_impl(x32, x32, None) == "pointer"
    assert grouped_gemm.default_dw_impl(x16, x16, src) == "pointer"
    assert grouped_gemm.default_dw_impl(torch.zeros(4, 14, dtype=torch.bfloat16), x16, None) == "pointer"  # 28-byte rows
    monkeypatch.setattr(kernel_settings, "_current", kernel_settings.KernelSettings(weight_grad="triton"))
    assert grouped_gemm.default_dw_impl(x16, x16, None) == "pointer"
    with pytest.raises(ValueError, match="weight_grad must be"):
        kernel_settings.KernelSettings(weight_grad="cutlass")


def test_grouped_mm_tma_store_stops_at_the_experts_last_row():
    """Only expert 1's tiles launched (70 rows, the last tile half full): the rows after it must stay
    untouched, which a store clipped anywhere but at the expert's own end would overwrite (with every
    expert launched, the next expert's programs would hide it)."""
    import triton

    from triton_kernels import grouped_gemm, grouped_gemm_tma

    E, K, N, block_m = 4, 64, 40, 32
    counts = torch.tensor([0, 70, 30, 20])
    S = int(counts.sum())
    offsets = offsets_of(counts)
    x = rand(S, K, seed=21, dtype=torch.bfloat16)
    w = rand(E, K, N, seed=22, dtype=torch.bfloat16)
    y = torch.full((S, N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    grid = lambda meta: (triton.cdiv(70, block_m) * triton.cdiv(N, meta["BLOCK_N"]),)
    upcast = grouped_gemm._gemm_flags(x.dtype)[1]
    grouped_gemm_tma.launch_tma_forward(grouped_gemm_tma._grouped_mm_tma_kernel.fn, grid, x, w, y, x, offsets, (0, 0),
                                    False, upcast, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    assert_close_rel(y[:70], x[:70].float() @ w[1].float(), 1e-2, "expert 1's rows")
    assert torch.isnan(y[70:].float()).all(), "the store ran past expert 1's last row"


def test_grouped_mm_tma_takes_only_what_a_descriptor_can_describe():
    from triton_kernels.grouped_gemm import tma_eligible

    x, w, y = (torch.zeros(10, 72, dtype=torch.bfloat16), torch.zeros(3, 72, 40, dtype=torch.bfloat16),
               torch.zeros(10, 40, dtype=torch.bfloat16))
    assert tma_eligible(x, w, y) and tma_eligible(x, torch.zeros(3, 40, 72, dtype=torch.bfloat16).transpose(1, 2), y)
    assert not tma_eligible(x.float(), w.float(), y.float())  # 16-bit floats only
    assert not tma_eligible(torch.zeros(10, 36, dtype=torch.bfloat16), torch.zeros(3, 36, 40, dtype=torch.bfloat16), y)  # 72-byte rows
    assert not tma_eligible(x, torch.zeros(3, 72, 80, dtype=torch.bfloat16)[:, :, ::2], y)  # no unit stride in w
    assert not tma_eligible(torch.zeros(1, 72, dtype=torch.bfloat16).expand(10, 72), w, y)  # broadcast rows
    assert not tma_eligible(x[:0], w, y[:0])  # nothing to describe


# ---------------------------------------------------------------------------------------------
# fused expert MLP
# ---------------------------------------------------------------------------------------------
def _mlp_inputs(E, S, H, I, transposed, bias, seed, dtype=torch.float32, act="swiglu"):
    """x, gate_up, down, gate_up_bias, down_bias; a non-gated act (relu2) gets the up projection
    (I columns where the gated ones have 2I) in gate_up's place."""
    wscale = 1.0 if act == "gpt_oss" else H ** -0.5  # gpt_oss: large pre-activations hit the clamps
    width = I if act in ref.NON_GATED else 2 * I
    gate_up = rand(E, H, width, seed=seed + 1, dtype=dtype, scale=wscale) if transposed else \
        rand(E, width, H, seed=seed + 1, dtype=dtype, scale=wscale)
    down = rand(E, I, H, seed=seed + 2, dtype=dtype, scale=I ** -0.5) if transposed else \
        rand(E, H, I, seed=seed + 2, dtype=dtype, scale=I ** -0.5)
    x = rand(S, H, seed=seed, dtype=dtype)
    bgu = rand(E, width, seed=seed + 3, dtype=dtype) if bias else None
    bd = rand(E, H, seed=seed + 4, dtype=dtype) if bias else None
    return x, gate_up, down, bgu, bd


@FAST
@given(E=st.integers(1, 7), S=st.integers(0, 70), H=st.integers(1, 70), I=st.integers(1, 40),
       act=st.sampled_from(["swiglu", "gpt_oss"]), transposed=st.booleans(), bias=st.booleans(),
       concatenated=st.sampled_from([None, True, False]), mode=shape_modes, seed=st.integers(0, 2**16))
@example(E=3, S=0, H=9, I=5, act="gpt_oss", transposed=True, bias=True, concatenated=None, mode="random", seed=0)
@example(E=4, S=66, H=67, I=33, act="swiglu", transposed=False, bias=False, concatenated=None, mode="one", seed=1)
@example(E=5, S=50, H=31, I=37, act="gpt_oss", transposed=True, bias=True, concatenated=None, mode="random", seed=2)
@example(E=3, S=70, H=33, I=37, act="swiglu", transposed=False, bias=True, concatenated=False, mode="random", seed=3)
def test_expert_mlp_fp32(E, S, H, I, act, transposed, bias, concatenated, mode, seed):
    """Both column orders of gate/up (halves, and interleaved: the kernels' PAIRS tiles) in both
    weight layouts; concatenated=None is each layout's v5 default."""
    counts = make_counts(E, S, seed, mode)
    offsets = offsets_of(counts)
    tensors = [leaf(t) if t is not None else None for t in _mlp_inputs(E, S, H, I, transposed, bias, seed, act=act)]
    x, gate_up, down, bgu, bd = tensors
    kw = dict(activation=act, gate_up_bias=bgu, down_bias=bd, transposed=transposed, concatenated=concatenated)
    with poisoned():
        y = tk.expert_mlp(x, gate_up, down, offsets, **kw)
    y_ref = ref.expert_mlp_ref(x, gate_up, down, offsets, **kw)
    scale = max(y_ref.abs().max().item(), 1.0) if S else 1.0
    assert_close(y, y_ref, atol=1e-5 * scale, what="y")
    inputs = [t for t in tensors if t is not None]
    dy = rand(S, H, seed=seed + 5)
    with poisoned():
        grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, g, gr in zip(("dx", "dgate_up", "ddown", "dbias_gu", "dbias_down"), grads, grads_ref):
        gscale = max(gr.abs().max().item(), 1.0) if gr.numel() else 1.0
        assert_close(g, gr, atol=1e-5 * gscale, what=name)


@examples(ci=6)
@given(E=st.integers(1, 7), S=st.integers(0, 70), H=st.integers(1, 70), I=st.integers(1, 40),
       transposed=st.booleans(), bias=st.booleans(), mode=shape_modes, seed=st.integers(0, 2**16))
@example(E=3, S=0, H=9, I=5, transposed=False, bias=True, mode="random", seed=0)  # no rows at all
@example(E=4, S=66, H=67, I=33, transposed=False, bias=False, mode="one", seed=1)  # one expert takes every row
@example(E=5, S=50, H=31, I=37, transposed=True, bias=True, mode="random", seed=2)
@example(E=6, S=1, H=1, I=1, transposed=True, bias=False, mode="random", seed=3)
def test_expert_mlp_relu2_fp32(E, S, H, I, transposed, bias, mode, seed):
    """Non-gated experts (Nemotron-H: up_proj [E, I, H], relu(h)^2, down_proj [E, H, I]) in both
    layouts, with and without biases: forward (with and without grad) and every gradient."""
    counts = make_counts(E, S, seed, mode)
    offsets = offsets_of(counts)
    tensors = [leaf(t) if t is not None else None
               for t in _mlp_inputs(E, S, H, I, transposed, bias, seed, act="relu2")]
    x, up, down, bup, bd = tensors
    kw = dict(activation="relu2", gate_up_bias=bup, down_bias=bd, transposed=transposed)
    with poisoned():
        y = tk.expert_mlp(x, up, down, offsets, **kw)
    y_ref = ref.expert_mlp_ref(x, up, down, offsets, **kw)
    scale = max(y_ref.abs().max().item(), 1.0) if S else 1.0
    assert_close(y, y_ref, atol=1e-5 * scale, what="y")
    with torch.no_grad(), poisoned():  # the inference path: no pre-activation stored
        assert_close(tk.expert_mlp(x, up, down, offsets, **kw), y_ref, atol=1e-5 * scale, what="y without grad")
    inputs = [t for t in tensors if t is not None]
    dy = rand(S, H, seed=seed + 5)
    with poisoned():
        grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, g, gr in zip(("dx", "dup", "ddown", "dbias_up", "dbias_down"), grads, grads_ref):
        gscale = max(gr.abs().max().item(), 1.0) if gr.numel() else 1.0
        assert_close(g, gr, atol=1e-5 * gscale, what=name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the NaN / inf inputs
def test_expert_mlp_relu2_masks_and_shapes():
    """relu2's backward passes nothing where h <= 0 (also for an infinite upstream gradient), NaN
    stays NaN; a gated-shaped weight is refused for a non-gated activation and vice versa."""
    E, H, I = 1, 2, 2
    offsets = offsets_of(torch.tensor([3]))
    x = leaf(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [float("nan"), 0.0]], device=DEVICE))
    up = leaf(torch.tensor([[[2.0, 0.0], [-3.0, 0.0]]], device=DEVICE))  # h = [2x, -3x]
    down = leaf(torch.eye(2, device=DEVICE)[None])
    y = tk.expert_mlp(x, up, down, offsets, "relu2")
    y_ref = ref.expert_mlp_ref(x, up, down, offsets, "relu2")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert y[:2].tolist() == [[4.0, 0.0], [0.0, 9.0]] and y[2].isnan().all()
    dy = torch.tensor([[float("inf"), float("inf")], [1.0, float("-inf")], [1.0, 1.0]], device=DEVICE)
    for name, g, gr in zip(("dx", "dup", "ddown"), torch.autograd.grad(y, [x, up, down], dy),
                           torch.autograd.grad(y_ref, [x, up, down], dy)):
        torch.testing.assert_close(g, gr, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match=r"expected gate_up \[E, I, H\]"):
        tk.expert_mlp(x, torch.zeros(E, 2 * I, H, device=DEVICE), down, offsets, "relu2")
    with pytest.raises(ValueError, match=r"expected gate_up \[E, 2I, H\]"):
        tk.expert_mlp(x, up, down, offsets, "swiglu")


@pytest.mark.parametrize("epi_split", [1, 2, 4])
@pytest.mark.parametrize("act,transposed", [("swiglu", False), ("gpt_oss", True), ("relu2", False), ("relu2", True)])
def test_down_backward_epilogue_slices(monkeypatch, epi_split, act, transposed):
    """The down-backward kernel with its epilogue in 1, 2 or 4 column slices (one candidate config
    forced), I = 40 not a multiple of the 64-wide tile: every gradient equals the reference."""
    import importlib

    import triton

    em = importlib.import_module("triton_kernels.expert_mlp")
    tile = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "EPI_SPLIT": epi_split}
    monkeypatch.setattr(em._down_bwd_act_kernel, "configs", [triton.Config(tile, num_warps=4)])
    E, H, I = 3, 24, 40
    counts = torch.tensor([7, 0, 38])
    offsets = offsets_of(counts)
    tensors = [leaf(t) if t is not None else None
               for t in _mlp_inputs(E, int(counts.sum()), H, I, transposed, transposed, 5, act=act)]
    inputs = [t for t in tensors if t is not None]
    kw = dict(activation=act, gate_up_bias=tensors[3], down_bias=tensors[4], transposed=transposed)
    dy = rand(int(counts.sum()), H, seed=6)
    with poisoned():
        grads = torch.autograd.grad(tk.expert_mlp(*tensors[:3], offsets, **kw), inputs, dy)
    grads_ref = torch.autograd.grad(ref.expert_mlp_ref(*tensors[:3], offsets, **kw), inputs, dy)
    for name, g, gr in zip(("dx", "dgate_up", "ddown", "dbias_gu", "dbias_down"), grads, grads_ref):
        assert_close(g, gr, atol=1e-5 * max(gr.abs().max().item(), 1.0), what=f"{name}, EPI_SPLIT={epi_split}")


def test_expert_mlp_inference_path_matches():
    """Without grad the MLP skips storing the pre-activation; same numbers."""
    counts = torch.tensor([5, 0, 11])
    offsets = offsets_of(counts)
    x, gate_up, down, bgu, bd = _mlp_inputs(3, 16, 24, 20, True, True, 7, act="gpt_oss")
    with torch.no_grad(), poisoned():
        y = tk.expert_mlp(x, gate_up, down, offsets, "gpt_oss", bgu, bd, transposed=True)
    assert_close(y, ref.expert_mlp_ref(x, gate_up, down, offsets, "gpt_oss", bgu, bd, transposed=True),
                 atol=1e-4, what="y")


@pytest.mark.parametrize("act,transposed", [("swiglu", False), ("gpt_oss", True), ("relu2", False)])
def test_expert_mlp_bf16(act, transposed):
    E, H, I = 4, 48, 24
    counts = torch.tensor([9, 0, 30, 2])
    S = int(counts.sum())
    offsets = offsets_of(counts)
    # unit-scale pre-activations: near the gpt_oss clamp (|h| ~ 7) a bf16 rounding of h could flip
    # the clamp's gradient mask against the fp32 reference (the clamps are checked in fp32)
    bf = [t for t in _mlp_inputs(E, S, H, I, transposed, transposed, 11, torch.bfloat16,
                                 act=act if act in ref.NON_GATED else "swiglu")]  # (swiglu: the weight scale)
    fp = [leaf(t.float()) if t is not None else None for t in bf]
    bf = [leaf(t) if t is not None else None for t in bf]
    kw = dict(activation=act, transposed=transposed)
    with poisoned():
        y = tk.expert_mlp(bf[0], bf[1], bf[2], offsets, gate_up_bias=bf[3], down_bias=bf[4], **kw)
    y_ref = ref.expert_mlp_ref(fp[0], fp[1], fp[2], offsets, gate_up_bias=fp[3], down_bias=fp[4], **kw)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, y_ref, 4e-2, "y")
    dy = rand(S, H, seed=5, dtype=torch.bfloat16)
    with poisoned():
        grads = torch.autograd.grad(y, [t for t in bf if t is not None], dy)
    grads_ref = torch.autograd.grad(y_ref, [t for t in fp if t is not None], dy.float())
    for name, g, gr in zip(("dx", "dgate_up", "ddown", "dbias_gu", "dbias_down"), grads, grads_ref):
        assert g.dtype == torch.bfloat16
        assert_close_rel(g, gr, 6e-2, name)


@pytest.mark.parametrize("act", ["swiglu", "gpt_oss", "relu2"])
@pytest.mark.parametrize("transposed", [False, True])
def test_expert_mlp_tma_matches_the_pointer_kernels(monkeypatch, act, transposed):
    """settings tma=True in the fused kernels: the gate_up + activation forward (K-major weights,
    concatenated halves; the interleaved halves of ``transposed`` GPT-OSS-style weights have no unit
    stride and stay on pointers, a non-gated ``transposed`` up projection has one and takes TMA) and
    the down backward + activation, against the pointer path."""
    import importlib

    expert_mlp = importlib.import_module("triton_kernels.expert_mlp")  # the package exports a function of that name
    E, H, I = 4, 48, 24
    counts = torch.tensor([9, 0, 70, 2])
    S = int(counts.sum())
    offsets = offsets_of(counts)
    tensors = [leaf(t) for t in _mlp_inputs(E, S, H, I, transposed, False, 21, torch.bfloat16, act=act)[:3]]
    dy = rand(S, H, seed=22, dtype=torch.bfloat16)

    def run():
        with poisoned():
            y = tk.expert_mlp(*tensors, offsets, activation=act, transposed=transposed)
            return (y,) + torch.autograd.grad(y, tensors, dy)

    described = []  # use_tma of each fused-kernel launch
    real = expert_mlp.tma_weight_args
    monkeypatch.setattr(expert_mlp, "tma_weight_args", lambda use_tma, w: described.append(use_tma) or real(use_tma, w))
    monkeypatch.setattr(kernel_settings, "_current", kernel_settings.KernelSettings(tma=True))
    with_tma = run()
    tma_launches = 1 if transposed and act not in ref.NON_GATED else 2
    assert described.count(True) == tma_launches, "the fused kernels did not take the TMA path"
    monkeypatch.setattr(kernel_settings, "_current", kernel_settings.KernelSettings(tma=False))
    for name, tma, pointer in zip(("y", "dx", "dgate_up", "ddown"), with_tma, run()):
        if interpreting():
            assert_close(tma, pointer, rtol=0, atol=0, what=f"{name}: TMA vs pointer kernels")
        else:
            assert_close_rel(tma, pointer, 1e-2, f"{name}: TMA vs pointer kernels")
    assert described.count(True) == tma_launches


# ---------------------------------------------------------------------------------------------
# permutation
# ---------------------------------------------------------------------------------------------
def make_ids(T, k, E, seed, mode):
    """ids [T, k], distinct experts per token (k <= E). mode 'one' routes every token's first
    choice to one expert (all tokens to that expert when k == 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    if mode == "one" and T:
        hot = int(torch.randint(0, E, (1,), generator=g))
        for t in range(T):
            row = ids[t]
            pos = (row == hot).nonzero()
            if pos.numel():
                row[pos[0, 0]] = row[0]
            row[0] = hot
    if mode == "skew":  # only the first few experts are used
        ids = torch.rand(T, min(E, k + 1), generator=g).argsort(dim=1)[:, :k]
    return ids.to(DEVICE)


@CHEAP
@given(T=st.integers(0, 60), E=st.integers(1, 13), k=st.integers(1, 8),
       mode=st.sampled_from(["random", "one", "skew"]), seed=st.integers(0, 2**16),
       int32=st.booleans())
@example(T=0, E=5, k=2, mode="random", seed=0, int32=False)
@example(T=40, E=1, k=1, mode="one", seed=0, int32=True)
@example(T=50, E=7, k=7, mode="random", seed=3, int32=False)
def test_sort_by_expert(T, E, k, mode, seed, int32):
    k = min(k, E)
    ids = make_ids(T, k, E, seed, mode)
    if int32:
        ids = ids.to(torch.int32)
    with poisoned():
        sorted_slots, counts, offsets, inv = tk.sort_by_expert(ids, E, return_inverse=True)
        counts2 = tk.expert_counts(ids, E)
    r_slots, r_counts, r_offsets = ref.sort_by_expert_ref(ids, E)
    assert sorted_slots.dtype == torch.int64 and offsets.dtype == torch.int32
    assert torch.equal(sorted_slots, r_slots)
    assert torch.equal(counts, r_counts) and torch.equal(counts2, r_counts)
    assert torch.equal(offsets, r_offsets)
    assert torch.equal(inv, ref.inverse_permutation_ref(r_slots))
    assert torch.equal(tk.inverse_permutation(sorted_slots), inv)


@pytest.mark.parametrize("max_chunks", [256, 2, 1])
def test_sort_by_expert_many_chunks(monkeypatch, max_chunks):
    """More slots than one sub-block holds, so chunk bases and ranks across chunks are exercised;
    with few chunks allowed, each chunk walks several sub-blocks (as at 65,536 tokens on a GPU)."""
    import importlib

    permute_module = importlib.import_module("triton_kernels.permute")  # (the package exports a function `permute`)
    monkeypatch.setattr(permute_module, "MAX_CHUNKS", max_chunks)
    T, k, E = 700, 3, 6
    ids = make_ids(T, k, E, 5, "random")
    chunk, sub = permute_module._chunking(T * k, E)
    assert chunk // sub == (1 if max_chunks == 256 else 3 if max_chunks == 1 else 2)
    with poisoned():
        sorted_slots, counts, offsets, inv = tk.sort_by_expert(ids, E, return_inverse=True)
    r_slots, r_counts, r_offsets = ref.sort_by_expert_ref(ids, E)
    assert torch.equal(sorted_slots, r_slots) and torch.equal(counts, r_counts) and torch.equal(offsets, r_offsets)
    assert torch.equal(inv, ref.inverse_permutation_ref(r_slots))


@CHEAP
@given(T=st.integers(0, 50), E=st.integers(1, 11), k=st.integers(1, 8), H=st.integers(1, 70),
       mode=st.sampled_from(["random", "one"]), seed=st.integers(0, 2**16))
@example(T=0, E=4, k=2, H=8, mode="random", seed=0)
@example(T=45, E=9, k=8, H=67, mode="one", seed=1)
def test_permute_and_combine_fp32(T, E, k, H, mode, seed):
    k = min(k, E)
    ids = make_ids(T, k, E, seed, mode)
    sorted_slots, _, _ = tk.sort_by_expert(ids, E)
    x = leaf(rand(T, H, seed=seed))
    with poisoned():
        xs = tk.permute(x, sorted_slots, k)
    xs_ref = ref.permute_ref(x, sorted_slots, k)
    assert torch.equal(xs, xs_ref)
    dxs = rand(T * k, H, seed=seed + 1)
    with poisoned():
        (gx,) = torch.autograd.grad(xs, x, dxs)
    assert_close(gx, torch.autograd.grad(xs_ref, x, dxs)[0], rtol=1e-5, atol=1e-5, what="permute dx")

    y = leaf(rand(T * k, H, seed=seed + 2))
    w = leaf(torch.rand(T, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE))
    with poisoned():
        out = tk.combine(y, w, sorted_slots)
    out_ref = ref.combine_ref(y, w, sorted_slots)
    assert_close(out, out_ref, rtol=1e-5, atol=1e-5, what="combine")
    dout = rand(T, H, seed=seed + 3)
    with poisoned():
        gy, gw = torch.autograd.grad(out, (y, w), dout)
    ry, rw = torch.autograd.grad(out_ref, (y, w), dout)
    assert_close(gy, ry, rtol=1e-5, atol=1e-5, what="combine dy")
    assert_close(gw, rw, rtol=1e-4, atol=1e-4, what="combine dweights")


def test_permute_combine_bf16():
    T, k, E, H = 33, 4, 6, 40
    ids = make_ids(T, k, E, 3, "random")
    sorted_slots, _, _ = tk.sort_by_expert(ids, E)
    x = rand(T, H, seed=1, dtype=torch.bfloat16)
    assert torch.equal(tk.permute(x, sorted_slots, k), x[sorted_slots // k])
    y = leaf(rand(T * k, H, seed=2, dtype=torch.bfloat16))
    w = leaf(torch.rand(T, k).to(DEVICE))  # fp32 routing weights with bf16 rows
    with poisoned():
        out = tk.combine(y, w, sorted_slots)
    yr = leaf(y.detach().float())
    wr = leaf(w.detach())
    out_ref = ref.combine_ref(yr, wr, sorted_slots)
    assert out.dtype == torch.bfloat16
    assert_close_rel(out, out_ref, 1e-2, "combine")
    dout = rand(T, H, seed=4, dtype=torch.bfloat16)
    with poisoned():
        gy, gw = torch.autograd.grad(out, (y, w), dout)
    ry, rw = torch.autograd.grad(out_ref, (yr, wr), dout.float())
    assert gy.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert_close_rel(gy, ry, 1e-2, "dy")
    assert_close(gw, rw, rtol=1e-4, atol=1e-4, what="dweights")


# ---------------------------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------------------------
@st.composite
def router_cases(draw):
    mode = draw(st.sampled_from(["softmax", "topk_softmax", "sigmoid"]))
    E = draw(st.integers(1, 24))
    k = draw(st.integers(1, min(8, E)))
    kw = dict(mode=mode, top_k=k, renormalize=draw(st.booleans()),
              routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
    if mode == "sigmoid":
        divisors = [d for d in range(1, E + 1) if E % d == 0 and d <= 8]
        n_group = draw(st.sampled_from(divisors))
        gsize = E // n_group
        min_groups = -(-k // gsize)
        kw.update(n_group=n_group, topk_group=draw(st.integers(min_groups, n_group)),
                  bias=draw(st.booleans()))
    return E, kw


@CHEAP
@given(case=router_cases(), T=st.integers(0, 60), ties=st.booleans(), seed=st.integers(0, 2**16))
@example(case=(12, dict(mode="sigmoid", top_k=8, renormalize=True, routed_scaling_factor=2.5, n_group=4,
                        topk_group=3, bias=True)), T=33, ties=True, seed=0)
@example(case=(7, dict(mode="softmax", top_k=7, renormalize=True, routed_scaling_factor=1.0)), T=5, ties=True, seed=1)
@example(case=(5, dict(mode="topk_softmax", top_k=2, renormalize=False, routed_scaling_factor=1.0)), T=0,
         ties=False, seed=2)
def test_route(case, T, ties, seed):
    E, kw = case
    kw = dict(kw)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, E, generator=g) * 2
    if ties:  # few distinct values: many exact ties, broken by the lowest expert index
        z = z.round()
    if kw.pop("bias", False):
        b = torch.randn(E, generator=g) * 0.5
        kw["correction_bias"] = (b.round() if ties else b).to(DEVICE)
    z = leaf(z.to(DEVICE))
    with poisoned():
        w, ids = tk.route(z, **kw)
    w_ref, ids_ref = select_experts_ref(z, **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == (T, kw["top_k"])
    assert torch.equal(ids, ids_ref)
    assert_close(w, w_ref, rtol=1e-5, atol=1e-6, what="weights")
    dw = torch.randn(T, kw["top_k"], generator=g).to(DEVICE)
    with poisoned():
        (gz,) = torch.autograd.grad(w, z, dw)
    (rz,) = torch.autograd.grad(w_ref, z, dw)
    assert_close(gz, rz, rtol=1e-4, atol=1e-5, what="dlogits")


def test_route_bf16_logits():
    z = leaf(rand(20, 10, seed=3, dtype=torch.bfloat16))
    with poisoned():
        w, ids = tk.route(z, 3, "softmax", renormalize=True)
    w_ref, ids_ref = select_experts_ref(z, 3, "softmax", renormalize=True)
    assert torch.equal(ids, ids_ref)
    assert_close(w, w_ref, rtol=1e-5, atol=1e-6, what="weights")
    dw = rand(20, 3, seed=4)
    (gz,) = torch.autograd.grad(w, z, dw)
    assert gz.dtype == torch.bfloat16
    assert_close(gz, torch.autograd.grad(w_ref, z, dw)[0], rtol=2e-2, atol=1e-3, what="dlogits")


def test_route_rejects_bad_arguments():
    z = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError):
        tk.route(z, 7)
    with pytest.raises(ValueError):
        tk.route(z, 2, "sigmoid", n_group=4)
    with pytest.raises(ValueError):
        tk.route(z, 5, "sigmoid", n_group=3, topk_group=2)
    with pytest.raises(ValueError):
        tk.route(z, 2, "nope")


# ---------------------------------------------------------------------------------------------
# the layer, end to end
# ---------------------------------------------------------------------------------------------
def _layer(x, logits, gate_up, down, E, k, impl):
    if impl == "triton":
        w, ids = tk.route(logits, k, "softmax", renormalize=True)
        slots, _, offsets = tk.sort_by_expert(ids, E)
        xs = tk.permute(x, slots, k)
        ys = tk.expert_mlp(xs, gate_up, down, offsets, "swiglu")
        return tk.combine(ys, w, slots)
    w, ids = select_experts_ref(logits, k, "softmax", renormalize=True)
    slots, _, offsets = ref.sort_by_expert_ref(ids, E)
    ys = ref.expert_mlp_ref(ref.permute_ref(x, slots, k), gate_up, down, offsets, "swiglu")
    return ref.combine_ref(ys, w, slots)


def test_moe_layer_end_to_end():
    T, H, I, E, k = 24, 20, 12, 5, 2
    x, logits = leaf(rand(T, H, seed=1)), leaf(rand(T, E, seed=2))
    gate_up, down = leaf(rand(E, 2 * I, H, seed=3, scale=0.3)), leaf(rand(E, H, I, seed=4, scale=0.3))
    out = _layer(x, logits, gate_up, down, E, k, "triton")
    out_ref = _layer(x, logits, gate_up, down, E, k, "ref")
    assert_close(out, out_ref, what="out")
    dout = rand(T, H, seed=5)
    grads = torch.autograd.grad(out, (x, logits, gate_up, down), dout)
    grads_ref = torch.autograd.grad(out_ref, (x, logits, gate_up, down), dout)
    for name, g, gr in zip(("dx", "dlogits", "dgate_up", "ddown"), grads, grads_ref):
        assert_close(g, gr, what=name)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 at larger shapes against an fp32 reference, determinism
# ---------------------------------------------------------------------------------------------
@gpu
@needs_compiled_cuda
@pytest.mark.parametrize("act,transposed", [("swiglu", False), ("gpt_oss", True), ("relu2", False)])
def test_gpu_expert_mlp_bf16_vs_fp32(act, transposed):
    E, H, I, S = 12, 512, 384, 3000
    counts = make_counts(E, S, 0, "random")
    offsets = offsets_of(counts)
    bf = _mlp_inputs(E, S, H, I, transposed, transposed, 0, torch.bfloat16,
                     act=act if act in ref.NON_GATED else "swiglu")  # (swiglu: the weight scale)
    fp = [leaf(t.float()) if t is not None else None for t in bf]
    bf = [leaf(t) if t is not None else None for t in bf]
    kw = dict(activation=act, transposed=transposed)
    y = tk.expert_mlp(bf[0], bf[1], bf[2], offsets, gate_up_bias=bf[3], down_bias=bf[4], **kw)
    y_ref = ref.expert_mlp_ref(fp[0], fp[1], fp[2], offsets, gate_up_bias=fp[3], down_bias=fp[4], **kw)
    assert_close_rel(y, y_ref, 2e-2, "y")
    dy = rand(S, H, seed=9, dtype=torch.bfloat16)
    grads = torch.autograd.grad(y, [t for t in bf if t is not None], dy)
    grads_ref = torch.autograd.grad(y_ref, [t for t in fp if t is not None], dy.float())
    for name, g, gr in zip(("dx", "dgate_up", "ddown", "dbias_gu", "dbias_down"), grads, grads_ref):
        assert_close_rel(g, gr, 3e-2, name)
    grads2 = torch.autograd.grad(
        tk.expert_mlp(bf[0], bf[1], bf[2], offsets, gate_up_bias=bf[3], down_bias=bf[4], **kw),
        [t for t in bf if t is not None], dy)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2), "backward is not bitwise deterministic"


@gpu
@needs_compiled_cuda
def test_gpu_grouped_mm_vs_torch_grouped_mm():
    E, K, N, S = 16, 1024, 768, 4096
    counts = make_counts(E, S, 1, "random")
    offsets = offsets_of(counts)
    x = rand(S, K, seed=1, dtype=torch.bfloat16)
    w = rand(E, N, K, seed=2, dtype=torch.bfloat16, scale=K ** -0.5).transpose(1, 2)
    y = tk.grouped_mm(x, w, offsets)
    y_t = torch.nn.functional.grouped_mm(x, w, offs=offsets)
    assert_close_rel(y, y_t, 1e-2, "vs torch grouped_mm")


@gpu
@needs_compiled_cuda
def test_gpu_router_and_permute_large():
    T, E, k = 8192, 256, 8
    z = leaf(rand(T, E, seed=1))
    kw = dict(mode="sigmoid", renormalize=True, correction_bias=rand(E, seed=2, scale=0.1), n_group=8,
              topk_group=4, routed_scaling_factor=2.5)
    w, ids = tk.route(z, k, **kw)
    w_ref, ids_ref = select_experts_ref(z, k, **kw)
    assert torch.equal(ids, ids_ref)
    assert_close(w, w_ref, rtol=1e-5, atol=1e-6, what="weights")
    slots, counts, offsets = tk.sort_by_expert(ids, E)
    r_slots, r_counts, r_offsets = ref.sort_by_expert_ref(ids, E)
    assert torch.equal(slots, r_slots) and torch.equal(counts, r_counts) and torch.equal(offsets, r_offsets)


def test_recorded_autotune_choices_pin_back_into_the_autotuners(monkeypatch, tmp_path):
    """A block.json's ``autotune`` (strings, as recorded) goes back into the caches as equal Configs,
    keyed by the same tuples; a kernel name this package lacks is refused."""
    import json

    import triton
    from triton_kernels import grouped_gemm
    from triton_kernels.autotune_choices import autotune_choices, config_from_string, pin_autotune_choices

    config = triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_S": 32}, num_warps=4, num_stages=4)
    key = "(768, 2048, 32768, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.int32')"
    monkeypatch.setattr(grouped_gemm._grouped_mm_dw_kernel, "cache", {})
    path = tmp_path / "block.json"
    path.write_text(json.dumps({"rows": [], "autotune": {"grouped_gemm._grouped_mm_dw_kernel": {key: str(config)}}}))
    assert pin_autotune_choices(path) == 1
    pinned = grouped_gemm._grouped_mm_dw_kernel.cache
    assert list(pinned) == [(768, 2048, 32768, "torch.bfloat16", "torch.bfloat16", "torch.bfloat16",
                             "torch.bfloat16", "torch.int32")]
    assert pinned[next(iter(pinned))].all_kwargs() == config.all_kwargs()
    assert autotune_choices()["grouped_gemm._grouped_mm_dw_kernel"] == {key: str(config)}  # round trip
    assert config_from_string("BLOCK_M: 64, num_warps: 4, num_ctas: 1, num_stages: 2, maxnreg: None").num_stages == 2
    with pytest.raises(ValueError, match="not an autotuned kernel"):
        pin_autotune_choices({"grouped_gemm._no_such_kernel": {key: str(config)}})
    # choices recorded by older forms of a kernel are skipped, with a warning: a key without the
    # down-backward kernel's USE_TMA and PAIRS values, a config without its EPI_SPLIT
    down_bwd = "expert_mlp._down_bwd_act_kernel"
    old_key = "(768, 2048, 32768, 'torch.bfloat16', 'torch.int32')"
    new_key = "(768, 2048, 32768, False, False, 'torch.bfloat16', 'torch.int32')"
    tiles = "BLOCK_M: 64, BLOCK_N: 64, BLOCK_K: 64, num_warps: 4, num_ctas: 1, num_stages: 4, maxnreg: None"
    with pytest.warns(UserWarning, match="autotune key 5"):
        assert pin_autotune_choices({down_bwd: {old_key: tiles + ", EPI_SPLIT: 1"}}) == 0
    with pytest.warns(UserWarning, match="EPI_SPLIT"):
        assert pin_autotune_choices({down_bwd: {new_key: tiles}}) == 0


def test_autotune_choices_reports_the_chosen_config(monkeypatch):
    import triton
    from triton_kernels import grouped_gemm
    from triton_kernels.autotune_choices import autotune_choices

    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4)
    monkeypatch.setattr(grouped_gemm._grouped_mm_kernel, "cache", {(1536, 2048, 32768): config})
    chosen = autotune_choices()["grouped_gemm._grouped_mm_kernel"]
    assert chosen == {"(1536, 2048, 32768)": str(config)}
    assert "BLOCK_N: 256" in chosen["(1536, 2048, 32768)"]


def test_tma_kernels_recorded_under_their_old_module_still_pin(monkeypatch):
    """The TMA kernels moved to grouped_gemm_tma; records naming grouped_gemm's pin them all the same."""
    import triton
    from triton_kernels import grouped_gemm_tma
    from triton_kernels.autotune_choices import pin_autotune_choices

    monkeypatch.setattr(grouped_gemm_tma._grouped_mm_tma_kernel, "cache", {})
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)
    key = "(1536, 2048, 32768, True, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.int32')"
    assert pin_autotune_choices({"grouped_gemm._grouped_mm_tma_kernel": {key: str(config)}}) == 1
    assert len(grouped_gemm_tma._grouped_mm_tma_kernel.cache) == 1
