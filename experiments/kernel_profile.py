"""Which kernels a piece of work runs, by device time: one run of a callable under torch.profiler.

    profile_kernels(run, device) -> {"kernels": [{name, class, ms, calls}], "kernel_classes": {class: ms},
                                     "kernel_total_ms", "profiled_ms"}

``kernels`` are the top ``top`` by total device time (on the CPU: ATen ops by their own CPU time);
``kernel_classes`` sums every kernel into a few classes by name. ``profiled_ms`` is the wall time
of the profiled run (profiler overhead included): a total well below it means the device waited
for the host.
"""
from __future__ import annotations

import collections
import time

# kernel class -> name fragments (lower case), first match wins; anything else is "other"
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "sm90_")),
    ("elementwise", ("elementwise", "unrolled", "vectorized")),
    ("reduce", ("reduce", "norm")),
    ("copy/index", ("copy", "cat", "index", "gather", "scatter", "embedding", "sort", "fill", "memcpy", "memset")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, frags in KERNEL_CLASSES if any(f in low for f in frags)), "other")


def profile_kernels(run, device, top: int = 60) -> dict:
    """Profile one call of ``run()`` (which must wait for the device before it returns)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        wall_ms = (time.perf_counter() - start) * 1e3
    totals: dict = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if device.type == "cuda" and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = totals[evt.name]
        # CPU events nest (an autograd node holds its ATen ops): count each op's own time only
        t[0] += evt.device_time_total / 1e3 if device.type == "cuda" else evt.self_cpu_time_total / 1e3
        t[1] += 1
    kernels = sorted(({"name": n[:200], "class": kernel_class(n), "ms": ms, "calls": c} for n, (ms, c) in totals.items()),
                     key=lambda k: -k["ms"])
    classes: dict = collections.defaultdict(float)
    for k in kernels:
        classes[k["class"]] += k["ms"]
    return {"kernels": kernels[:top], "kernel_classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
            "kernel_total_ms": sum(classes.values()), "profiled_ms": wall_ms}
