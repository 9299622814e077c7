"""Measured "auto" decisions kept on disk, so a new process does not time the candidates again.

One JSON file, ``auto-decisions.json`` in ``Options.auto_cache_dir`` (default ``~/.cache/moe_lab``);
``Options(auto_cache=False)`` neither reads nor writes it (process settings: the last model built sets
them; benchmarks: ``MOE_LAB_AUTO_CACHE`` / ``MOE_LAB_CACHE_DIR`` through ``Options.from_environment``).
An entry's key is everything the choice
depends on: the GPU's name, the layer geometry (family, experts spec, routing features, weight
shape), dtype, token bucket, forward or forward+backward, the candidate labels, for a decision made
under CUDA graphs (graph-safe candidates replayed against all run eagerly) what it compared, and a fingerprint
of the code and libraries that ran (torch, triton and moe_lab versions, and a hash of the sources of
`triton_kernels/`, `moe_lab/stages/`, `moe_lab/lora/` and `moe_lab/auto.py`): any change to those makes every old entry a miss, so a
stale file can only cost a measurement, never pick from old timings. Writes are atomic
(read, merge, ``os.replace``); two processes writing at once may lose one entry (measured again later).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

FILE_NAME = "auto-decisions.json"
DEFAULT_DIR = Path.home() / ".cache" / "moe_lab"


def path() -> Path | None:
    """The cache file under the process settings in force, or None when the cache is off."""
    from .options import current_auto_cache

    on, directory = current_auto_cache()
    return Path(directory or DEFAULT_DIR) / FILE_NAME if on else None


def fingerprinted_sources() -> list[Path]:
    """The source files whose text is part of the fingerprint: whatever decides or runs a candidate."""
    here = Path(__file__).resolve().parent
    return (sorted((here / "stages").glob("*.py")) + sorted((here / "lora").glob("*.py")) + [here / "auto.py"]
            + sorted((here.parent / "triton_kernels").glob("*.py")))


@functools.cache
def fingerprint() -> str:
    """Versions and a hash of the kernel and stage sources (computed once per process)."""
    import torch

    digest = hashlib.sha256()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    for source in fingerprinted_sources():
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    from . import __version__

    return json.dumps({"torch": torch.__version__, "triton": triton_version, "moe_lab": __version__,
                       "sources": digest.hexdigest()[:16]}, sort_keys=True)


def _canonical(value):
    """A JSON-able form that is the same in every process (sets sorted: string hashing is salted)."""
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if isinstance(value, (tuple, list)):
        return [_canonical(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def key_of(gpu: str, geometry: tuple, dtype, bucket: int, backward: bool, labels, graphs: str | None = None) -> str:
    """geometry: the layer's (family, experts spec, routing features, weight shape). graphs: what a
    decision under CUDA graphs compared (`auto.GRAPHS_REPLAYED`), None for a plain decision (its key has
    no "graphs" field): the two never share an entry."""
    key = {"gpu": gpu, "geometry": _canonical(geometry), "dtype": str(dtype), "bucket": bucket, "backward": backward,
           "candidates": sorted(labels), "code": fingerprint()}
    if graphs is not None:
        key["graphs"] = graphs
    return json.dumps(key, sort_keys=True)


def _read(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("moe_lab auto: ignoring the decision cache %s (%s)", file, exc)
        return {}


def load(key: str) -> dict | None:
    """The stored entry {"chosen": label, "times_ms": {...}, "tokens", "backward", "measured_at"} or None;
    under CUDA graphs also "replayed_ms" {...}, "replay_failed" {label: error} and "graphed"."""
    file = path()
    return None if file is None else _read(file).get(key)


def store(key: str, entry: dict) -> None:
    file = path()
    if file is None:
        return
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(file)
        entries[key] = {**entry, "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, file)
    except OSError as exc:  # a read-only home: the decision still holds for this process
        logger.warning("moe_lab auto: could not write the decision cache %s (%s)", file, exc)
