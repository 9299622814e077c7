"""Real text with nothing to download: the Python standard library's own source files, as bytes.

Every Python ships its standard library as ``.py`` files (``sysconfig.get_paths()["stdlib"]``;
``site-packages`` / ``dist-packages`` below it are skipped). The tokenizer is the identity on bytes
(vocabulary 256: token = byte value), so no tokenizer file is needed either.

Train / held-out split, by file: a file is held out when the first byte of
``sha1(<path relative to the stdlib>)`` is below ``256 * heldout_fraction`` (default 1/10). The
split of a file never depends on which other files exist, so two Python versions agree on every file
they share. Train bytes: the train files in a fixed pseudo-random order (``sha1`` of the path, then
the path), concatenated with a NUL byte between files, up to ``max_train_bytes``. Held-out bytes: the
same for the held-out files, up to ``max_heldout_bytes``.

Batches: ``train_batch(step)`` takes ``batch`` windows of ``seq + 1`` bytes at offsets drawn from a
``torch.Generator`` seeded with ``(seed, step)``, so step ``s`` sees the same tokens in every run with
the same seed and data, whatever the model; ``heldout_batches()`` are fixed, evenly spaced windows.
``describe()`` records the Python version, the stdlib path, file counts, byte counts and a digest of
the file lists and bytes, so a run says exactly which text it trained on.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

VOCAB_SIZE = 256
SEPARATOR = b"\x00"
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _key(rel: str) -> bytes:
    return hashlib.sha1(rel.encode("utf-8")).digest()


def list_files(root: Path | None = None) -> list[str]:
    """Relative paths (POSIX) of every ``.py`` file under the stdlib, sorted."""
    root = Path(root) if root is not None else stdlib_dir()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def is_heldout(rel: str, heldout_fraction: float = 0.1) -> bool:
    """Whether the file at stdlib-relative path ``rel`` is held out (a function of its path alone)."""
    return _key(rel)[0] < int(round(256 * heldout_fraction))


def split_files(files: list[str], heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held-out) relative paths, each in the fixed pseudo-random order (sha1 of the path)."""
    ordered = sorted(files, key=lambda rel: (_key(rel), rel))
    return ([f for f in ordered if not is_heldout(f, heldout_fraction)],
            [f for f in ordered if is_heldout(f, heldout_fraction)])


def _concat(root: Path, files: list[str], limit: int) -> tuple[bytes, list[str]]:
    parts, total, used = [], 0, []
    for rel in files:
        if total >= limit:
            break
        data = (root / rel).read_bytes() + SEPARATOR
        parts.append(data)
        used.append(rel)
        total += len(data)
    return b"".join(parts)[:limit], used


@dataclass
class ByteCorpus:
    """The train and held-out byte streams (see the module docstring)."""

    train: bytes
    heldout: bytes
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return dict(self.info)


def load_corpus(max_train_bytes: int = 4_000_000, max_heldout_bytes: int = 400_000, heldout_fraction: float = 0.1,
                root: str | Path | None = None) -> ByteCorpus:
    """Read the stdlib source into a `ByteCorpus` (a few MB: well under a second)."""
    root = Path(root) if root is not None else stdlib_dir()
    files = list_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: this Python has no standard library sources to train on")
    train_files, heldout_files = split_files(files, heldout_fraction)
    if not train_files or not heldout_files:
        raise ValueError(f"{root}: {len(files)} files give {len(train_files)} train and {len(heldout_files)} held-out "
                         f"files at heldout_fraction={heldout_fraction}")
    train, used_train = _concat(root, train_files, max_train_bytes)
    heldout, used_heldout = _concat(root, heldout_files, max_heldout_bytes)
    digest = hashlib.sha256()
    for name, used, data in (("train", used_train, train), ("heldout", used_heldout, heldout)):
        digest.update(name.encode() + b"\n" + "\n".join(used).encode() + b"\n")
        digest.update(hashlib.sha256(data).digest())
    info = {
        "source": "python-stdlib", "python": sys.version.split()[0], "stdlib": str(root),
        "tokenizer": "bytes (vocab 256)", "heldout_fraction": heldout_fraction,
        "files": len(files), "train_files": len(train_files), "heldout_files": len(heldout_files),
        "train_files_used": len(used_train), "heldout_files_used": len(used_heldout),
        "train_bytes": len(train), "heldout_bytes": len(heldout), "digest": digest.hexdigest()[:16],
    }
    return ByteCorpus(train, heldout, info)


class Batches:
    """Token batches [batch, seq + 1] (int64) from a `ByteCorpus`; inputs = [:, :-1], labels shift inside
    the model (v5 causal LMs take labels = input_ids)."""

    def __init__(self, corpus: ByteCorpus, batch: int, seq: int, seed: int):
        import torch

        self.corpus, self.batch, self.seq, self.seed = corpus, batch, seq, seed
        self._train = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8)
        self._heldout = torch.frombuffer(bytearray(corpus.heldout), dtype=torch.uint8)
        for name, t in (("train", self._train), ("held-out", self._heldout)):
            if t.numel() < seq + 2:
                raise ValueError(f"{name} text has {t.numel()} bytes, fewer than one window of seq={seq}")

    def train_batch(self, step: int):
        """[batch, seq] int64: the windows of step ``step`` for this seed (independent of the model)."""
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self._train.numel() - self.seq, (self.batch,), generator=gen)
        return torch.stack([self._train[s:s + self.seq] for s in starts.tolist()]).long()

    def heldout_batches(self, count: int) -> list:
        """``count`` batches [batch, seq] of evenly spaced held-out windows (the same in every run)."""
        import torch

        n = count * self.batch
        span = self._heldout.numel() - self.seq
        starts = [int(i * span / max(n, 1)) for i in range(n)]
        rows = torch.stack([self._heldout[s:s + self.seq] for s in starts]).long()
        return list(rows.split(self.batch))
