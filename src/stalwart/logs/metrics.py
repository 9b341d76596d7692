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


# ---- Throughput: tokens/s, MFU, HFU and where a step's time goes ---------------------------------


def utilization(flops_per_step: float, step_time_s: float, peak: float | None) -> float | None:
    """Achieved / peak FLOP/s: MFU with model FLOPs, HFU with hardware FLOPs. None without a
    peak (an unknown device gets no number rather than a guess)."""
    if not peak or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / peak


PHASES = ("data_wait", "fwd_bwd", "optim")


class StepTimer:
    """Where the time of the steps of a log interval goes: waiting for data, forward+backward,
    optimizer (unscale, clip, the health check's sync, the update) and overhead (the rest:
    logging, LR, zero_grad, callbacks). Evaluation and checkpoints are not training time (`skip`).

    CPU: perf_counter at each phase boundary (CPU ops are synchronous). CUDA: an event recorded
    on the stream at each boundary and read at the log boundary, after one synchronize: kernels
    run asynchronously, so host timestamps would charge a phase's GPU work to whichever later
    phase happens to wait for it. No sync is ever added per step or per micro-batch.
    """

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.t0 = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.steps, self.excluded = 0, 0.0
        self.sums = dict.fromkeys(PHASES, 0.0)
        self._events: list = []  # CUDA: (phase, start event, end event), read at the boundary
        self._last = None
        self._host_lap = self.t0

    def _now(self):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def step_start(self) -> None:
        self._last = self._now()

    def lap(self, phase: str) -> None:
        """The phase `phase` of this step ended now; the next phase starts now."""
        now = self._now()
        if self.cuda:
            self._events.append((phase, self._last, now))
        else:
            self.sums[phase] += now - self._last
        self._last = now
        self._host_lap = time.perf_counter()
        if phase == PHASES[-1]:
            self.steps += 1

    def skip(self) -> None:
        """The time since this step's last phase ended was not training (eval, checkpoint)."""
        now = time.perf_counter()
        self.excluded += now - max(self._host_lap, self.t0)
        self._host_lap = now

    def read(self) -> dict:
        """Per-step means over the interval, then start the next interval."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # host sync: once per log interval, to read the events
            for phase, a, b in self._events:
                self.sums[phase] += a.elapsed_time(b) / 1000
        now = time.perf_counter()
        n = max(self.steps, 1)
        step_time = max(now - self.t0 - self.excluded, 1e-9) / n
        out = {"steps": self.steps, "step_time_s": step_time}
        for phase in PHASES:
            out[f"{phase}_s"] = self.sums[phase] / n
        busy = sum(out[f"{p}_s"] for p in PHASES)
        out["overhead_s"] = max(step_time - busy, 0.0)
        out["data_wait_frac"] = min(out["data_wait_s"] / step_time, 1.0)
        self.t0 = now
        self._reset()
        return out


def throughput_record(
    timing: dict,
    tokens_per_step: int,
    flops_per_step: float,
    hw_flops_per_step: float,
    peak: float | None,
) -> dict:
    """The metrics.jsonl fields of a log interval from a `StepTimer.read()`."""
    dt = timing["step_time_s"]
    return {
        "tokens_per_sec": tokens_per_step / dt,
        "step_time_s": dt,
        "mfu": utilization(flops_per_step, dt, peak),
        "hfu": utilization(hw_flops_per_step, dt, peak),
        "data_wait_s": timing["data_wait_s"],
        "fwd_bwd_s": timing["fwd_bwd_s"],
        "optim_s": timing["optim_s"],
        "overhead_s": timing["overhead_s"],
        "data_wait_frac": timing["data_wait_frac"],
    }


class Smoothed:
    """Exponential moving average with bias correction (as Adam's moments, and llm.c's tok/s):
    the first values are not dragged towards zero."""

    def __init__(self, decay: float = 0.9):
        self.decay, self._avg, self._n = decay, 0.0, 0

    def add(self, x: float) -> float:
        self._avg = self.decay * self._avg + (1 - self.decay) * x
        self._n += 1
        return self.value

    @property
    def value(self) -> float | None:
        return self._avg / (1 - self.decay**self._n) if self._n else None


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
        self._start_step = start
        self._t0 = time.monotonic()
        self._tps = Smoothed()  # tokens/s as logged (training time only)
        self._step_wall = Smoothed()  # wall seconds per step, eval and checkpoints included
        self._last_wall: tuple[float, int] | None = None

    def start_at(self, step: int) -> None:
        """A resumed run: the ETA counts the steps from here."""
        self._start_step = step

    def update(
        self,
        step: int,
        loss: float,
        tokens_per_sec: float,
        mfu: float | None,
        val_loss: float | None = None,
        data_wait_frac: float | None = None,
    ) -> None:
        if not self.enabled:
            return
        # smoothed, so the display and the ETA do not jump with every noisy step
        tps = self._tps.add(tokens_per_sec) if tokens_per_sec else self._tps.value
        now = time.monotonic()
        since, at = self._last_wall or (self._t0, self._start_step)
        if step > at:
            self._step_wall.add((now - since) / (step - at))
        self._last_wall = (now, step)
        per_step = self._step_wall.value
        eta = per_step * (self.total - step) if per_step is not None else math.inf
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}"]
        if val_loss is not None:
            parts.append(f"val {val_loss:.4f}")
        if tps is not None:
            parts.append(fmt_rate(tps))
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        if data_wait_frac is not None and data_wait_frac >= 0.05:
            parts.append(f"data wait {100 * data_wait_frac:.0f}%")  # the loader is falling behind
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
