"""Where input checks run: on the host (a clear ValueError) or on the device (no waiting)."""
from __future__ import annotations

from typing import Callable

import torch


def check_on_host(t: torch.Tensor) -> bool:
    """Whether a check may read ``t`` on the host. Always on the CPU; on a GPU only with
    ``Options(host_checks=True)``, since each read makes the host wait for the device (one wait per MoE
    layer, in a forward the host already paces). Without it, GPU checks are device-side
    assertions: a bad value stops the process at the next synchronisation, before any kernel uses it.
    Under ``torch.compile`` / ``torch.export`` the check is always the assertion, a node of the graph."""
    from .options import current_host_checks

    if torch.compiler.is_compiling():  # a host read would be a data-dependent guard: the graph asserts instead
        return False
    return t.device.type == "cpu" or current_host_checks()


def require_all(ok: torch.Tensor, message: str, found: Callable[[], str]) -> None:
    """Every element of the bool tensor ``ok`` must be true: on the host a ValueError
    ``"{message}; {found()}"`` (``found`` names the offending values), else a device-side assertion."""
    if check_on_host(ok):
        if not bool(ok.all()):
            raise ValueError(f"{message}; {found()}")
    else:
        torch._assert_async(ok.all(), message)
