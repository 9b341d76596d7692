"""What `prepare` reports besides the tokens: the progress line and the compressor baselines."""

from __future__ import annotations

import lzma
import sys
import time
import zlib

import numpy as np


class Meter:
    """A status line on stderr every `every` seconds: MB/s, documents/s, tokens/s, ETA."""

    def __init__(self, total_bytes: int | None, every: float = 2.0, enabled: bool = True):
        self.total, self.every, self.enabled = total_bytes, every, enabled
        self.t0 = self.last = time.monotonic()
        self.bytes = self.docs = self.tokens = 0

    def add(self, nbytes: int, docs: int, tokens: int, disk_done: int | None) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            say(self.line(now, disk_done))

    def line(self, now: float, disk_done: int | None = None) -> str:
        dt = max(now - self.t0, 1e-9)
        text = (
            f"{self.bytes / 1e6:,.1f} MB ({self.bytes / 1e6 / dt:.1f} MB/s), "
            f"{self.docs:,} docs ({self.docs / dt:,.0f}/s), "
            f"{self.tokens / 1e6:,.1f}M tokens ({self.tokens / 1e6 / dt:.2f}M/s)"
        )
        if self.total and disk_done:
            left = dt * (self.total / disk_done - 1)
            text += f", ETA {int(left // 60)}m{int(left % 60):02d}s"
        return text


def say(msg: str) -> None:
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


def compressor_baselines(val_sample: bytes, train_byte_counts: np.ndarray) -> dict[str, float]:
    """Bits per byte that general compressors (and a unigram byte model from the train split's
    byte counts) reach on a sample of the held-out text."""
    n = max(len(val_sample), 1)
    counts = train_byte_counts.astype(np.float64) + 1
    logp = np.log2(counts / counts.sum())
    val_counts = np.bincount(np.frombuffer(val_sample, dtype=np.uint8), minlength=256)
    # xz -9's 64 MiB dictionary costs ~670 MB of memory; one no larger than the sample gives the
    # same output for this input at a fraction of it
    dict_size = max(1 << 16, 1 << (n - 1).bit_length())
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": min(dict_size, 64 << 20)}]
    return {
        "gzip-9": 8 * len(zlib.compress(val_sample, 9)) / n,
        "xz-9": 8 * len(lzma.compress(val_sample, format=lzma.FORMAT_XZ, filters=filters)) / n,
        "unigram": float(-(val_counts * logp).sum() / n),
    }
