"""Causal self-attention, forward + backward, at a model's geometry: PyTorch's SDPA kernels side by side.

    python -m experiments.attention_bench --model qwen3-30b-a3b --tokens 4096 --out results/runs/<name>/attention.json

Paths (query [batch, heads, seq, head_dim]; key/value with the model's fewer KV heads):
``sdpa`` (v5's call: PyTorch picks the kernel, grouped-query heads native), ``flash``, ``cudnn``
(one backend forced, grouped-query native), ``cudnn-repeat-kv`` and ``efficient-repeat-kv`` (KV heads
repeated first, as v5 does when it passes a mask). Each row: median ms of forward+backward and of forward
(triton.testing.do_bench), TFLOP/s with causal attention counted at one half (forward 4*b*h*s^2*d/2,
backward 2.5x forward), and the largest difference of output and gradients from ``sdpa``'s.
A path PyTorch refuses is recorded as failed with its error; the other rows go on.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys

from . import models, provenance, store

log = logging.getLogger(__name__)

PATHS = ["sdpa", "flash", "cudnn", "cudnn-repeat-kv", "efficient-repeat-kv"]


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Forward+backward FLOPs of causal attention (half the square), backward counted as 2.5x forward."""
    forward = 4 * batch * heads * seq * seq * head_dim / 2
    return 3.5 * forward


def _call(path: str, q, k, v):
    """Output [batch, heads, seq, head_dim] of one path."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = q.shape[1] // k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if path == "sdpa":
        return sdpa(q, k, v, is_causal=True, enable_gqa=groups > 1)
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "cudnn-repeat-kv": SDPBackend.CUDNN_ATTENTION, "efficient-repeat-kv": SDPBackend.EFFICIENT_ATTENTION}[path]
    gqa = groups > 1 and not path.endswith("repeat-kv")
    if path.endswith("repeat-kv"):
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    with sdpa_kernel([backend]):
        return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)


def bench_attention(model_name: str, tokens: int, batch: int = 1, seed: int = 0, paths=PATHS) -> list[dict]:
    import torch
    import triton.testing

    config = models.build_config(model_name, layers=1)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    torch.manual_seed(seed)
    q, k, v = (torch.randn(batch, h, tokens, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    flop = attention_flops(batch, heads, tokens, head_dim)
    reference = None
    rows = []
    for path in paths:
        row = {"model": model_name, "path": path, "tokens": tokens, "batch": batch, "heads": heads,
               "kv_heads": kv_heads, "head_dim": head_dim, "flops": flop}
        try:
            for t in (q, k, v):
                t.grad = None
            out = _call(path, q, k, v)
            out.backward(grad)
            result = [out.detach().float(), *(t.grad.float() for t in (q, k, v))]
            if path == "sdpa":
                reference = result
            if reference is not None:  # only against SDPA's own result (run it first)
                row["max_abs_diff_vs_sdpa"] = {name: (a - b).abs().max().item()
                                               for name, a, b in zip(("out", "dq", "dk", "dv"), result, reference)}

            def step(path=path):
                _call(path, q, k, v).backward(grad)

            samples = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="all", grad_to_none=[q, k, v])
            with torch.no_grad():
                samples_fwd = triton.testing.do_bench(lambda: _call(path, q, k, v), warmup=25, rep=100, return_mode="all")
            ms = statistics.median(samples)
            row.update(status="ok", ms=ms, ms_forward=statistics.median(samples_fwd), ms_samples=samples,
                       ms_forward_samples=samples_fwd, tflops=flop / (ms / 1e3) / 1e12)
        except Exception as exc:  # noqa: BLE001 - a refused path is recorded and the others go on
            log.warning("attention path %s failed: %s", path, exc)
            row.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:500]}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; known: {', '.join(PATHS)}")
    paths = args.paths.split(",")
    if "sdpa" in paths:  # the reference of every difference column
        paths = ["sdpa"] + [p for p in paths if p != "sdpa"]
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for row in bench_attention(args.model, args.tokens, batch, paths=paths):
            rows.append(row)
            if row["status"] == "ok":
                print(f"b{batch} {row['path']:20s} {row['ms']:8.3f} ms (fwd {row['ms_forward']:.3f})  "
                      f"{row['tflops']:6.1f} TFLOP/s  diff {row.get('max_abs_diff_vs_sdpa', '-')}", flush=True)
            else:
                print(f"b{batch} {row['path']:20s} FAILED {row['error'][:160]}", flush=True)
    store.write_json(args.out, {"kind": "attention", "rows": rows,
                                "provenance": provenance.collect(sys.argv if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
