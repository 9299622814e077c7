"""What autograd keeps for backward, for the memory tests."""
from __future__ import annotations

import torch


def saved_bytes(fn, exclude=()):
    """(fn()'s output, bytes of the distinct storages autograd saves while running it): every storage
    counted once; those of `exclude` (parameters, frozen weights) not counted, a copy of one is."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())
