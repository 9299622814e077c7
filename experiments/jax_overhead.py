"""The cost of JAX interop (issue 26): a JAX router inside the torch step, and moe_lab's torch layer
called from JAX, each against its native version, forward + backward, one process, one run.

    python -m experiments.jax_overhead --out results/jax-interop/h100x1.json            # GPU (needs a CUDA JAX)
    python -m experiments.jax_overhead --device cpu --tokens 64 --hidden 32 ... --out /tmp/x.json   # smoke

Rows ("what", "system", ms median, all samples):
- router: "torch" (moe_lab's reference router, the family's routing: softmax top-k renormalised),
  "jax:family" (the same routing written in JAX, through moe_lab.jax.router: DLPack, jitted jax.vjp),
  "jax:expert_choice", "jax:sparsemax_topk" (the two JAX routers; their own routing, for scale).
  Each: router logits -> weights/ids forward and the backward of a random scalar of the weights to
  hidden and the router weight.
- layer: "torch:<backend>" (run_routed_experts on torch tensors, autograd backward), "jax:<backend>/buffer"
  and "jax:<backend>/host" (moe_lab.jax.layer.moe_layer under jax.jit(jax.value_and_grad)), and
  "jax-reference" (moe_lab.jax.reference.moe_layer, pure JAX, jitted) for scale.
Timing: `--repeats` windows of `--inner` iterations after `--warmup`; each window starts and ends
with the device idle (torch.cuda.synchronize and jax.block_until_ready), so a row's figure
includes the host work each path adds; on CUDA the windows are bracketed by CUDA events (recorded
after the synchronisation, on torch's stream), on the CPU by perf_counter. ms = window / inner.
Writes JSON (atomically, again after every row) with the geometry, every sample and the provenance
(experiments.provenance); a row that fails is kept with its error and the others still run (exit 1).
The "/host" rows run fewer windows (3 x 1 after one warm-up): each call copies every tensor through
host memory.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

from . import provenance, store

log = logging.getLogger(__name__)


def _timer(device: str):
    import torch

    def sync():  # the JAX steps wait for their own results (jax.block_until_ready)
        if device == "cuda":
            torch.cuda.synchronize()

    def measure(step, warmup: int, repeats: int, inner: int) -> list[float]:
        for _ in range(warmup):
            step()
        sync()
        samples = []
        for _ in range(repeats):
            sync()
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    step()
                sync()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    step()
                samples.append((time.perf_counter() - t0) * 1e3 / inner)
        return samples
    return measure


class Recorder:
    """Measures one row at a time and rewrites the record (atomically) after each, so a row that
    fails, or a run cut short, keeps every row before it; a failed row says why and the run goes on."""

    def __init__(self, out: str, header: dict, measure, args):
        self.out, self.header, self.measure, self.args = out, header, measure, args
        self.rows: list[dict] = []

    def row(self, what: str, system: str, step, *, repeats: int | None = None, inner: int | None = None) -> None:
        a = self.args
        try:
            samples = self.measure(step, a.warmup if repeats is None else 1, repeats or a.repeats, inner or a.inner)
            row = {"what": what, "system": system, "status": "ok", "ms": statistics.median(samples), "samples_ms": samples}
            log.info("%-6s %-24s %.3f ms", what, system, row["ms"])
        except Exception as exc:  # noqa: BLE001 - recorded in the row, the next rows still run
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:500]
            row = {"what": what, "system": system, "status": "failed", "ms": None, "error": f"{type(exc).__name__}: {reason}"}
            log.warning("%-6s %-24s failed: %s", what, system, row["error"])
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        times = {(r["what"], r["system"]): r["ms"] for r in self.rows if r["ms"] is not None}
        first = f"torch:{self.args.backends.split(',')[0]}"
        for r in self.rows:  # against the native version: the torch router; the torch layer of the same backend
            if r["what"] == "router":
                native = times.get(("router", "torch"))
            elif r["system"].startswith("jax:"):
                native = times.get(("layer", "torch:" + r["system"][4:].split("/")[0]))
            else:
                native = times.get(("layer", first))
            r["vs_native"] = r["ms"] / native if native and r["ms"] is not None else None
        store.write_json(self.out, {**self.header, "rows": self.rows})


def router_rows(args, device: str, dtype, rec: Recorder) -> None:
    import jax
    import torch

    import moe_lab
    import moe_lab.jax
    from moe_lab.jax import reference as jr
    from moe_lab.stages.router import route_reference

    routing = moe_lab.RoutingSpec(args.experts, args.top_k, renormalize=True)

    def family(params, hidden):
        logits = jr.router_logits(hidden, params["weight"], None, routing)
        weights, ids = jr.select_experts(logits, routing)
        return weights, ids, logits

    g = torch.Generator(device=device).manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(args.experts, args.hidden, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    systems = {"torch": route_reference,
               "jax:family": moe_lab.jax.router(family, name="jax:family").fn,
               "jax:expert_choice": moe_lab.jax.router(moe_lab.jax.expert_choice(args.top_k)).fn,
               "jax:sparsemax_topk": moe_lab.jax.router(moe_lab.jax.sparsemax_topk(args.top_k)).fn}
    for name, fn in systems.items():
        def step(fn=fn):
            r = fn(hidden, weight, None, None, routing)
            ct = torch.ones_like(r.weights)
            torch.autograd.grad([r.weights], [hidden, weight], [ct])
        rec.row("router", name, step)
    del jax


def layer_rows(args, device: str, dtype, rec: Recorder) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    import moe_lab
    from moe_lab.jax import reference as jr
    from moe_lab.jax.dlpack import torch_to_jax
    from moe_lab.jax.layer import moe_layer
    from moe_lab.layer import run_routed_experts
    from moe_lab.registry import resolve_backend
    from moe_lab.stages.dispatch import LocalDispatcher

    routing = moe_lab.RoutingSpec(args.experts, args.top_k, renormalize=True)
    spec = moe_lab.ExpertsSpec(args.experts)
    g = torch.Generator(device=device).manual_seed(args.seed)
    T, H, I, E = args.tokens, args.hidden, args.intermediate, args.experts
    t = {"hidden": torch.randn(T, H, device=device, generator=g).to(dtype),
         "weight": (torch.randn(E, H, device=device, generator=g) * 0.02).to(dtype),
         "gate_up_proj": (torch.randn(E, 2 * I, H, device=device, generator=g) * 0.02).to(dtype),
         "down_proj": (torch.randn(E, H, I, device=device, generator=g) * 0.02).to(dtype)}
    leaves = {n: v.clone().requires_grad_() for n, v in t.items()}
    for backend in args.backends.split(","):
        choice = resolve_backend(backend)
        experts = torch.nn.Module()
        experts.__dict__.update(gate_up_proj=leaves["gate_up_proj"], down_proj=leaves["down_proj"], act_fn=torch.nn.SiLU())

        def torch_step():
            r = choice.router(leaves["hidden"], leaves["weight"], None, None, routing)
            out = run_routed_experts(leaves["hidden"], r.ids, r.weights, experts, spec, choice, LocalDispatcher())
            torch.autograd.grad([out], list(leaves.values()), [torch.ones_like(out)])
        rec.row("layer", f"torch:{backend}", torch_step)
        j = {n: torch_to_jax(v) for n, v in t.items()}
        router, params = {"weight": j["weight"]}, {"gate_up_proj": j["gate_up_proj"], "down_proj": j["down_proj"]}
        for transport in ("buffer", "host"):
            f = jax.jit(jax.value_and_grad(lambda h, rt, p: moe_layer(h, rt, p, routing, spec, backend=backend,
                                                                      transport=transport)[0].astype(jnp.float32).sum(),
                                           argnums=(0, 1, 2)))
            # the host round trip copies every input and output twice per call: fewer, shorter windows
            few = {"repeats": 3, "inner": 1} if transport == "host" else {}
            rec.row("layer", f"jax:{backend}/{transport}", lambda f=f: jax.block_until_ready(f(j["hidden"], router, params)), **few)
    f = jax.jit(jax.value_and_grad(lambda h, rt, p: jr.moe_layer(h, rt, p, routing, spec)[0].astype(jnp.float32).sum(),
                                   argnums=(0, 1, 2)))
    j = {n: torch_to_jax(v) for n, v in t.items()}
    rec.row("layer", "jax-reference", lambda: jax.block_until_ready(f(j["hidden"], {"weight": j["weight"]},
                                                                   {"gate_up_proj": j["gate_up_proj"], "down_proj": j["down_proj"]})))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu unless given")
    # Qwen3-30B-A3B's MoE geometry, one layer
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--backends", default=None, help="layer backends (default: torch,triton on cuda; torch on cpu)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: router, layer")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=provenance.log_level("INFO"), format="%(message)s")
    # torch and XLA share the GPU: XLA would otherwise take 75% of its memory when it starts
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU visible to torch")
        try:
            jax.devices("gpu")
        except RuntimeError as exc:
            parser.error(f"--device cuda needs a CUDA JAX (pip install 'jax[cuda12]'): {exc}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    args.backends = args.backends or ("torch,triton" if args.device == "cuda" else "torch")
    header = {"kind": "jax_overhead", "device": args.device, "dtype": str(dtype).replace("torch.", ""),
              "geometry": {"tokens": args.tokens, "hidden": args.hidden, "intermediate": args.intermediate,
                           "experts": args.experts, "top_k": args.top_k},
              "timing": {"warmup": args.warmup, "repeats": args.repeats, "inner": args.inner,
                         "host_rows": "repeats 3, inner 1, warm-up 1",
                         "clock": "cuda events around synchronised windows" if args.device == "cuda" else "perf_counter"},
              "jax": {"version": jax.__version__, "backend": jax.default_backend()},
              "provenance": provenance.collect(sys.argv if argv is None else argv)}
    rec = Recorder(args.out, header, _timer(args.device), args)
    skip = set(filter(None, args.skip.split(",")))
    if "router" not in skip:
        router_rows(args, args.device, dtype, rec)
    if "layer" not in skip:
        layer_rows(args, args.device, dtype, rec)
    rec.write()
    for r in rec.rows:
        ms = f"{r['ms']:9.3f} ms  x{r['vs_native'] or float('nan'):.2f} native" if r["ms"] is not None else r["error"]
        print(f"{r['what']:6} {r['system']:24} {ms}")
    return 0 if all(r["status"] == "ok" for r in rec.rows) else 1

if __name__ == "__main__":
    sys.exit(main())
