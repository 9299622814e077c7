"""Which library can put moe_lab's torch layer inside JAX (issue 26, part 2): torch2jax and torchax
translate PyTorch programs into JAX ops; moe_lab.jax.layer calls PyTorch from JAX (buffer_callback
or pure_callback). Runs the torch backend's layer (router + permutation + grouped_mm experts +
combine, tiny shapes, CPU) through each and records whether it runs and its error.

    pip install --no-deps --target /tmp/tl torchax torch2jax
    python -m experiments.jax_interop_probe --path /tmp/tl --out results/jax-interop/probe-cpu.json
"""
from __future__ import annotations

import argparse
import sys

from . import provenance, store


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None, help="a folder holding torchax / torch2jax (pip install --target)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.path:
        sys.path.insert(0, args.path)
    import importlib.metadata as md

    import jax.numpy as jnp
    import torch

    import moe_lab
    from moe_lab.jax.layer import moe_layer
    from moe_lab.layer import run_routed_experts
    from moe_lab.registry import resolve_backend
    from moe_lab.stages.dispatch import LocalDispatcher

    routing, spec, choice = moe_lab.RoutingSpec(4, 2, renormalize=True), moe_lab.ExpertsSpec(4), resolve_backend("torch")

    def layer(hidden, weight, gate_up, down):
        experts = torch.nn.Module()
        experts.__dict__.update(gate_up_proj=gate_up, down_proj=down, act_fn=torch.nn.SiLU())
        r = choice.router(hidden, weight, None, None, routing)
        return run_routed_experts(hidden, r.ids, r.weights, experts, spec, choice, LocalDispatcher())

    args_t = [torch.randn(6, 8), torch.randn(4, 8), torch.randn(4, 10, 8), torch.randn(4, 8, 5)]
    args_j = [jnp.asarray(a.numpy()) for a in args_t]
    rows = []

    def attempt(name, package, run):
        try:
            version = md.version(package) if package else None
        except md.PackageNotFoundError:
            rows.append({"library": name, "runs": False, "error": "not installed"})
            return
        try:
            shape = tuple(run().shape)
            rows.append({"library": name, "version": version, "runs": True, "out_shape": shape})
        except Exception as exc:  # the probe's purpose: record how each fails
            rows.append({"library": name, "version": version, "runs": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})

    def torch2jax_run():
        from torch2jax import t2j
        return t2j(layer)(*args_j)

    def torchax_run():
        import torchax
        env = torchax.default_env()
        with env:
            return layer(*[torchax.tensor.Tensor(a, env) for a in args_j])

    attempt("torch2jax (translates torch ops to JAX)", "torch2jax", torch2jax_run)
    attempt("torchax (translates torch ops to JAX)", "torchax", torchax_run)
    attempt("moe_lab.jax.layer buffer_callback (calls torch)", "jax",
            lambda: moe_layer(args_j[0], {"weight": args_j[1]}, {"gate_up_proj": args_j[2], "down_proj": args_j[3]},
                              routing, spec, transport="buffer")[0])
    attempt("moe_lab.jax.layer pure_callback (calls torch)", "jax",
            lambda: moe_layer(args_j[0], {"weight": args_j[1]}, {"gate_up_proj": args_j[2], "down_proj": args_j[3]},
                              routing, spec, transport="host")[0])
    store.write_json(args.out, {"kind": "jax_interop_probe", "rows": rows,
                                "provenance": provenance.collect(sys.argv if argv is None else argv)})
    for r in rows:
        print(f"{r['library']:50} {'runs' if r['runs'] else 'fails: ' + r['error'][:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
