"""One expert-parallel MoE block, forward + backward, with `all2all` against `all2all_overlap`
(chunks of tokens pipelined: one chunk's all-to-all beside another chunk's experts), in the same
processes, alternating, so both see the same machine.

    python -m experiments.ep_overlap_probe --out results/ep-overlap/cpu-gloo.json          # gloo, 2 processes, CPU
    torchrun --nproc-per-node 2 -m experiments.ep_overlap_probe --backend nccl --out X.json  # two GPUs

Qwen3-MoE layer built from a config (random weights, real top-k routing of random hidden states),
`--tokens` per rank. Each dispatcher runs `--repeats` windows of `--inner` fwd+bwd after warm-up;
ms = window / inner, timed on rank 0 between barriers (and CUDA synchronisation on GPUs). Writes JSON
(atomically) with the geometry, every window and the provenance.
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import time

from . import provenance, store

DISPATCHERS = ("all2all", "all2all_overlap")


def _block(args, world: int, device):
    import torch
    import transformers

    import moe_lab

    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=args.hidden, intermediate_size=args.intermediate, moe_intermediate_size=args.intermediate,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1)
    torch.manual_seed(args.seed)
    base = transformers.AutoModelForCausalLM.from_config(config).to(device)
    blocks = {}
    for name in DISPATCHERS:
        model = moe_lab.patch_model(copy.deepcopy(base), {"dispatch": name}, ep_size=world)
        block = model.model.layers[0].mlp
        if name == "all2all_overlap":
            block.dispatcher.chunks = args.chunks
        blocks[name] = block
    return blocks


def _measure(args, rank: int, world: int) -> dict | None:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    blocks = _block(args, world, device)
    x = torch.randn(args.tokens, args.hidden, device=device, generator=None).requires_grad_()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    windows = {name: [] for name in DISPATCHERS}
    for name, block in blocks.items():
        for _ in range(args.warmup):
            block(x).sum().backward()
    for _ in range(args.repeats):  # alternate, so both see the same machine state
        for name, block in blocks.items():
            sync()
            t = time.perf_counter()
            for _ in range(args.inner):
                block(x).sum().backward()
            sync()
            windows[name].append((time.perf_counter() - t) * 1000 / args.inner)
    if rank:
        return None
    ms = {name: statistics.median(v) for name, v in windows.items()}
    return {"kind": "ep_overlap_probe", "backend": args.backend, "world": world, "device": str(device.type),
            "geometry": {k: getattr(args, k) for k in ("tokens", "hidden", "intermediate", "experts", "top_k", "chunks")},
            "ms_median": ms, "windows_ms": windows, "speedup_overlap": ms["all2all"] / ms["all2all_overlap"],
            "provenance": provenance.collect()}


def _worker(rank, world, port, args):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    try:
        record = _measure(args, rank, world)
        if record is not None:
            store.write_json(args.out, record)
            print(f"{world} x {args.backend}: all2all {record['ms_median']['all2all']:.1f} ms, all2all_overlap "
                  f"({args.chunks} chunks) {record['ms_median']['all2all_overlap']:.1f} ms: "
                  f"{record['speedup_overlap']:.2f}x")
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--world", type=int, default=2, help="processes to spawn (gloo); under torchrun its WORLD_SIZE")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.experts % args.world:
        print(f"error: --experts {args.experts} must be a multiple of --world {args.world}", file=sys.stderr)
        return 2
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:  # under torchrun
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(args.backend)
        try:
            record = _measure(args, rank, world)
            if record is not None:
                store.write_json(args.out, record)
                print(record["ms_median"], f"{record['speedup_overlap']:.2f}x")
        finally:
            dist.destroy_process_group()
        return 0
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
