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
