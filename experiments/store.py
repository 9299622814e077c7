"""Atomic, deterministic JSON/text files: write a temporary file beside the target, then os.replace."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers see the old or the new file, never half)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def dumps(obj) -> str:
    """Canonical JSON: sorted keys, two-space indent, trailing newline (byte-stable)."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, dumps(obj))


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)
