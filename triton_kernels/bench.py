"""Benchmark the Triton kernels against PyTorch equivalents at the Qwen3-30B-A3B layer geometry.

    python -m triton_kernels.bench --out DIR            # on a CUDA GPU (H200 intended)
    python -m triton_kernels.bench --out DIR --tiny     # smoke check: tiny shapes, interpreter, CPU

Times each kernel with ``triton.testing.do_bench`` (median, ms) — forward, and forward+backward
where the op is differentiable — next to a PyTorch baseline of the same op
(``torch.nn.functional.grouped_mm``, ``torch.topk``, ``torch.argsort``, indexing), prints a table
with TFLOP/s (GEMMs) or GB/s (memory-bound ops, counting the minimal bytes read + written once),
and writes ``DIR/triton_kernels_bench.json`` (rows plus a manifest: command, commit, versions,
GPU). Routing is real (top-k of random logits), not forced-balanced. Geometry: H=2048, E=128,
k=8, I=768; T=4096 tokens for the GEMMs (S=32768 rows); T=4096 and 65536 for router/permute.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for triton_kernels_bench.json")
    p.add_argument("--tiny", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 (no GPU needed)")
    p.add_argument("--only", default="", help="comma list of groups: router,permute,gemm,mlp,dw,down_bwd (default all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="fp32 GEMM inputs may use TF32 (settings.tf32)")
    p.add_argument("--tma", action="store_true", help="the experimental TMA GEMM tiles (settings.tma)")
    p.add_argument("--pin", default=None, help="a JSON of recorded autotune choices to re-use (no tuning of those keys)")
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.tiny and os.environ.get("TRITON_INTERPRET") != "1":
    # The interpreter must be chosen before any kernel is defined, and `python -m` has already
    # imported the package: start again with it set.
    os.execve(sys.executable, [sys.executable, "-m", "triton_kernels.bench", *sys.argv[1:]],
              {**os.environ, "TRITON_INTERPRET": "1"})

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from triton_kernels import combine, expert_mlp, grouped_mm, permute, route, sort_by_expert  # noqa: E402
from triton_kernels import reference as ref  # noqa: E402
from triton_kernels import settings as kernel_settings  # noqa: E402
from triton_kernels._common import interpreting  # noqa: E402
from triton_kernels.autotune_choices import pin_autotune_choices  # noqa: E402
from triton_kernels.autotune_choices import autotune_choices, autotune_lines  # noqa: E402

FULL = dict(H=2048, E=128, k=8, I=768, T_gemm=4096, T_route=(4096, 65536))
TINY = dict(H=64, E=6, k=2, I=48, T_gemm=40, T_route=(40,))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def timings(fn) -> list[float]:
    """Milliseconds of fn(), every repetition: do_bench's on CUDA (warm-up 25 ms, 200 ms of
    repetitions), three wall-clock runs under the interpreter. Tables report the median."""
    if torch.cuda.is_available() and not interpreting():
        times = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="all")
        return [float(t) for t in (times if isinstance(times, (list, tuple)) else [times])]
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _grad_fn(fwd, inputs, seed=0):
    """A closure running forward + backward (a fixed, contiguous upstream gradient)."""
    out = fwd()
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device=outs[0].device).manual_seed(seed)
    dout = torch.randn(outs[0].shape, generator=g, device=outs[0].device, dtype=torch.float32).to(outs[0].dtype)

    def run():
        o = fwd()
        o = o[0] if isinstance(o, tuple) else o
        return torch.autograd.grad(o, inputs, dout)
    return run


class Table:
    def __init__(self):
        self.rows = []

    def add(self, group, op, shape, impl, samples, flops=None, nbytes=None, note=""):
        """One row: ``samples`` (ms, from ``timings``) kept beside their median."""
        ms = statistics.median(samples)
        row = dict(group=group, op=op, shape=shape, impl=impl, ms=ms,
                   tflops=(flops / ms / 1e9) if flops else None,
                   gbps=(nbytes / ms / 1e6) if nbytes else None, note=note,
                   ms_samples=[round(t, 5) for t in samples])
        self.rows.append(row)
        rate = f"{row['tflops']:8.1f} TFLOP/s" if flops else (f"{row['gbps']:8.1f} GB/s" if nbytes else "")
        print(f"{group:8s} {op:28s} {shape:34s} {impl:16s} {ms:10.4f} ms  {rate}", flush=True)

    def ratio(self, group, op, shape, fast="triton", base="torch"):
        t = {r["impl"]: r["ms"] for r in self.rows if (r["group"], r["op"], r["shape"]) == (group, op, shape)}
        if fast in t and base in t:
            print(f"{'':8s} {op:28s} {shape:34s} {'speedup':16s} {t[base] / t[fast]:10.2f} x", flush=True)


# ---------------------------------------------------------------------------------------------
# the router's PyTorch baseline
# ---------------------------------------------------------------------------------------------
def torch_topk_route(logits, k, mode="softmax", renormalize=False, correction_bias=None, n_group=1,
                     topk_group=1, routed_scaling_factor=1.0):
    """The router's timing baseline in plain PyTorch, with ``route``'s arguments ("softmax" and
    "sigmoid" modes): float32 scores, then ``torch.topk`` (ties as torch.topk leaves them). Not the
    router's reference: that is moe_lab's ``select_experts``, which this package does not import.
    -> (weights fp32 [T, k], ids int64 [T, k])."""
    z = logits.float()
    if mode == "softmax":
        w, ids = torch.softmax(z, dim=-1).topk(k, dim=-1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    elif mode == "sigmoid":
        s = torch.sigmoid(z)
        choice = s if correction_bias is None else s + correction_bias.float()
        if n_group > 1:
            T, E = z.shape
            gsize = E // n_group
            gscore = choice.view(T, n_group, gsize).topk(min(2, gsize), dim=-1).values.sum(-1)
            keep = torch.zeros(T, n_group, dtype=torch.bool, device=z.device)
            keep.scatter_(1, gscore.topk(topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(gsize, dim=1), float("-inf"))
        ids = choice.detach().topk(k, dim=-1).indices
        w = s.gather(1, ids)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"the baseline has no router mode {mode!r}")
    return w * routed_scaling_factor, ids


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def routing(T, E, k, device, seed):
    """Real top-k routing of random logits: (ids [T, k], weights [T, k], sorted_slots, offsets)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, device=device, generator=g)
    w, ids = torch_topk_route(logits, k, "softmax", renormalize=True)
    slots, counts, offsets = ref.sort_by_expert_ref(ids, E)
    return ids, w, slots, offsets


def randn(*shape, device, dtype, scale=1.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------
TORCH_ROUTER_NOTE = "baseline: float32 scores + torch.topk (torch_topk_route)"


def bench_router(tab, geo, device, dtype, seed):
    E, k = geo["E"], geo["k"]
    for T in geo["T_route"]:
        logits = randn(T, E, device=device, dtype=dtype, seed=seed).requires_grad_()
        nbytes = T * E * logits.element_size() + T * k * (4 + 8)
        cases = [
            ("softmax_topk_renorm", dict(mode="softmax", renormalize=True)),
            ("sigmoid_group_bias", dict(mode="sigmoid", renormalize=True, n_group=8, topk_group=4,
                                        correction_bias=randn(E, device=device, dtype=torch.float32, scale=0.1),
                                        routed_scaling_factor=2.5)),
        ]
        for name, kw in cases:
            if kw.get("n_group", 1) > 1 and E % kw["n_group"]:
                continue
            shape = f"T={T} E={E} k={k}"
            tab.add("router", name + " fwd", shape, "triton", timings(lambda: route(logits, k, **kw)), nbytes=nbytes)
            tab.add("router", name + " fwd", shape, "torch", timings(lambda: torch_topk_route(logits, k, **kw)),
                    nbytes=nbytes, note=TORCH_ROUTER_NOTE)
            tab.ratio("router", name + " fwd", shape)
            tab.add("router", name + " fwd+bwd", shape, "triton",
                    timings(_grad_fn(lambda: route(logits, k, **kw), (logits,))), nbytes=2 * nbytes)
            tab.add("router", name + " fwd+bwd", shape, "torch",
                    timings(_grad_fn(lambda: torch_topk_route(logits, k, **kw), (logits,))), nbytes=2 * nbytes,
                    note=TORCH_ROUTER_NOTE)
            tab.ratio("router", name + " fwd+bwd", shape)


def bench_permute(tab, geo, device, dtype, seed):
    E, k, H = geo["E"], geo["k"], geo["H"]
    for T in geo["T_route"]:
        ids, w, _, _ = routing(T, E, k, device, seed)
        S = T * k
        shape = f"T={T} E={E} k={k}"
        sort_bytes = S * ids.element_size() + S * 8 * 2 + E * 12
        tab.add("permute", "sort_by_expert", shape, "triton", timings(lambda: sort_by_expert(ids, E)),
                nbytes=sort_bytes)
        tab.add("permute", "sort_by_expert", shape, "torch",
                timings(lambda: ref.sort_by_expert_ref(ids, E)), nbytes=sort_bytes)
        tab.ratio("permute", "sort_by_expert", shape)

        slots, _, _, inv = sort_by_expert(ids, E, return_inverse=True)
        x = randn(T, H, device=device, dtype=dtype, seed=seed).requires_grad_()
        es = x.element_size()
        shape = f"T={T} H={H} k={k}"
        moved = (T * H + S * H) * es + S * 8
        tab.add("permute", "permute fwd", shape, "triton", timings(lambda: permute(x, slots, k, inv)), nbytes=moved)
        tab.add("permute", "permute fwd", shape, "torch", timings(lambda: ref.permute_ref(x, slots, k)),
                nbytes=moved)
        tab.ratio("permute", "permute fwd", shape)
        tab.add("permute", "permute fwd+bwd", shape, "triton",
                timings(_grad_fn(lambda: permute(x, slots, k, inv), (x,))), nbytes=2 * moved)
        tab.add("permute", "permute fwd+bwd", shape, "torch",
                timings(_grad_fn(lambda: ref.permute_ref(x, slots, k), (x,))), nbytes=2 * moved)
        tab.ratio("permute", "permute fwd+bwd", shape)

        y = randn(S, H, device=device, dtype=dtype, seed=seed + 1).requires_grad_()
        wt = w.detach().clone().requires_grad_()
        moved = (S * H + T * H) * es + S * (8 + 4)
        tab.add("permute", "combine fwd", shape, "triton", timings(lambda: combine(y, wt, slots, inv)), nbytes=moved)
        tab.add("permute", "combine fwd", shape, "torch", timings(lambda: ref.combine_ref(y, wt, slots)),
                nbytes=moved)
        tab.ratio("permute", "combine fwd", shape)
        # backward reads dout (T*H) and y (S*H), writes dy (S*H) and dw
        bwd_moved = moved + (2 * S * H + T * H) * es
        tab.add("permute", "combine fwd+bwd", shape, "triton",
                timings(_grad_fn(lambda: combine(y, wt, slots, inv), (y, wt))), nbytes=bwd_moved)
        tab.add("permute", "combine fwd+bwd", shape, "torch",
                timings(_grad_fn(lambda: ref.combine_ref(y, wt, slots), (y, wt))), nbytes=bwd_moved)
        tab.ratio("permute", "combine fwd+bwd", shape)
        del x, y


def _check(fast, base) -> str:
    """Correctness of the (autotuned) kernel at the benchmark shape: max |a - b| / max |b|."""
    with torch.no_grad():
        a, b = fast().float(), base().float()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    print(f"{'':8s} check vs torch: max rel err {err:.2e}", flush=True)
    return f"max rel err vs torch {err:.2e}"


def _torch_grouped_mm(x, w, offsets):
    if x.device.type == "cuda" or hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, w, offs=offsets)
    return ref.grouped_mm_ref(x, w, offsets)


def bench_gemm(tab, geo, device, dtype, seed):
    E, k, H, I, T = geo["E"], geo["k"], geo["H"], geo["I"], geo["T_gemm"]
    _, _, _, offsets = routing(T, E, k, device, seed)
    S = T * k
    x = randn(S, H, device=device, dtype=dtype, seed=seed).requires_grad_()
    a = randn(S, I, device=device, dtype=dtype, seed=seed + 1).requires_grad_()
    gate_up = randn(E, 2 * I, H, device=device, dtype=dtype, scale=H ** -0.5, seed=seed + 2).requires_grad_()
    down = randn(E, H, I, device=device, dtype=dtype, scale=I ** -0.5, seed=seed + 3).requires_grad_()
    for name, inp, wparam, K, N in [("gate_up", x, gate_up, H, 2 * I), ("down", a, down, I, H)]:
        shape = f"S={S} E={E} K={K} N={N}"
        flops = 2 * S * K * N
        tr = lambda inp=inp, wparam=wparam: grouped_mm(inp, wparam.transpose(1, 2), offsets)
        th = lambda inp=inp, wparam=wparam: _torch_grouped_mm(inp, wparam.transpose(1, 2), offsets)
        tab.add("gemm", f"grouped_mm {name} fwd", shape, "triton", timings(tr), flops=flops,
                note=_check(tr, th))
        tab.add("gemm", f"grouped_mm {name} fwd", shape, "torch", timings(th), flops=flops)
        tab.ratio("gemm", f"grouped_mm {name} fwd", shape)
        tab.add("gemm", f"grouped_mm {name} fwd+bwd", shape, "triton", timings(_grad_fn(tr, (inp, wparam))),
                flops=3 * flops)
        tab.add("gemm", f"grouped_mm {name} fwd+bwd", shape, "torch", timings(_grad_fn(th, (inp, wparam))),
                flops=3 * flops)
        tab.ratio("gemm", f"grouped_mm {name} fwd+bwd", shape)


def _torch_mlp(x, gate_up, down, offsets):
    """The unfused Transformers-v5-style computation: grouped_mm, SwiGLU, grouped_mm."""
    h = _torch_grouped_mm(x, gate_up.transpose(1, 2), offsets)
    gate, up = h.chunk(2, dim=-1)
    return _torch_grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offsets)


def bench_mlp(tab, geo, device, dtype, seed):
    E, k, H, I, T = geo["E"], geo["k"], geo["H"], geo["I"], geo["T_gemm"]
    _, _, _, offsets = routing(T, E, k, device, seed)
    S = T * k
    x = randn(S, H, device=device, dtype=dtype, seed=seed).requires_grad_()
    gate_up = randn(E, 2 * I, H, device=device, dtype=dtype, scale=H ** -0.5, seed=seed + 2).requires_grad_()
    down = randn(E, H, I, device=device, dtype=dtype, scale=I ** -0.5, seed=seed + 3).requires_grad_()
    shape = f"S={S} E={E} H={H} I={I}"
    flops = 6 * S * H * I
    tr = lambda: expert_mlp(x, gate_up, down, offsets, "swiglu")
    th = lambda: _torch_mlp(x, gate_up, down, offsets)
    tab.add("mlp", "expert_mlp swiglu fwd", shape, "triton", timings(tr), flops=flops, note=_check(tr, th))
    tab.add("mlp", "expert_mlp swiglu fwd", shape, "torch", timings(th), flops=flops)
    tab.ratio("mlp", "expert_mlp swiglu fwd", shape)
    params = (x, gate_up, down)
    tab.add("mlp", "expert_mlp swiglu fwd+bwd", shape, "triton", timings(_grad_fn(tr, params)), flops=3 * flops)
    tab.add("mlp", "expert_mlp swiglu fwd+bwd", shape, "torch", timings(_grad_fn(th, params)), flops=3 * flops)
    tab.ratio("mlp", "expert_mlp swiglu fwd+bwd", shape)


def config_sweep(tab, group, op, shape, tuner, fn, flops, check=None):
    """One row per autotune candidate of ``tuner``: ``fn`` timed with that config alone (impl
    ``"config <config>"``, note: ``check()``'s verdict on that config's output); a candidate that
    fails to compile or launch gets a row with no time."""
    candidates = list(tuner.configs)
    try:
        for cfg in candidates:
            tuner.configs = [cfg]  # a single candidate is used as is, without timing the others
            label = f"config {cfg}"
            try:
                note = check() if check else ""
                tab.add(group, op, shape, label, timings(fn), flops=flops, note=note)
            except Exception as e:  # noqa: BLE001 - a candidate that does not build is a result too
                print(f"{group:8s} {op:28s} {shape:34s} {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                tab.rows.append(dict(group=group, op=op, shape=shape, impl=label, ms=None, tflops=None, gbps=None,
                                     note=f"failed: {type(e).__name__}: {str(e)[:300]}", ms_samples=[]))
    finally:
        tuner.configs = candidates


def _torch_weight_grad(x, dy, offsets):
    """dw [E, K, N] = per-expert x^T dy by torch's grouped GEMM (2-D x 2-D, groups along the rows)."""
    if x.device.type == "cuda":
        return F.grouped_mm(x.t(), dy, offs=offsets)
    ends = offsets.tolist()
    return torch.stack([x[a:b].T @ dy[a:b] for a, b in zip([0] + ends[:-1], ends)])


def bench_dw(tab, geo, device, dtype, seed):
    """The weight-gradient GEMMs alone (``dw[e] = x_e^T dy_e``, K = rows of expert e): torch's grouped
    GEMM and each kernel of ``DW_IMPLS`` autotuned, then every candidate config of each kernel."""
    from triton_kernels import grouped_gemm as gg, grouped_gemm_tma

    E, k, H, I, T = geo["E"], geo["k"], geo["H"], geo["I"], geo["T_gemm"]
    _, _, _, offsets = routing(T, E, k, device, seed)
    S = T * k
    gate_up = randn(E, 2 * I, H, device=device, dtype=dtype, seed=seed + 2)
    down = randn(E, H, I, device=device, dtype=dtype, seed=seed + 3)
    # (name, rows x [S, K], upstream dy [S, N], like: the weight view [E, K, N] the gradient copies)
    cases = [("gate_up", randn(S, H, device=device, dtype=dtype, seed=seed), randn(S, 2 * I, device=device,
              dtype=dtype, seed=seed + 1), gate_up.transpose(1, 2)),
             ("down", randn(S, I, device=device, dtype=dtype, seed=seed + 4), randn(S, H, device=device,
              dtype=dtype, seed=seed + 5), down.transpose(1, 2))]
    kernels = {"pointer": gg._grouped_mm_dw_kernel, "tma": grouped_gemm_tma._grouped_mm_dw_tma_kernel}
    for name, x, dy, like in cases:
        K, N = x.shape[1], dy.shape[1]
        shape = f"S={S} E={E} K={K} N={N}"
        flops = 2 * S * K * N
        op = f"weight grad {name}"
        th = lambda x=x, dy=dy: _torch_weight_grad(x, dy, offsets)
        tab.add("dw", op, shape, "torch", timings(th), flops=flops)
        fns = {impl: (lambda x=x, dy=dy, like=like, impl=impl: gg.grouped_mm_weight_grad(x, dy, offsets, like, impl=impl)[0])
               for impl in gg.DW_IMPLS if impl != "torch" and (impl != "tma" or gg.rows_tma_eligible(x, dy))}
        for impl, fn in fns.items():
            tab.add("dw", op, shape, impl, timings(fn), flops=flops, note=_check(fn, th))
            tab.ratio("dw", op, shape, fast=impl)
        if not interpreting():
            for impl, fn in fns.items():
                config_sweep(tab, "dw", f"{op} {impl}", shape, kernels[impl], fn, flops, check=lambda fn=fn, th=th: _check(fn, th))


def bench_down_bwd(tab, geo, device, dtype, seed):
    """The expert MLP's first backward kernel (d_act = dy @ w_down^T with the activation's backward
    in its epilogue): autotuned, then every candidate config (tiles, epilogue split)."""
    import importlib

    em = importlib.import_module("triton_kernels.expert_mlp")
    E, k, H, I, T = geo["E"], geo["k"], geo["H"], geo["I"], geo["T_gemm"]
    _, _, _, offsets = routing(T, E, k, device, seed)
    S = T * k
    dy = randn(S, H, device=device, dtype=dtype, seed=seed)
    h = randn(S, 2 * I, device=device, dtype=dtype, seed=seed + 1)
    down = randn(E, H, I, device=device, dtype=dtype, scale=I ** -0.5, seed=seed + 2)
    shape = f"S={S} E={E} H={H} I={I}"
    flops = 2 * S * H * I
    op = "down backward + swiglu"
    fn = lambda: em._down_bwd_act(dy, down.transpose(1, 2), h, offsets, 0, True, 0.0, 0.0)
    fused = lambda: torch.cat(fn(), dim=1)  # [dh | act]

    def unfused():  # torch's grouped GEMM, then SwiGLU's backward in fp32
        d_act = _torch_grouped_mm(dy, down, offsets).float()
        g, u = h.float().chunk(2, dim=1)
        sg = torch.sigmoid(g)
        dg, du = d_act * u * sg * (1 + g * (1 - sg)), d_act * g * sg
        return torch.cat([dg, du, g * sg * u], dim=1)
    tab.add("down_bwd", op, shape, "triton", timings(fn), flops=flops, note=_check(fused, unfused))
    if not interpreting():
        config_sweep(tab, "down_bwd", op, shape, em._down_bwd_act_kernel, fn, flops,
                     check=lambda: _check(fused, unfused))


GROUPS = {"router": bench_router, "permute": bench_permute, "gemm": bench_gemm, "mlp": bench_mlp,
          "dw": bench_dw, "down_bwd": bench_down_bwd}


def _manifest(args, device):
    from experiments.provenance import git_state  # the harness's provenance (commit as the launcher names it)

    state = git_state()
    return dict(
        command=" ".join([sys.executable, "-m", "triton_kernels.bench"] + sys.argv[1:]),
        commit=state["commit"], dirty=state["dirty"],
        time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if device == "cuda" else None,
        interpreter=interpreting(), tiny=args.tiny, dtype=args.dtype, seed=args.seed,
        tf32="1" if kernel_settings.current().tf32 else "0", tma="1" if kernel_settings.current().tma else "0",
        timer=("triton.testing.do_bench, every repetition in ms_samples, median in ms (warmup 25 ms, rep 200 ms)"
               if device == "cuda" else "wall clock, 3 runs in ms_samples, median in ms"),
    )


def main(args=None):
    args = args or _parse()
    if not args.tiny and (not torch.cuda.is_available() or interpreting()):
        raise SystemExit("triton_kernels.bench: needs a CUDA GPU with compiled Triton (use --tiny for a CPU smoke check)")
    device = "cuda" if (torch.cuda.is_available() and not interpreting()) else "cpu"
    kernel_settings.configure(tf32=args.tf32, tma=args.tma)
    if args.pin:
        pin_autotune_choices(args.pin)
    dtype = getattr(torch, args.dtype)
    geo = TINY if args.tiny else FULL
    groups = [g for g in (args.only.split(",") if args.only else GROUPS) if g]
    tab = Table()
    print(f"{'group':8s} {'op':28s} {'shape':34s} {'impl':16s} {'time':>13s}  rate", flush=True)
    for g in groups:
        GROUPS[g](tab, geo, device, dtype, args.seed)
        if device == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "triton_kernels_bench.json")
    tmp = path + ".tmp"
    chosen = autotune_choices()
    with open(tmp, "w") as f:
        json.dump(dict(manifest=_manifest(args, device), geometry=geo, rows=tab.rows, autotune=chosen), f, indent=1)
    os.replace(tmp, path)
    for line in autotune_lines(chosen):
        print(line, flush=True)
    print(f"wrote {path}", flush=True)
    return tab.rows


if __name__ == "__main__":
    main(ARGS)
