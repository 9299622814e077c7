"""Helpers of the multi-process (gloo) tests: a free port, and a router hook that skews routing."""
from __future__ import annotations

import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def force_routing_to_experts_0_and_1(module, inputs, output):
    """Router forward hook: every token picks experts 0 and 1 (so ranks owning others get no row);
    the weights are the router's own probabilities of those experts, so gradients still flow."""
    logits, weights, ids = output
    forced = torch.tensor([0, 1], device=ids.device).expand_as(ids).clone()
    probs = torch.softmax(logits.float(), dim=-1).gather(1, forced)
    return logits, (probs / probs.sum(-1, keepdim=True)).to(weights.dtype), forced


def assert_grads_match_one_process(ours, reference, what: str) -> None:
    """Every parameter gradient of this rank's expert-parallel model equals the one-process
    reference's: an expert shard against its rows of the full gradient (``moe_lab_expert_shard``),
    an FSDP2 shard gathered first, a parameter without a gradient as zeros."""
    ref_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        expected = ref_grads[name].grad
        shard = getattr(param, "moe_lab_expert_shard", None)
        if shard is not None:
            expected = expected[shard[0] : shard[1]]
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        if hasattr(got, "full_tensor"):  # an FSDP2 shard
            got = got.full_tensor()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")
