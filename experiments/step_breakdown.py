"""Where a training step's time goes: forward and backward of the MoE blocks, of the rest of the
decoder (attention, norms, embeddings, dense MLPs), of the LM head + loss, then the gradient
reduction, the optimizer step and zeroing the gradients.

Timed with CUDA events recorded by module hooks (CPU clocks without a GPU), over a few steps after
warm-up, one system at a time on one device; the parts of a step add up to its total. The hooks add
host work per block (not measured), so a total may run above the harness's step time.

    python -m experiments.step_breakdown --model qwen3-30b-a3b --layers 8 --seq 4096 \\
        --systems v5-grouped_mm,triton,triton:adamw_triton --out results/runs/h200x1-breakdown/breakdown.json

A system may name its own optimizer after a colon (`triton:adamw_triton`); the others use --optimizer.
``--profile`` adds one more step under ``torch.profiler`` per system: its kernels by device time
(``kernels``: the top 60 by total; ``kernel_classes``: every kernel in a few classes by name).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from . import cell, models, provenance, regimes, store, systems
from .kernel_profile import profile_kernels

log = logging.getLogger(__name__)

PARTS = ("fwd_moe", "fwd_decoder_rest", "fwd_head_loss", "bwd_head_loss", "bwd_moe", "bwd_decoder_rest",
         "grad_reduce", "optimizer", "zero_grad")


class _Clock:
    """Marks on the device's stream (CUDA events) or the host clock; `ms(a, b)` after a sync."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def moe_blocks(model) -> list:
    """The sparse MoE blocks of a v5 or moe_lab model (by the family's block class, or MoELayer)."""
    from moe_lab import FAMILIES
    from moe_lab.layer import MoELayer

    family = FAMILIES.get(model.config.model_type)
    names = {family.block_class} if family else set()
    return [m for m in model.modules() if isinstance(m, MoELayer) or type(m).__name__ in names]


def _first_tensor(value):
    if isinstance(value, (tuple, list)):
        return value[0] if value else None
    return getattr(value, "last_hidden_state", value)


class _StepMarks:
    """Marks around every MoE block's forward and backward, and where the decoder's forward ends and
    its backward starts. Backward marks are gradient hooks on the tensors: a block's output gradient
    arriving starts its backward, its input gradient being ready ends it."""

    def __init__(self, model, clock: _Clock):
        self.clock, self.handles = clock, []
        self.reset()
        for block in moe_blocks(model):
            self.handles += [block.register_forward_pre_hook(self._block_starts, with_kwargs=True),
                             block.register_forward_hook(self._block_ends)]
        self.handles.append(model.get_decoder().register_forward_hook(self._decoder_ends))

    def reset(self):
        self.moe_fwd, self.moe_bwd, self.marks = [], [], {}

    def _block_starts(self, module, args, kwargs):
        x = _first_tensor(args) if args else kwargs.get("hidden_states")
        if x is not None and x.requires_grad:
            x.register_hook(lambda g: self.moe_bwd[-1].__setitem__(1, self.clock.mark()))
        self.moe_fwd.append([self.clock.mark(), None])

    def _block_ends(self, module, args, output):
        self.moe_fwd[-1][1] = self.clock.mark()
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(lambda g: self.moe_bwd.append([self.clock.mark(), None]))

    def _decoder_ends(self, module, args, output):
        self.marks["decoder_fwd_end"] = self.clock.mark()
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(lambda g: self.marks.__setitem__("decoder_bwd_start", self.clock.mark()))

    def remove(self):
        for h in self.handles:
            h.remove()


def breakdown_steps(model, optimizer, batches, device) -> list[dict]:
    """Run one step per batch; returns per step {part: ms} and "step". ``grad_reduce`` is the time
    between backward's end and the optimizer step: nothing on one device (moe_lab's expert
    parallelism reduces its gradients inside backward); kept so that every breakdown has the part."""
    clock = _Clock(device)
    marks = _StepMarks(model, clock)
    steps = []
    try:
        for ids in batches:
            marks.reset()
            cell._sync(device)
            t0 = clock.mark()
            host0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            t_fwd = clock.mark()
            host_fwd = time.perf_counter()
            loss.backward()
            t_bwd = clock.mark()
            host_bwd = time.perf_counter()
            t_reduce = clock.mark()
            optimizer.step()
            t_opt = clock.mark()
            optimizer.zero_grad(set_to_none=True)
            t_end = clock.mark()
            cell._sync(device)
            ms = clock.ms
            if len(marks.moe_bwd) != len(marks.moe_fwd) or any(b is None for _, b in marks.moe_bwd):
                raise RuntimeError(f"step_breakdown: {len(marks.moe_fwd)} MoE blocks ran forward but "
                                   f"{sum(b is not None for _, b in marks.moe_bwd)} backward intervals closed "
                                   "(a block whose input needs no gradient cannot be timed in backward)")
            fwd_moe = sum(ms(a, b) for a, b in marks.moe_fwd)
            bwd_moe = sum(ms(a, b) for a, b in marks.moe_bwd)
            decoder_end, decoder_bwd = marks.marks["decoder_fwd_end"], marks.marks["decoder_bwd_start"]
            bwd_head = ms(t_fwd, decoder_bwd)
            steps.append({
                "fwd_moe": fwd_moe,
                "fwd_decoder_rest": ms(t0, decoder_end) - fwd_moe,
                "fwd_head_loss": ms(decoder_end, t_fwd),
                "bwd_head_loss": bwd_head,
                "bwd_moe": bwd_moe,
                "bwd_decoder_rest": ms(t_fwd, t_bwd) - bwd_head - bwd_moe,
                "grad_reduce": ms(t_bwd, t_reduce),
                "optimizer": ms(t_reduce, t_opt),
                "zero_grad": ms(t_opt, t_end),
                "step": ms(t0, t_end),
                # host time to issue forward / backward (includes any wait for the device): close to
                # the device's time for the same part means the host, not the GPU, sets the pace
                "host_fwd": (host_fwd - host0) * 1e3,
                "host_bwd": (host_bwd - host_fwd) * 1e3,
            })
    finally:
        marks.remove()
    return steps


def profile_step(model, optimizer, ids, device, top: int = 60) -> dict:
    """One training step under torch.profiler (``kernel_profile.profile_kernels``); its wall time
    is ``profiled_step_ms``."""

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cell._sync(device)

    profiled = profile_kernels(step, device, top)
    profiled["profiled_step_ms"] = profiled.pop("profiled_ms")
    return profiled


def breakdown_system(spec: dict, profile: bool = False) -> dict:
    """spec: a normalised cell spec (one device). Returns {"system", "parts_ms" (medians), "step_ms", "steps"}."""
    import torch

    device, _, world = cell._setup_device(spec)
    if world != 1:
        raise ValueError("step_breakdown runs one process on one device")
    system = systems.parse(spec["system"])
    if system.cuda_graphs:
        raise ValueError(f"{spec['system']}: the breakdown times blocks with hooks inside the layers, which CUDA "
                         "graphs replay without; time graphed systems with the sweep")
    config = models.build_config(spec["model"], spec["layers"])
    dtype = getattr(torch, cell._DTYPES[spec["dtype"]])
    attn = models.attn_implementation(spec["model"], spec["attn"])
    torch.manual_seed(spec["seed"])
    model = systems.build_model(system, config, dtype=dtype, attn=attn, device=device, world=1)
    model.train()
    hooks = regimes.apply(model, spec["routing"], seed=spec["seed"])
    optimizer = cell._optimizer(spec, model, device, in_backward=system.optimizer_in_backward,
                                side_stream=system.optimizer_side_stream)
    batches = [cell._make_batch(spec, config.vocab_size, s, 0, False, device) for s in range(spec["warmup"] + spec["steps"])]
    steps = breakdown_steps(model, optimizer, batches, device)[spec["warmup"]:]
    profiled = profile_step(model, optimizer, batches[-1], device) if profile else {}
    for h in hooks:
        h.remove()
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    parts = {p: statistics.median(s[p] for s in steps) for p in PARTS}
    host = {p: statistics.median(s[p] for s in steps) for p in ("host_fwd", "host_bwd")}
    return {"system": spec["system"], "routing": spec["routing"], "parts_ms": parts, "host_ms": host,
            "step_ms": statistics.median(s["step"] for s in steps), "steps": steps, **profiled}


def format_table(rows: list[dict]) -> str:
    head = "| system | routing | step ms | " + " | ".join(PARTS) + " |"
    lines = [head, "|" + "---|" * (3 + len(PARTS))]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['system']} | {r['routing']} | {r.get('status')} | " + " | ".join("-" for _ in PARTS) + " |")
            continue
        lines.append(f"| {r['system']} | {r['routing']} | {r['step_ms']:.1f} | "
                     + " | ".join(f"{r['parts_ms'][p]:.1f}" for p in PARTS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--systems", default="v5-grouped_mm,triton",
                    help="comma-separated systems, each optionally <system>:<optimizer> (default: --optimizer)")
    ap.add_argument("--routing", default="real")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--optimizer", default="adamw_fused")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", action="store_true", help="one more step per system under torch.profiler (kernels)")
    ap.add_argument("--out", required=True, help="JSON file for the rows and their provenance")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = []  # every entry checked before any GPU time is spent
    for entry in args.systems.split(","):
        system, _, optimizer = entry.partition(":")
        specs.append((entry, cell.normalise({
            "model": args.model, "layers": args.layers, "seq": args.seq, "batch": args.batch, "system": system,
            "routing": args.routing, "dtype": args.dtype, "optimizer": optimizer or args.optimizer,
            "warmup": args.warmup, "steps": args.steps, "device": args.device})))
    rows = []
    for entry, spec in specs:
        try:
            row = {**breakdown_system(spec, profile=args.profile), "status": "ok", "system": entry, "optimizer": spec["optimizer"]}
        except Exception as exc:  # noqa: BLE001 - a failed system is recorded; the others go on
            log.exception("step breakdown of %s failed", entry)
            row = {"system": entry, "routing": args.routing, "status": cell.classify(exc),
                   "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
    table = format_table(rows)
    print(table, flush=True)
    for row in rows:
        if row.get("host_ms"):
            fwd = sum(row["parts_ms"][p] for p in PARTS if p.startswith("fwd"))
            bwd = sum(row["parts_ms"][p] for p in PARTS if p.startswith("bwd"))
            print(f"{row['system']}: host issue time forward {row['host_ms']['host_fwd']:.1f} ms (device {fwd:.1f}), "
                  f"backward {row['host_ms']['host_bwd']:.1f} ms (device {bwd:.1f})", flush=True)
        if row.get("kernel_classes"):
            print(f"{row['system']}: kernel time {row['kernel_total_ms']:.1f} ms by class: "
                  + ", ".join(f"{c} {ms:.1f}" for c, ms in row["kernel_classes"].items()), flush=True)
            for k in row["kernels"][:25]:
                print(f"    {k['ms']:8.2f} ms {k['calls']:5d}x [{k['class']}] {k['name'][:110]}", flush=True)
    record = {"kind": "step-breakdown", "model": args.model, "layers": args.layers, "batch": args.batch,
              "optimizer": args.optimizer,
              "seq": args.seq, "rows": rows, "table": table, "provenance": provenance.collect(sys.argv if argv is None else argv)}
    store.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
