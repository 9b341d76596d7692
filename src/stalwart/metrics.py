"""Run records and what a person sees: metrics.jsonl, the progress bar, tokens/s and MFU.

metrics.jsonl has one JSON object per line. Floats go through json (which writes `repr`, the
shortest string that round-trips), so two runs can be compared bit for bit from their records.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _clean(v: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings a reader can turn back into floats."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


class MetricsLog:
    """Append-only metrics.jsonl; each record is flushed so a crash loses at most one line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self._f = open(self.path, "a") if enabled else None  # noqa: SIM115 (lives with the run)

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(_clean(record)) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: Path) -> list[dict]:
    """Records of a run (a torn last line from a crash is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_after(path: Path, step: int) -> None:
    """On resume from step s, drop records of steps > s that a killed run wrote after saving,
    so metrics.jsonl reads as one continuous run (the dropped steps are replayed exactly)."""
    p = Path(path)
    if not p.is_file():
        return
    keep = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, p)


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(seconds)
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def fmt_rate(tps: float) -> str:
    if tps >= 1e6:
        return f"{tps / 1e6:.2f}M tok/s"
    if tps >= 1e3:
        return f"{tps / 1e3:.1f}k tok/s"
    return f"{tps:.0f} tok/s"


class Progress:
    """A one-line progress bar on a terminal; plain periodic lines otherwise (logs, CI)."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        plain_every_s: float = 10.0,
    ):
        self.total, self.stream = total, stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._last_plain = -math.inf
        self._smooth_tps = None
        self._start_step = start
        self._t0 = time.monotonic()

    def update(
        self,
        step: int,
        loss: float,
        tokens_per_sec: float,
        mfu: float | None,
        val_loss: float | None = None,
    ) -> None:
        if not self.enabled:
            return
        # exponential smoothing: the ETA should not jump with every noisy step
        a = 0.1
        self._smooth_tps = (
            tokens_per_sec
            if self._smooth_tps is None
            else ((1 - a) * self._smooth_tps + a * tokens_per_sec)
        )
        elapsed = time.monotonic() - self._t0
        done = step - self._start_step
        eta = elapsed / done * (self.total - step) if done > 0 else math.inf
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}"]
        if val_loss is not None:
            parts.append(f"val {val_loss:.4f}")
        parts.append(fmt_rate(self._smooth_tps))
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        parts.append(f"ETA {fmt_duration(eta)}")
        text = " | ".join(parts)
        if self.tty:
            width = 24
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {text}\033[K")
            self.stream.flush()
        elif (
            val_loss is not None
            or step == self.total
            or (time.monotonic() - self._last_plain >= self.plain_every_s)
        ):
            self._last_plain = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar (diagnoses, checkpoints)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
