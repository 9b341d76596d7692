"""Token shards on disk: the writer `prepare` streams into, and the reader the loader samples.

A split (train or val) is a sequence of shard files `{split}-{i:06d}.bin` of raw little-endian
uint16/uint32 ids, each at most `shard_tokens` long; meta.json lists each with its token count
and sha256. Read back, the shards of a split are one token stream (`TokenStream`): memory maps,
so no shard is ever read whole, and a window may straddle two shards.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
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


class BackgroundWriter:
    """A ShardWriter fed through a bounded queue by a thread of its own: the file writes and the
    sha256 (both release the GIL) run beside the thread that routes tokens, on another core.
    The same bytes in the same order as writing directly; `sync()` and `close()` first wait for
    everything queued, and a write error (a full disk) is raised in the caller's thread at its
    next call."""

    def __init__(self, writer: ShardWriter, depth: int = 16):
        self.writer, self.queued = writer, writer.tokens
        self._synced = self.queued
        self._q: queue.Queue = queue.Queue(depth)  # bounded: at most `depth` arrays in memory
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"{writer.split}-writer"
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            tokens = self._q.get()
            try:
                if tokens is None:
                    return
                if self._error is None:
                    self.writer.write(tokens)
            except BaseException as e:  # re-raised in the caller's thread
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def tokens(self) -> int:
        return self.writer.tokens if self.queued is None else self.queued

    @property
    def shards(self) -> list[dict]:
        return self.writer.shards

    @property
    def finished_since_sync(self) -> bool:
        """A shard was completed by what was queued since the last sync (known here, not when
        the thread gets to it: the sync points stay where they were)."""
        n = self.writer.shard_tokens
        return self.queued // n > self._synced // n

    def write(self, tokens: np.ndarray) -> None:
        self._check()
        self._q.put(tokens)
        self.queued += len(tokens)

    def sync(self) -> dict:
        self._q.join()
        self._check()
        self._synced = self.queued
        return self.writer.sync()

    def close(self) -> list[dict]:
        self._q.join()
        self._q.put(None)
        self._thread.join()
        self._check()
        self.queued = None  # closed: the writer's own count (its shards may be cut after)
        return self.writer.close()


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
