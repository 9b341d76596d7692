"""The health monitor's trend detectors: windows over the steps' metrics records.

Constant clipping, an early plateau, repeated batches, overfitting and a throughput drop are
lasting conditions, read from each step's record (plus the batch's hash) after the update: a
condition is diagnosed when it starts, and again only after it has cleared (monitor.py owns the
rate limit and the recording). Every window is in state_dict(), so a resume is exact.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable

from stalwart.config import HealthConfig
from stalwart.health.detectors import (
    clip_evidence,
    diagnosis,
    overfit_evidence,
    plateau_evidence,
    repeat_evidence,
    throughput_evidence,
)

# slow tokens/s records in a row before a drop counts: max(5, half a window). A GC pause or
# a neighbour's burst on a shared host slows a few steps; a loader that falls behind stays slow
MIN_SUSTAIN = 5
EVALS_KEPT = 5


def number(v) -> float | None:
    """A finite float from a record field (records write NaN as the string "nan")."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


class TrendDetectors:
    def __init__(
        self,
        cfg: HealthConfig,
        grad_clip: float,
        emit: Callable[[list, dict], None],
        last_fired: Callable[[str], int | None],
    ):
        """`emit(out, diagnosis)` records a diagnosis; `last_fired(symptom)`: its last step."""
        self.cfg, self.grad_clip, self.emit, self.last_fired = cfg, grad_clip, emit, last_fired
        self.load_state_dict({})

    def observe(self, out, record: dict, digest: str | None = None) -> None:
        step, c = int(record["step"]), self.cfg
        loss, norm = number(record.get("train_loss")), number(record.get("grad_norm"))
        if not record.get("skipped"):  # a skipped step's loss and norm are not the run's
            if loss is not None:
                self.losses.append(loss)
                self.train_sum, self.train_n = self.train_sum + loss, self.train_n + 1
            if norm is not None:
                self.norms.append(norm)
                self.clipped.append(bool(record.get("clipped")))
        if number(record.get("lr")) is not None:
            self.lrs.append(float(record["lr"]))
        if digest:
            self.digests.append(digest)
        # windowed detectors judge a full window that lies after the grace period
        judged = step > c.grace_steps + c.window
        self._condition(out, "repeated_batches", step, repeat_evidence(self.digests))
        clip = clip_evidence(self.clipped, self.norms, self.grad_clip, c.clip_rate, c.clip_factor)
        # clipped while the LR is near zero says nothing about the LR being too high
        lr_high = bool(self.lrs) and max(self.lrs) >= c.plateau_lr
        self._condition(out, "clipping", step, clip if judged and lr_high else None)
        flat = plateau_evidence(list(self.losses), self.lrs, c.plateau_lr)
        self._condition(out, "plateau", step, flat if judged else None)
        tps = number(record.get("tokens_per_sec"))
        if tps is not None:
            self._throughput(out, step, tps, number(record.get("data_wait_frac")))
        val = number(record.get("val_loss"))
        if val is not None:
            train = self.train_sum / self.train_n if self.train_n else (loss or math.nan)
            self.evals = [*self.evals, [step, val, train]][-EVALS_KEPT:]
            self.best_val = min(self.best_val, val)
            self.train_sum, self.train_n = 0.0, 0
            found = overfit_evidence(self.evals, self.best_val)
            self._condition(out, "overfitting", step, found)

    def _throughput(self, out, step: int, tps: float, wait: float | None) -> None:
        base = list(self.tps)
        if len(base) >= 5 and tps < self.cfg.throughput_drop * statistics.median(base):
            self.slow.append(tps)  # kept out of the baseline: a drop must not become normal
        else:
            self.slow.clear()
            self.tps.append(tps)
        found = None
        sustain = max(MIN_SUSTAIN, self.cfg.window // 2)
        if len(self.slow) >= sustain and step > self.cfg.grace_steps:
            found = throughput_evidence(base, self.slow, self.cfg.throughput_drop, wait)
        self._condition(out, "throughput_drop", step, found)

    def _condition(self, out, symptom: str, step: int, found) -> None:
        """A lasting condition is diagnosed when it starts; again only after it has cleared."""
        if not found:
            self.active.discard(symptom)
            return
        if symptom in self.active:
            return
        self.active.add(symptom)
        last = self.last_fired(symptom)
        if last is not None and step - last < self.cfg.window:
            return  # flapping around a threshold: one diagnosis per window is enough
        evidence, cause = found if isinstance(found, tuple) else (found, None)
        self.emit(out, diagnosis(symptom, step, evidence, cause=cause))

    def state_dict(self) -> dict:
        windows = ("losses", "norms", "clipped", "lrs", "digests", "tps", "slow")
        return {
            **{name: list(getattr(self, name)) for name in windows},
            "evals": [list(e) for e in self.evals],
            "best_val": self.best_val,
            "train_sum": self.train_sum,
            "train_n": self.train_n,
            "active": sorted(self.active),
        }

    def load_state_dict(self, d: dict) -> None:
        for name in ("losses", "norms", "clipped", "lrs", "digests", "tps", "slow"):
            setattr(self, name, deque(d.get(name, []), maxlen=self.cfg.window))
        self.evals = [list(e) for e in d.get("evals", [])]
        self.best_val = float(d.get("best_val", math.inf))
        self.train_sum, self.train_n = float(d.get("train_sum", 0.0)), int(d.get("train_n", 0))
        self.active = set(d.get("active", []))
