"""The built-in backends: `eager` (readable reference loops) and `torch` (sort + grouped_mm).

Stage call signatures (every implementation of a stage takes and returns the same things):
- router(hidden [T, H], weight [E, H], bias [E] | None, correction_bias [E] | None, spec) -> RouterOutput
- permutation(hidden [T, H], ids [T, k], num_experts) -> (x [S, H] in expert order, Permutation)
- dispatch: a dispatcher class, built once per layer: .dispatch(x, perm) -> Dispatched; .combine(y, dispatched) -> y;
  or token-level (`token_level = True`, DeepEP): .run(hidden, ids, weights, local_fn) -> out [T, H]
- experts(x [S, H], counts [E], offsets [E] int32, experts_module, ExpertsSpec) -> y [S, H]
- combine(rows [S, H], perm, weights [T, k], out_dtype) -> out [T, H]
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from .parallel.deepep import DeepEPDispatcher, why_deepep_unavailable
from .dispatch import LocalDispatcher
from .parallel.expert_parallel import AllToAllDispatcher
from .experts import experts_grouped_mm, experts_loop
from .permutation import combine_eager, combine_sorted, gather_rows, plan_eager, plan_sorted
from .registry import Capabilities, register_backend, register_stage
from .routing import route_reference
from .te_backend import combine_te, experts_te, experts_te_cutlass, permute_te, route_te, why_te_unavailable
from .triton_backend import (
    TRITON_ACTIVATIONS, combine_triton, experts_triton, gathered_experts_triton, permute_triton, route_triton, why_triton_unavailable,
)


def permute_eager(hidden, ids, num_experts):
    perm = plan_eager(ids, num_experts)
    return gather_rows(hidden, perm), perm


def permute_sorted(hidden, ids, num_experts):
    perm = plan_sorted(ids, num_experts)
    return gather_rows(hidden, perm), perm


def _no_grouped_mm():
    import torch.nn.functional as F

    if not hasattr(F, "grouped_mm"):
        import torch

        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm; install torch>=2.10"
    return None


FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16})
GRAPH_SAFE = Capabilities(graph_safe=True)
# Triton runs on CUDA tensors, and on CPU tensors only under its interpreter (tests)
TRITON = Capabilities(devices=frozenset({"cuda", "cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else {"cuda"}),
                      graph_safe=True)
TE = Capabilities(devices=frozenset({"cuda"}))
# torch.nn.functional.grouped_mm: bf16/fp16 on CUDA (sm80+), any float on the CPU
GROUPED_MM = Capabilities(dtypes={"cuda": frozenset({torch.bfloat16, torch.float16}), "cpu": FLOATS})

register_stage("router", "eager", route_reference, description="reference router (v5 semantics)")
register_stage("router", "torch", route_reference, description="same as eager: the router is already vectorised")
register_stage("permutation", "eager", permute_eager, description="one nonzero() per expert")
register_stage("permutation", "torch", permute_sorted, description="stable argsort + bincount")
register_stage("dispatch", "local", LocalDispatcher, description="all experts in this process", caps=GRAPH_SAFE)
register_stage("dispatch", "all2all", AllToAllDispatcher, description="torch.distributed all_to_all_single, uneven splits")
register_stage("dispatch", "deepep", DeepEPDispatcher, why_deepep_unavailable,
               description="DeepEP fused NVLink all-to-all (token-level: moves tokens, the other stages run on what arrives)",
               caps=Capabilities(devices=frozenset({"cuda"}), dtypes={"cuda": frozenset({torch.bfloat16})},
                                 token_level=True))
register_stage("experts", "eager", experts_loop, description="per-expert loop of F.linear")
register_stage("experts", "torch", experts_grouped_mm, _no_grouped_mm, description="torch.nn.functional.grouped_mm",
               caps=GROUPED_MM)
register_stage("combine", "eager", combine_eager, description="index_add_ in float32")
register_stage("combine", "torch", combine_sorted, description="inverse permutation + fixed-order sum over k")

register_stage("router", "triton", route_triton, why_triton_unavailable, description="fused scores + top-k + weights kernel",
               caps=TRITON)
register_stage("permutation", "triton", permute_triton, why_triton_unavailable, description="counting sort + row gather kernels",
               caps=TRITON)
TRITON_EXPERTS = replace(TRITON, activations=frozenset(TRITON_ACTIVATIONS))
register_stage("experts", "triton", experts_triton, why_triton_unavailable,
               description="fused grouped GEMM MLP (activation in epilogue)", caps=TRITON_EXPERTS)
register_stage("combine", "triton", combine_triton, why_triton_unavailable, description="fixed-order weighted un-permute kernel",
               caps=TRITON)
register_stage("experts", "triton_gather", experts_triton, why_triton_unavailable,
               description="fused expert MLP; with the triton permutation, the gather runs in the GEMM prologue",
               caps=replace(TRITON_EXPERTS, fuses_with="triton"), fused=gathered_experts_triton)

register_stage("router", "te", route_te, why_te_unavailable,
               description="TransformerEngine fused top-k with score function (softmax families)",
               caps=replace(TE, routing=frozenset({"softmax", "topk_before_softmax", "renormalize", "scaling",
                                                   "logits_fp32"})))
register_stage("permutation", "te", permute_te, why_te_unavailable, description="TransformerEngine moe_permute (index map)",
               caps=TE)
register_stage("experts", "te", experts_te, why_te_unavailable,
               description="TransformerEngine GroupedLinear over views of v5's 3D weights", caps=TE)
register_stage("experts", "te_cutlass", experts_te_cutlass, why_te_unavailable,
               description="as te, with NVTE_USE_CUTLASS_GROUPED_GEMM=1 (process-wide)", caps=TE)
register_stage("combine", "te", combine_te, why_te_unavailable, description="TransformerEngine moe_unpermute with merging probs",
               caps=TE)

register_backend("eager", {"router": "eager", "permutation": "eager", "dispatch": "local", "experts": "eager", "combine": "eager"})
register_backend("torch", {"router": "torch", "permutation": "torch", "dispatch": "local", "experts": "torch", "combine": "torch"})
register_backend("triton", {"router": "triton", "permutation": "triton", "dispatch": "local", "experts": "triton", "combine": "triton"})
register_backend("triton_gather", {"router": "triton", "permutation": "triton", "dispatch": "local",
                                   "experts": "triton_gather", "combine": "triton"})
register_backend("te", {"router": "te", "permutation": "te", "dispatch": "local", "experts": "te", "combine": "te"})
register_backend("te_cutlass", {"router": "te", "permutation": "te", "dispatch": "local", "experts": "te_cutlass",
                                "combine": "te"})
