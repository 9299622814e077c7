"""Where input checks run: on the host (a clear ValueError) or on the device (no waiting)."""
from __future__ import annotations

import os

import torch


def check_on_host(t: torch.Tensor) -> bool:
    """Whether a check may read ``t`` on the host. Always on the CPU; on a GPU only with
    ``MOE_LAB_HOST_CHECKS=1``, since each read makes the host wait for the device (one wait per MoE
    layer cost ~10 ms of a 90 ms step on the H200). Without it, GPU checks are device-side
    assertions: a bad value stops the process at the next synchronisation, before any kernel uses it."""
    return t.device.type == "cpu" or os.environ.get("MOE_LAB_HOST_CHECKS", "0") not in ("", "0")
