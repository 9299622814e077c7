"""One MoE block, forward + backward, at a model's geometry: v5 experts implementations against
moe_lab backends, under each routing regime. Times with CUDA events (triton.testing.do_bench,
median), and records the block's activation memory (what forward keeps for backward).

    python -m experiments.block_bench --model qwen3-30b-a3b --tokens 4096 --out results/runs/<name>/block.json
    python -m experiments.block_bench ... --profile   # + one profiled forward+backward per row: its kernels

A ``-graphs`` system (``triton-graphs``) replays the block's forward and backward as CUDA graphs
(``torch.cuda.make_graphed_callables``; real routing only): the GPU time of its kernels without the
host's launch gaps. Its row has no activation figure (a replay allocates nothing new).

With ``--profile`` each row also keeps ``profile``: the kernels of one more forward+backward by
device time (``experiments.kernel_profile``), their sum and the profiled wall time, which says how
much of the block the GPU spent waiting for the host.

Peer systems (``experiments/peers.py``: ``v5-liger``, ``nemo-automodel``, ``sonicmoe``) time their own
MoE layer at the same geometry; a row carries the peer's versions (``peer``), and a peer that is not
installed or cannot run the geometry or routing regime is recorded ``unavailable`` with the reason.

FLOPs counted: the three expert GEMMs (gate, up, down) forward (2*T*k*3*H*I) and backward (twice
that) plus the router GEMM (2*T*H*E, times 3); routing, permutation and element-wise work count 0.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys

from . import models, peers, provenance, regimes, store, systems

log = logging.getLogger(__name__)

SYSTEMS = ["v5-grouped_mm", "v5-eager", "torch", "triton", "triton_gather"]


def block_flops(config, tokens: int) -> float:
    """Forward+backward FLOPs of the expert GEMMs and the router GEMM of one MoE block."""
    hidden = config.hidden_size
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or config.n_routed_experts
    k = config.num_experts_per_tok
    expert_gemms = 2 * tokens * k * 3 * hidden * inter
    router = 2 * tokens * hidden * experts
    return 3 * (expert_gemms + router)


def first_moe_block(model):
    """The first sparse MoE block of a v5 or moe_lab model: the parent of its first v5 experts module
    (DeepSeek-V3's first layers are dense, Nemotron-H's first is a Mamba layer)."""
    from moe_lab.families import is_v5_experts_module

    for name, module in model.named_modules():
        if name.endswith("experts") and is_v5_experts_module(module):
            return model.get_submodule(name.rpartition(".")[0])
    raise ValueError(f"{type(model).__name__} has no sparse MoE block")


def layers_to_first_moe_block(model_name: str) -> int:
    """The fewest decoder layers of the geometry that include an MoE block (built on the meta device)."""
    import torch
    import transformers

    from moe_lab.families import is_v5_experts_module

    full = models.load_geometry(model_name)["full_layers"]
    for layers in range(1, full + 1):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(models.build_config(model_name, layers=layers))
        if any(is_v5_experts_module(m) for m in model.modules()):
            return layers
    raise ValueError(f"{model_name}: no MoE block in any of its {full} layers")


def bench_block(model_name: str, system_name: str, routing: str, tokens: int, seed: int = 0,
                profile: bool = False) -> dict:
    import torch
    import triton.testing

    config = models.build_config(model_name, layers=layers_to_first_moe_block(model_name))
    system = systems.parse(system_name)
    if system.peer is not None:
        peers.check_routing(system.peer, routing)
    torch.manual_seed(seed)
    attn = models.attn_implementation(model_name)
    model = systems.build_model(system, config, dtype=torch.bfloat16, attn=attn, device=torch.device("cuda"), world=1)
    hooks = regimes.apply(model, routing, seed=seed)
    block = peers.first_block(system.peer, model) if system.peer is not None else first_moe_block(model)
    moe_layer = block
    x = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    if system.cuda_graphs:
        # the block's forward and its backward each replayed as one CUDA graph: the GPU time of its
        # kernels without the host's launch gaps (the routing regimes' hooks could not be replayed)
        if hooks:
            raise ValueError(f"{system_name}: CUDA graphs replay the block without the routing hooks of {routing!r}; "
                             "use --routing real")
        block = torch.cuda.make_graphed_callables(block, (x,))

    def forward():
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    def step():
        forward().backward(grad)

    step()
    torch.cuda.synchronize()
    samples = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="all", grad_to_none=[x, *block.parameters()])
    samples_fwd = triton.testing.do_bench(lambda: forward(), warmup=20, rep=100, return_mode="all")
    ms, ms_fwd = statistics.median(samples), statistics.median(samples_fwd)

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    # (a graph replay writes into its own pool: nothing new is allocated, so no figure for graphs)
    activation = None if system.cuda_graphs else torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    del out
    for h in hooks:
        h.remove()
    flop = block_flops(config, tokens)
    row = {
        "model": model_name, "system": system_name, "routing": routing, "tokens": tokens,
        "ms": ms, "ms_forward": ms_fwd, "ms_samples": samples, "ms_forward_samples": samples_fwd, "tflops": flop / (ms / 1e3) / 1e12, "flops": flop,
        "activation_gib": activation / 2**30 if activation is not None else None,
    }
    if system.peer is not None:
        row["peer"] = getattr(model, "peer_info", None) or peers.describe(system.peer)
    if hasattr(moe_layer, "plan"):  # a moe_lab layer: what each stage ran (and auto's decision, with its times)
        row["plan"] = moe_layer.plan
    if profile:
        from .kernel_profile import profile_kernels

        for t in (x, *block.parameters()):
            t.grad = None  # as do_bench's grad_to_none: no gradient accumulation in the profiled step
        row["profile"] = profile_kernels(lambda: (step(), torch.cuda.synchronize()), torch.device("cuda"), top=40)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--routing", default="real,balanced,skewed")
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", action="store_true", help="one more forward+backward per row under torch.profiler")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    model_type = models.load_geometry(args.model)["model_type"]
    for routing in args.routing.split(","):
        for system in args.systems.split(","):
            try:
                with peers.scope(model_type):  # a peer's process-wide patches (Liger's) end with its row
                    row = bench_block(args.model, system, routing, args.tokens, profile=args.profile)
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - a failed row is recorded and the others go on
                unavailable = isinstance(exc, peers.PeerUnavailable)
                (log.warning if unavailable else log.exception)("block %s %s %s: %s", system, routing,
                                                                "unavailable" if unavailable else "failed", exc)
                row = {"model": args.model, "system": system, "routing": routing, "tokens": args.tokens,
                       "status": "unavailable" if unavailable else "failed", "error": f"{type(exc).__name__}: {exc}"}
                if peers.is_peer(system):
                    row["peer"] = peers.describe(system)
            rows.append(row)
            if row["status"] == "ok":
                act = f"{row['activation_gib']:.3f} GiB" if row["activation_gib"] is not None else "-"
                print(f"{routing:9s} {system:14s} {row['ms']:8.3f} ms  {row['tflops']:6.1f} TFLOP/s  act {act}", flush=True)
                if "auto" in row.get("plan", {}):
                    print(f"{'':24s} auto: {row['plan']['auto']}", flush=True)
                if "profile" in row:
                    prof = row["profile"]
                    print(f"{'':24s} kernels {prof['kernel_total_ms']:.3f} ms of a {prof['profiled_ms']:.3f} ms profiled run", flush=True)
                    for k in prof["kernels"][:25]:
                        print(f"{'':26s} {k['ms']:7.3f} ms {k['calls']:3d}x  {k['name'][:90]}", flush=True)
            else:
                print(f"{routing:9s} {system:14s} {row['status'].upper()} {row['error'][:160]}", flush=True)
    from triton_kernels.autotune_choices import autotune_choices, autotune_lines

    chosen = autotune_choices()
    for line in autotune_lines(chosen):
        print(line, flush=True)
    record = {"kind": "moe-block", "rows": rows, "autotune": chosen,
              "provenance": provenance.collect(sys.argv if argv is None else argv)}
    store.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
