"""JAX interop: the readable, differentiable JAX reference of the MoE layer (`reference`), the
torch <-> JAX bridge over DLPack (`dlpack`), a router written in JAX run as moe_lab's router stage
(`router(fn)`, `moe_lab.jax.router`'s module: `expert_choice`, `sparsemax_topk`), and moe_lab's
PyTorch layer called from JAX (`moe_layer`, in `moe_lab.jax.layer`). Needs the `jax` extra; JAX is
imported when one of them is used, not here.

Note: `moe_lab.jax.router` is the function; its module is reached with
`from moe_lab.jax.router import ...` (or `sys.modules["moe_lab.jax.router"]`).
"""
from .router import expert_choice, router, sparsemax_topk  # noqa: F401  (router.py imports JAX lazily)
from .layer import moe_layer  # noqa: F401  (layer.py imports JAX lazily)

__all__ = ["expert_choice", "moe_layer", "router", "sparsemax_topk"]
