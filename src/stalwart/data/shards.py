"""Token shards on disk: the writer `prepare` streams into, and the reader the loader samples.

A split (train or val) is a sequence of shard files `{split}-{i:06d}.bin` of raw little-endian
uint16/uint32 ids, each at most `shard_tokens` long; meta.json lists each with its token count
and sha256. Read back, the shards of a split are one token stream (`TokenStream`): memory maps,
so no shard is ever read whole, and a window may straddle two shards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.bin"


class ShardWriter:
    """Appends tokens to a split's shards, cutting a new file every `shard_tokens` tokens.

    `state()` describes what is durably on disk after `sync()`; `ShardWriter(..., state=...)`
    continues from it after a crash (the open shard is cut back to its recorded length)."""

    def __init__(self, dir: Path, split: str, dtype, shard_tokens: int, state: dict | None = None):
        self.dir, self.split, self.dtype = Path(dir), split, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = list(state["shards"]) if state else []
        self._f = None
        self._n = 0
        self._sha = hashlib.sha256()
        self.finished_since_sync = False
        if state and state["open_tokens"]:
            self._reopen(state["open_tokens"])

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._n

    def _path(self) -> Path:
        return self.dir / shard_name(self.split, len(self.shards))

    def _reopen(self, n: int) -> None:
        path = self._path()
        with open(path, "r+b") as f:
            f.truncate(n * self.dtype.itemsize)  # drop what was written after the last sync
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                self._sha.update(chunk)
        self._f, self._n = open(path, "ab"), n

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._f is None:
                self._f, self._n, self._sha = open(self._path(), "wb"), 0, hashlib.sha256()
            take = tokens[: self.shard_tokens - self._n]
            data = memoryview(take).cast("B")  # no copy (tokens may be a view of a spill map)
            self._f.write(data)
            self._sha.update(data)
            self._n += len(take)
            tokens = tokens[len(take) :]
            if self._n == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        entry = {"file": self._path().name, "tokens": self._n, "sha256": self._sha.hexdigest()}
        self.shards.append(entry)
        self._f, self._n = None, 0
        self.finished_since_sync = True

    def sync(self) -> dict:
        """Make everything written so far durable; return the state that resumes from here."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
        self.finished_since_sync = False
        return {"shards": list(self.shards), "open_tokens": self._n}

    def close(self) -> list[dict]:
        if self._f is not None and self._n:
            self._finish()
        elif self._f is not None:
            self._f.close()
            self._path().unlink()
        self._f = None
        return self.shards


def cut_tail(dir: Path, shards: list[dict], dtype, n: int) -> np.ndarray:
    """Remove the last `n` tokens of a split's finished shards (files cut, entries updated in
    place, emptied shards deleted) and return them."""
    dtype, parts = np.dtype(dtype), []
    while n > 0 and shards:
        last = shards[-1]
        path = Path(dir) / last["file"]
        take = min(n, last["tokens"])
        keep = last["tokens"] - take
        parts.append(np.fromfile(path, dtype=dtype, offset=keep * dtype.itemsize))
        if keep:
            with open(path, "r+b") as f:
                f.truncate(keep * dtype.itemsize)
            last.update(tokens=keep, sha256=_file_sha256(path))
        else:
            path.unlink()
            shards.pop()
        n -= take
    return np.concatenate(parts[::-1]) if parts else np.zeros(0, dtype)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


class TokenStream:
    """A split's shards as one read-only token sequence (memory maps)."""

    def __init__(self, paths: list[Path], dtype):
        self.maps = [np.memmap(p, dtype=np.dtype(dtype), mode="r") for p in paths]
        sizes = np.array([len(m) for m in self.maps], dtype=np.int64)
        self.starts = np.concatenate(
            [[0], np.cumsum(sizes)]
        )  # shard i holds [starts[i], starts[i+1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, across shard boundaries when needed."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self.starts[i])
            hi = min(stop, int(self.starts[i + 1])) - int(self.starts[i])
            parts.append(self.maps[i][lo:hi])
            start += hi - lo
            i += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """(len(offsets), length) int64: the windows starting at `offsets`. Windows inside one
        shard are gathered from its map in one indexing per shard; the rare window that
        straddles two shards is read piece by piece."""
        offsets = np.asarray(offsets, dtype=np.int64)
        out = np.empty((len(offsets), length), dtype=np.int64)
        shard = np.searchsorted(self.starts, offsets, side="right") - 1
        local = offsets - self.starts[shard]
        inside = offsets + length <= self.starts[shard + 1]
        for i in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == i))
            out[rows] = self.maps[i][local[rows, None] + np.arange(length)]
        for k in np.flatnonzero(~inside):
            out[k] = self.read(int(offsets[k]), int(offsets[k]) + length)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole split in memory (`np.asarray(stream)`): for held-out splits, which the
        val_tokens cap keeps small; the loader never does this to a train split."""
        return self.read(0, len(self)).astype(dtype or np.int64)

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        return self.read(start, stop)[::step]
