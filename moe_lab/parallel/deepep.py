"""The `deepep` dispatcher: DeepEP's fused NVLink all-to-all (normal mode, one node) for expert parallelism.

DeepEP moves tokens, not expert-sorted rows: each token goes once to every rank owning one of its
experts, with its top-k ids rewritten to that rank's local experts (-1 where the expert lives
elsewhere, weight 0). So this dispatcher is token-level: it takes the place of permutation,
dispatch and combine around the local work, which runs the layer's experts stage on the received
tokens:

    hidden [T, H], ids [T, k], weights [T, k]
      -> DeepEP dispatch -> x [R, H], local ids [R, k] (-1: elsewhere), local weights [R, k]
      -> the real (token, local expert) pairs, sorted by expert, through the experts stage,
         weighted and summed per token (`moe_lab.layer.run_local_experts`) -> y [R, H]
      -> DeepEP combine (sum over the ranks each token went to) -> out [T, H]

Autograd: the backward of a dispatch is a combine with the same handle, and the backward of a
combine is a dispatch that reuses the handle (DeepEP's cached mode). DeepEP combines bf16 only, so
activations must be bf16. DeepEP is optional: build it from its repository (see `INSTALL_HINT`).
"""
from __future__ import annotations

import functools

import torch

INSTALL_HINT = (
    "build DeepEP from https://github.com/deepseek-ai/DeepEP (commit 29d31c0, the last before its V2 rewrite; "
    "PyPI's deep-ep cannot build): on the GPU machine, in its checkout, "
    "`TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation .` (with CUDA 13 also "
    "CPATH=/usr/local/cuda/include/cccl NVCC_APPEND_FLAGS=-I/usr/local/cuda/include/cccl)"
)


def why_deepep_unavailable() -> str | None:
    try:
        import deep_ep  # noqa: F401
    except Exception as exc:
        return f"DeepEP cannot be imported ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "DeepEP needs CUDA GPUs on one node and none is visible"
    return None


@functools.cache
def _buffer(group, hidden_bytes: int):
    """One DeepEP Buffer per (process group, row size), sized by DeepEP's own hints, shared by all layers."""
    import deep_ep

    ranks = group.size()
    nvl_bytes = max(deep_ep.Buffer.get_dispatch_config(ranks).get_nvl_buffer_size_hint(hidden_bytes, ranks),
                    deep_ep.Buffer.get_combine_config(ranks).get_nvl_buffer_size_hint(hidden_bytes, ranks))
    return deep_ep.Buffer(group, nvl_bytes, 0)


class _Dispatch(torch.autograd.Function):
    """hidden [T, H] bf16, ids [T, k], weights [T, k] -> (x [R, H], local ids [R, k], local weights [R, k] fp32)."""

    @staticmethod
    def forward(ctx, hidden, weights, ids, num_experts, buffer, state):
        import deep_ep

        ids = ids.to(deep_ep.topk_idx_t).contiguous()
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(ids, num_experts)
        x, local_ids, local_weights, counts, handle, _ = buffer.dispatch(
            hidden.contiguous(), topk_idx=ids, topk_weights=weights.float().contiguous(),
            num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        state["handle"], state["counts"] = handle, counts
        ctx.buffer, ctx.handle, ctx.dtypes = buffer, handle, (hidden.dtype, weights.dtype)
        ctx.mark_non_differentiable(local_ids)
        return x, local_ids, local_weights

    @staticmethod
    def backward(ctx, grad_x, _grad_ids, grad_weights):
        if grad_x is None:
            raise RuntimeError("deepep: the received tokens got no gradient; every rank must run the combine backward")
        grad_weights = None if grad_weights is None else grad_weights.float().contiguous()
        grad_hidden, grad_w, _ = ctx.buffer.combine(grad_x.to(torch.bfloat16).contiguous(), ctx.handle,
                                                     topk_weights=grad_weights)
        grad_w = None if grad_w is None else grad_w.to(ctx.dtypes[1])
        return grad_hidden.to(ctx.dtypes[0]), grad_w, None, None, None, None


class _Combine(torch.autograd.Function):
    """y [R, H] (each received token's weighted local sum) -> out [T, H]: the sum over ranks."""

    @staticmethod
    def forward(ctx, y, buffer, handle):
        out, _, _ = buffer.combine(y.to(torch.bfloat16).contiguous(), handle)
        ctx.buffer, ctx.handle, ctx.dtype = buffer, handle, y.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_y, *_ = ctx.buffer.dispatch(grad_out.to(torch.bfloat16).contiguous(), handle=ctx.handle)
        return grad_y.to(ctx.dtype), None, None


class DeepEPDispatcher:
    """Token-level dispatcher over DeepEP (see the module docstring). `run` replaces permutation,
    dispatch and combine; `local_fn(x [R, H], local_ids [R, k], local_weights [R, k]) -> [R, H]`."""

    name = "deepep"

    def __init__(self, ep=None, num_experts: int | None = None, **_):
        if ep is None:
            raise ValueError("the deepep dispatcher needs expert parallelism: pass ep_size=N under torchrun")
        if ep.ep_size not in (2, 4, 8):
            raise ValueError(f"deepep: DeepEP's one-node kernels run on 2, 4 or 8 ranks per expert group, not {ep.ep_size}")
        if num_experts // ep.ep_size > 128:
            raise ValueError(f"deepep: {num_experts // ep.ep_size} experts per rank; DeepEP's layout kernel takes at most 128")
        self.ep = ep
        self.num_experts = num_experts
        self.num_local = num_experts // ep.ep_size
        self.last_local_rows = 0

    def run(self, hidden, ids, weights, local_fn):
        """hidden [T, H], ids [T, k] global experts, weights [T, k] -> out [T, H] in hidden's dtype."""
        if hidden.shape[1] % 8:
            raise ValueError(f"deepep: hidden size {hidden.shape[1]} must be a multiple of 8 (16-byte rows)")
        if hidden.dtype != torch.bfloat16:
            raise TypeError(f"deepep: DeepEP combines bf16 activations only; this model runs {hidden.dtype} "
                            "(load it with dtype=torch.bfloat16, or use the all2all dispatcher)")
        buffer = _buffer(self.ep.ep_group, hidden.shape[1] * hidden.element_size())
        state = {}
        x, local_ids, local_weights = _Dispatch.apply(hidden, weights, ids, self.num_experts, buffer, state)
        self.last_local_rows = sum(state["counts"])  # DeepEP's host-side per-local-expert counts
        y = local_fn(x, local_ids, local_weights)
        if x.shape[0] == 0 and torch.is_grad_enabled() and x.requires_grad:
            y = y + x.sum() * 0  # keep the dispatch backward (a collective) reachable when no token came here
        return _Combine.apply(y, buffer, state["handle"]).to(hidden.dtype)
