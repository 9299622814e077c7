"""Where a number came from: git commit and dirty flag, package versions, GPU, environment flags.

On the device machine the checkout may have no ``.git``; then ``MOE_LAB_GIT_COMMIT`` and
``MOE_LAB_GIT_DIRTY`` (set by whoever launches the run) are recorded instead.
"""
from __future__ import annotations

import importlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "triton", "numpy", "moe_lab", "yaml", "tqdm", "matplotlib")
ENV_PREFIXES = ("CUDA_", "NCCL_", "TORCH_", "NVSHMEM_", "TRITON_", "PYTORCH_", "NVTE_", "OMP_", "MOE_LAB_", "CUBLAS")
ENV_NAMES = ("PYTHONPATH", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def switch_on(value: str | None, default: bool = False) -> bool:
    """How an on/off environment switch reads (as ``triton_kernels._common.switch_on``, which this
    package does not import for it: it needs no Triton): unset -> ``default``, "" / "0" / "false" -> off."""
    return default if value is None else value.strip().lower() not in ("", "0", "false")


def log_level(default: str) -> str:
    """``MOE_LAB_LOG``: the harness's log level when ``--log-level`` is not given. The harness's own
    variables (this one, ``MOE_LAB_GIT_COMMIT``, ``MOE_LAB_GIT_DIRTY``) are read here only; the
    library's behaviour overrides only in ``moe_lab.options``."""
    return os.environ.get("MOE_LAB_LOG", default)


def git_state() -> dict:
    """{"commit": sha or "unknown", "dirty": bool | None, "source": "env" | "git" | "none"}.

    MOE_LAB_GIT_COMMIT, when set by whoever launched the run, wins: a copied checkout (the device
    machine's) may carry a stale `.git` that names another commit."""
    env_commit = os.environ.get("MOE_LAB_GIT_COMMIT")
    if env_commit:
        dirty = os.environ.get("MOE_LAB_GIT_DIRTY")
        return {"commit": env_commit, "dirty": None if dirty is None else switch_on(dirty),
                "source": "env"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit, "dirty": bool(status), "source": "git"}
    return {"commit": "unknown", "dirty": None, "source": "none"}


def versions() -> dict:
    """{package: version or None}, plus where transformers and moe_lab were imported from."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing or broken optional package is just recorded
            out[name] = None
            continue
        out[name] = getattr(mod, "__version__", "unknown")
        if name in ("transformers", "moe_lab", "torch"):
            out[f"{name}_path"] = str(Path(getattr(mod, "__file__", "") or "").parent)
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        out["cuda"] = None
    return out


def gpu_short_name(full: str) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``; ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", full.upper().replace("NVIDIA", ""))
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "", full.lower())[:16] or "gpu"


def hardware() -> dict:
    """{"gpu": short name or "cpu", "gpu_name": full name, "gpu_count": visible count, ...}."""
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            info.update(gpu=gpu_short_name(name), gpu_name=name, gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
            return info
    except Exception:  # noqa: BLE001
        pass
    info.update(gpu="cpu", gpu_name=platform.processor() or "cpu", gpu_count=0)
    return info


def env_flags() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def collect(argv: list[str] | None = None) -> dict:
    """Everything a manifest records about this process."""
    return {"command": list(sys.argv if argv is None else argv), "executable": sys.executable,
            "git": git_state(), "versions": versions(), "hardware": hardware(), "env": env_flags()}
