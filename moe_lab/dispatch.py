"""The dispatch stage: where expert-sorted rows go before the expert GEMMs and come back after.

On one process the dispatcher is local (rows stay put). Expert parallelism plugs in here: a
dispatcher that sends each row to the rank owning its expert and returns the results.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .permutation import Permutation


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
