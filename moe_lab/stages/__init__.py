"""The five stages of an MoE layer, one module each, every implementation of a stage side by side:

    router -> permute -> dispatch -> experts -> combine

In each module the reference comes first (plain PyTorch, the definition of right), then the faster
implementations (torch, Triton, TransformerEngine; DeepEP for dispatch), then their registrations
with what each can compute (`moe_lab.registry.Capabilities`). Importing this package registers
them all, and the backend words below name one implementation per stage.
"""
from ..registry import register_backend
from . import combine, dispatch, experts, permute, router  # noqa: F401  (each registers its implementations)

register_backend("eager", {"router": "eager", "permutation": "eager", "dispatch": "local", "experts": "eager", "combine": "eager"})
register_backend("torch", {"router": "torch", "permutation": "torch", "dispatch": "local", "experts": "torch", "combine": "torch"})
register_backend("triton", {"router": "triton", "permutation": "triton", "dispatch": "local", "experts": "triton", "combine": "triton"})
register_backend("triton_gather", {"router": "triton", "permutation": "triton", "dispatch": "local",
                                   "experts": "triton_gather", "combine": "triton"})
register_backend("te", {"router": "te", "permutation": "te", "dispatch": "local", "experts": "te", "combine": "te"})
register_backend("te_cutlass", {"router": "te", "permutation": "te", "dispatch": "local", "experts": "te_cutlass",
                                "combine": "te"})
