"""moe_lab's MoE layer called from JAX: the PyTorch stages (Triton kernels on the GPU) on JAX arrays.

    from moe_lab.jax.layer import moe_layer
    out, r = moe_layer(hidden, router, params, routing, spec, backend="triton")   # jax.grad / jax.jit work

The signature and result are those of the JAX reference `moe_lab.jax.reference.moe_layer` (no
`ids=` argument): hidden [..., H]; router {"weight" [E, H], optional "bias" [E],
"e_score_correction_bias" [E]}; params v5's expert tensors by name ("gate_up_proj" [E, 2I, H],
"down_proj" [E, H, I], ...); routing a `moe_lab.RoutingSpec`, spec a `moe_lab.ExpertsSpec`.
Returns (out [..., H], RouterOutput(logits [T, E], weights [T, k], ids [T, k] int32)), equal to the
reference in value and in gradient (tests/test_jax_layer.py).

How: a `jax.custom_vjp` whose forward and backward each make one callback into PyTorch. The
callback (`transport`):
- "buffer" (default): `jax.experimental.buffer_callback`, an XLA FFI custom call that hands the
  callback XLA's own device buffers; they cross to torch through DLPack without copies (CPU and
  GPU; on the GPU torch runs on XLA's stream, `torch.cuda.ExternalStream(ctx.stream)`), and the
  results are written into XLA's output buffers (one device-side copy of each output).
- "host": `jax.pure_callback`: NumPy arrays on the host; where JAX computes on a GPU, torch copies
  them to its CUDA device, runs the stages there and copies the results back (a device -> host ->
  device round trip of every input and output). Kept for comparison (experiments/jax_overhead.py).
The backward recomputes the torch forward (with autograd on) and runs torch's backward: XLA owns
the input buffers only for the duration of one callback, so the forward's autograd graph (which
holds them) cannot be kept; the extra forward is the price (measured in results/jax-interop/).
Inside `jax.jit` the torch stages run from the compiled program (the callback does not retrace).

Why not torchax or torch2jax (both installable here): they translate PyTorch programs into JAX
operations (abstract interpretation), so the layer would run as XLA ops, not moe_lab's Triton
kernels, and neither translates the torch backend's stages (experiments/jax_interop_probe.py
records what each does on this layer, results/jax-interop/probe-cpu.json: torch2jax stops at
torch.softmax(dtype=...), torchax at aten.prod.dim_Dimname, on the CPU, at the first stages).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .router import _jax

TRANSPORTS = ("buffer", "host")


@dataclass(frozen=True)
class _Static:
    routing: object
    spec: object
    backend: str
    transport: str
    host_device: str = "cpu"  # "host" transport: where torch runs on the arrays it gets from the host


_ROUTER_DIFF = ("weight", "bias")  # the router tensors that get gradients (the correction bias: selection only)


@functools.cache
def _choice(backend: str):
    from ..registry import resolve_backend

    if backend == "auto":
        raise ValueError("moe_lab.jax.layer.moe_layer: name a backend ('torch', 'triton', ...); 'auto' measures "
                         "inside a torch model and is not available here")
    return resolve_backend(backend)


def _planned_choice(static: _Static, device_type: str, dtype: torch.dtype):
    from ..registry import LayerNeeds, plan_layer

    needs = LayerNeeds("jax", static.routing.features(), static.spec.activation_key, device_type, dtype)
    return plan_layer(_choice(static.backend), needs, substitute=False,
                      hint="choose a backend that computes this layer (moe_lab.available_backends())")[1]


class _Experts(torch.nn.Module):
    """A stand-in for a v5 experts module: the given tensors under v5's names, and act_fn."""

    def __init__(self, tensors: dict, spec):
        super().__init__()
        from transformers.activations import ACT2FN

        for name, t in tensors.items():
            self.__dict__[name] = t
        if spec.activation != "gpt_oss":
            self.__dict__["act_fn"] = ACT2FN[spec.act_name]


def _torch_forward(static: _Static, hidden, router: dict, params: dict):
    """torch tensors -> (out [T, H], logits, weights, ids) through moe_lab's stages."""
    from ..layer import run_routed_experts
    from ..stages.dispatch import LocalDispatcher

    choice = _planned_choice(static, hidden.device.type, next(iter(params.values())).dtype)
    r = choice.router(hidden, router["weight"], router.get("bias"), router.get("e_score_correction_bias"), static.routing)
    out = run_routed_experts(hidden, r.ids, r.weights, _Experts(params, static.spec), static.spec, choice, LocalDispatcher())
    return out, r.logits, r.weights, r.ids


# ---- the callbacks: torch on the buffers XLA hands over ---------------------------------------------
def _from_numpy(a) -> torch.Tensor:
    import numpy as np

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_numpy(t: torch.Tensor, dtype):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype)
    return t.numpy().astype(dtype, copy=False)


def _split(flat, names):
    """flat tensors -> (hidden, router dict, params dict, rest) by `names` = (router names, param names)."""
    router_names, param_names = names
    hidden = flat[0]
    router = dict(zip(router_names, flat[1:1 + len(router_names)]))
    params = dict(zip(param_names, flat[1 + len(router_names):1 + len(router_names) + len(param_names)]))
    return hidden, router, params, flat[1 + len(router_names) + len(param_names):]


def _forward_body(static, names, flat):
    hidden, router, params, _ = _split(flat, names)
    with torch.no_grad():
        out, logits, weights, ids = _torch_forward(static, hidden, router, params)
    return out, logits, weights, ids.to(torch.int32)


def _backward_body(static, names, flat):
    hidden, router, params, (d_out, d_logits, d_weights) = _split(flat, names)
    hidden = hidden.detach().requires_grad_()
    router = {n: t.detach().requires_grad_(n in _ROUTER_DIFF) for n, t in router.items()}
    params = {n: t.detach().requires_grad_() for n, t in params.items()}
    leaves = [hidden] + [router[n] for n in names[0] if n in _ROUTER_DIFF] + [params[n] for n in names[1]]
    with torch.enable_grad():
        out, logits, weights, _ = _torch_forward(static, hidden, router, params)
        pairs = [(o, d) for o, d in ((out, d_out), (logits, d_logits), (weights, d_weights)) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [d.to(o.dtype) for o, d in pairs], allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


def _run(body, static, names, args, result_structs):
    """Call `body(static, names, torch tensors) -> torch tensors` on JAX arrays `args` through the
    chosen transport; returns JAX arrays of `result_structs`."""
    jax = _jax()
    if static.transport == "buffer":
        from jax.experimental.buffer_callback import buffer_callback

        def callback(ctx, outs, *ins):
            tensors = [torch.from_dlpack(b) for b in ins]
            stream = None
            if tensors and tensors[0].is_cuda:
                stream = torch.cuda.ExternalStream(ctx.stream, device=tensors[0].device)
            with torch.cuda.stream(stream) if stream is not None else _nullcontext():
                results = body(static, names, tensors)
                for buf, r in zip(outs, results):
                    torch.from_dlpack(buf).copy_(r.reshape(buf.shape))
        return buffer_callback(callback, list(result_structs))(*args)
    if static.transport == "host":
        def callback(*ins):
            results = body(static, names, [_from_numpy(a).to(static.host_device) for a in ins])
            return [_to_numpy(r.reshape(s.shape), s.dtype) for r, s in zip(results, result_structs)]
        return jax.pure_callback(callback, list(result_structs), *args)
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {static.transport!r}")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- the custom_vjp -----------------------------------------------------------------------------------
def _names(router: dict, params: dict):
    return tuple(sorted(router)), tuple(sorted(params))


def _flat(hidden, router, params):
    rn, pn = _names(router, params)
    return [hidden] + [router[n] for n in rn] + [params[n] for n in pn]


def _forward_structs(static: _Static, hidden, router, params):
    import jax.numpy as jnp

    from . import reference

    jax = _jax()
    r = jax.eval_shape(lambda h, rt: reference.route(h, rt, static.routing), hidden, router)
    return [jax.ShapeDtypeStruct(hidden.shape, hidden.dtype), jax.ShapeDtypeStruct(r.logits.shape, r.logits.dtype),
            jax.ShapeDtypeStruct(r.weights.shape, r.weights.dtype), jax.ShapeDtypeStruct(r.ids.shape, jnp.int32)]


def _layer_impl(static: _Static, hidden, router, params):
    structs = _forward_structs(static, hidden, router, params)
    return tuple(_run(_forward_body, static, _names(router, params), _flat(hidden, router, params), structs))


@functools.cache
def _custom_layer():
    jax = _jax()

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def layer(static, hidden, router, params):
        return _layer_impl(static, hidden, router, params)

    def fwd(static, hidden, router, params):
        return _layer_impl(static, hidden, router, params), (hidden, router, params)

    def bwd(static, residuals, cotangents):
        import jax.numpy as jnp

        hidden, router, params = residuals
        d_out, d_logits, d_weights, _ = cotangents
        rn, pn = _names(router, params)
        diff = [n for n in rn if n in _ROUTER_DIFF]
        structs = [jax.ShapeDtypeStruct(hidden.shape, hidden.dtype)]
        structs += [jax.ShapeDtypeStruct(router[n].shape, router[n].dtype) for n in diff]
        structs += [jax.ShapeDtypeStruct(params[n].shape, params[n].dtype) for n in pn]
        grads = _run(_backward_body, static, (rn, pn), _flat(hidden, router, params) + [d_out, d_logits, d_weights],
                     structs)
        d_router = {n: jnp.zeros_like(router[n]) for n in rn}
        d_router.update(dict(zip(diff, grads[1:1 + len(diff)])))
        d_params = dict(zip(pn, grads[1 + len(diff):]))
        return grads[0], d_router, d_params

    layer.defvjp(fwd, bwd)
    return layer


def _host_device() -> str:
    """Where the "host" transport runs torch: the CUDA device where JAX computes on a GPU and torch
    has one, else the CPU."""
    return "cuda" if _jax().default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def moe_layer(hidden, router: dict, params: dict, routing, spec, *, backend: str = "torch", transport: str = "buffer"):
    """hidden [..., H] -> (out [..., H], RouterOutput(logits [T, E], weights [T, k], ids [T, k] int32)):
    moe_lab's `backend` stages (a backend word: "torch", "triton", "eager", ...) run by PyTorch on
    these JAX arrays; differentiable (`jax.custom_vjp`) in hidden, the router's weight/bias and
    every expert tensor; works under `jax.jit`. See the module docstring."""
    from .reference import RouterOutput

    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    static = _Static(routing, spec, backend, transport, _host_device() if transport == "host" else "cpu")
    _choice(backend)  # an unknown or unavailable backend fails here, in the user's terms
    shape = hidden.shape
    out, logits, weights, ids = _custom_layer()(static, hidden.reshape(-1, shape[-1]), dict(router), dict(params))
    return out.reshape(shape), RouterOutput(logits, weights, ids)
