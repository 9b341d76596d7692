"""Learning-rate schedules: pure functions of the step, so a resume needs only the step counter.

The lesson prefers an explicit `lr_at` over a torch scheduler object: the LR at every step is
known, and scheduler state cannot drift or reset across restarts.
"""

from __future__ import annotations

import math

from stalwart.config import OptimConfig, ScheduleConfig


def lr_at(step: int, peak_lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup to `peak_lr`, cosine decay to `min_lr` at `total`, `min_lr` after."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if step > total:
        return min_lr
    ratio = (step - warmup) / max(total - warmup, 1)  # in [0, 1]
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (peak_lr - min_lr)


def constant_lr(step: int, peak_lr: float, warmup: int) -> float:
    """Constant LR (with the same linear warmup when warmup > 0): the lesson's baseline."""
    return peak_lr * (step + 1) / warmup if step < warmup else peak_lr


def wsd_lr(
    step: int, peak_lr: float, warmup: int, total: int, min_lr: float, decay_frac: float
) -> float:
    """Warmup-stable-decay: warmup, hold the peak, then decay linearly over the last
    `decay_frac` of the run (MiniCPM, DeepSeek). The stable phase can be extended freely."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    decay_start = total - int(decay_frac * total)
    if step < decay_start:
        return peak_lr
    if step >= total:
        return min_lr
    ratio = (step - decay_start) / max(total - decay_start, 1)
    return peak_lr + ratio * (min_lr - peak_lr)


def schedule_lr(sched: ScheduleConfig, optim: OptimConfig, step: int, total: int) -> float:
    """The LR of `step` for the configured schedule (the one the loop, plots and tests use)."""
    if sched.name == "constant":
        return constant_lr(step, optim.lr, sched.warmup_steps)
    if sched.name == "wsd":
        return wsd_lr(step, optim.lr, sched.warmup_steps, total, optim.final_lr, sched.decay_frac)
    return lr_at(step, optim.lr, sched.warmup_steps, total, optim.final_lr)
