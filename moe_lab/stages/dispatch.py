"""The dispatch stage: where expert-sorted rows go before the expert GEMMs and come back after.

On one process the dispatcher is local (rows stay put). Under expert parallelism `all2all` sends
each row to the rank owning its expert with `all_to_all_single` (uneven splits; the backward of a
send is the reverse send) and the results back; `deepep` (moe_lab.parallel.deepep) moves tokens
with DeepEP's NVLink kernels and runs the other stages on what arrives (token-level).

A dispatcher is a class built once per layer: `.dispatch(x, perm) -> Dispatched`,
`.combine(y, dispatched) -> y`; or token-level: `.run(hidden, ids, weights, local_fn) -> out [T, H]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..registry import Capabilities, register_stage
from ..parallel.deepep import DeepEPDispatcher, why_deepep_unavailable
from .permute import Permutation

if TYPE_CHECKING:
    from ..parallel.expert_parallel import ExpertParallelContext


@dataclass
class Dispatched:
    """Rows as the local experts see them: x [S_local, H], counts [E_local], offsets [E_local] int32,
    and `handle`, whatever the dispatcher needs to bring the results back."""

    x: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    handle: object = None


class LocalDispatcher:
    """Every expert lives in this process: dispatch and combine are the identity."""

    name = "local"

    def __init__(self, **context):
        pass

    def dispatch(self, x: torch.Tensor, perm: Permutation) -> Dispatched:
        return Dispatched(x, perm.counts, perm.offsets)

    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return y


# ---- all2all: torch.distributed all_to_all_single between the ranks of the ep group ----------
class _AllToAll(torch.autograd.Function):
    """rows [sum(send_splits), H] -> [sum(recv_splits), H]; backward sends the gradient back."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty(sum(send_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(rows, send_splits, recv_splits, group)


class AllToAllDispatcher:
    """Send expert-sorted rows to the ranks owning their experts, and the results back."""

    name = "all2all"

    def __init__(self, ep: ExpertParallelContext | None = None, num_experts: int | None = None, **_):
        if ep is None:
            raise ValueError("the all2all dispatcher needs expert parallelism: pass ep_size=N under torchrun")
        self.ep = ep
        self.num_local = num_experts // ep.ep_size
        self.last_local_rows = 0

    def dispatch(self, x: torch.Tensor, perm: Permutation) -> Dispatched:
        """x [S, H] sorted by global expert -> local rows [S_local, H] sorted by local expert."""
        ep, local = self.ep, self.num_local
        send_counts = perm.counts.view(ep.ep_size, local)  # [dst rank, local expert]
        recv_counts = torch.empty_like(send_counts)  # [src rank, local expert]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=ep.ep_group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all(x, send_splits, recv_splits, ep.ep_group)  # grouped by source rank
        order = _by_local_expert(recv_counts, received.shape[0])
        counts = recv_counts.sum(0)
        self.last_local_rows = received.shape[0]  # rows this rank's experts got (for tests and traces)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return Dispatched(received[order], counts, offsets, handle=(order, send_splits, recv_splits))

    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """y [S_local, H] in local-expert order -> [S, H] back on the source ranks, in their order."""
        order, send_splits, recv_splits = dispatched.handle
        y = _connected(y, dispatched.x)
        return all_to_all(y[_inverse(order)], recv_splits, send_splits, self.ep.ep_group)


def _by_local_expert(recv_counts: torch.Tensor, rows: int) -> torch.Tensor:
    """recv_counts [src rank, local expert] of rows received grouped by source rank -> the order [rows]
    that sorts them by local expert, then source rank."""
    ranks, local = recv_counts.shape
    expert_of_row = torch.repeat_interleave(torch.arange(local, device=recv_counts.device).repeat(ranks),
                                            recv_counts.flatten(), output_size=rows)
    return torch.argsort(expert_of_row, stable=True)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def _connected(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """When no row reached this rank's experts, `y` may not be connected to the received rows `x`;
    connect it, or this rank would skip the backward all-to-alls the other ranks wait in."""
    if y.shape[0] == 0 and torch.is_grad_enabled() and x.requires_grad:
        return y + x.sum() * 0
    return y


# ---- all2all_overlap: the all-to-alls of one chunk of tokens beside the experts of another -----
class OverlappedAllToAllDispatcher(AllToAllDispatcher):
    """`all2all` in `chunks` pipelined chunks of tokens: every chunk's rows are sent at once
    (asynchronous functional collectives), then chunk c's experts run while the later chunks' rows
    are still in flight and chunk c-1's results travel back. Same result as `all2all` (each token's
    rows are computed by the same experts; only the grouping of the GEMMs changes).

    Layer-level (`pipelined`): `run_routed_experts` hands it the permutation, experts and combine
    stages, since the chunks interleave them. A received tensor is waited for where it is first used
    (`torch.distributed._functional_collectives`: on CUDA the compute stream waits for the NCCL
    stream there; on gloo the transfer runs in the process group's worker thread). The backward
    sends each chunk's gradients with the same collectives; autograd orders the chunks' backward."""

    name = "all2all_overlap"
    pipelined = True

    def __init__(self, ep: ExpertParallelContext | None = None, num_experts: int | None = None, chunks: int = 2, **_):
        super().__init__(ep, num_experts)
        if chunks < 1:
            raise ValueError(f"all2all_overlap: chunks must be >= 1, not {chunks}")
        self.chunks = chunks

    def run_pipelined(self, hidden, ids, weights, permute, experts, combine) -> torch.Tensor:
        """hidden [T, H], ids [T, k], weights [T, k] -> [T, H].
        permute(hidden_c, ids_c) -> (rows, Permutation); experts(x, counts, offsets) -> y;
        combine(y, perm, weights_c) -> [T_c, H]. Every rank runs `chunks` chunks (some may be empty)."""
        from torch.distributed import _functional_collectives as funcol

        ep, local, group = self.ep, self.num_local, self.ep.ep_group
        T = hidden.shape[0]
        edges = [T * c // self.chunks for c in range(self.chunks + 1)]
        parts = [(hidden[a:b], ids[a:b], weights[a:b]) for a, b in zip(edges, edges[1:])]
        permuted = [permute(h, i) for h, i, _ in parts]
        # one exchange of every chunk's counts: [dst rank, chunk, local expert]
        send_counts = torch.stack([p.counts.view(ep.ep_size, local) for _, p in permuted], 1)
        recv_counts = torch.empty_like(send_counts)  # [src rank, chunk, local expert]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
        send_splits = send_counts.sum(2).T.tolist()  # [chunk][dst rank]
        recv_splits = recv_counts.sum(2).T.tolist()  # [chunk][src rank]
        in_flight = [funcol.all_to_all_single_autograd(rows.contiguous(), recv_splits[c], send_splits[c], group)
                     for c, (rows, _) in enumerate(permuted)]
        returning = []
        for c, received in enumerate(in_flight):
            counts_c = recv_counts[:, c]  # [src rank, local expert]
            order = _by_local_expert(counts_c, sum(recv_splits[c]))
            x = received[order]  # waits for this chunk's rows only
            counts = counts_c.sum(0)
            y = _connected(experts(x, counts, torch.cumsum(counts, 0).to(torch.int32)), x)
            returning.append(funcol.all_to_all_single_autograd(y[_inverse(order)].contiguous(), send_splits[c],
                                                              recv_splits[c], group))
        self.last_local_rows = sum(map(sum, recv_splits))
        outs = [combine(back, perm, w) for back, (_, perm), (_, _, w) in zip(returning, permuted, parts)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]


# ---- registrations ---------------------------------------------------------------------------
register_stage("dispatch", "local", LocalDispatcher, description="all experts in this process",
               caps=Capabilities(graph_safe=True, expert_parallel=False))
register_stage("dispatch", "all2all", AllToAllDispatcher, description="torch.distributed all_to_all_single, uneven splits")
register_stage("dispatch", "all2all_overlap", OverlappedAllToAllDispatcher,
               description="all2all in two pipelined chunks: one chunk's all-to-all beside another's experts",
               caps=Capabilities(traceable=False))
register_stage("dispatch", "deepep", DeepEPDispatcher, why_deepep_unavailable,
               description="DeepEP fused NVLink all-to-all (token-level: moves tokens, the other stages run on what arrives)",
               caps=Capabilities(devices=frozenset({"cuda"}), dtypes={"cuda": frozenset({torch.bfloat16})},
                                 token_level=True, traceable=False))
