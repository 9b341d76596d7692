"""Fault injection (`debug.*`): the playbook's symptoms, provoked on purpose for tests and demos.

Each fault wraps a component at build time (the Trainer calls `install`), so the loop's text
shows only what a real run does:

    loader            debug.slow_data_ms (a loader that falls behind), debug.repeat_batches
                      (a loader stuck on one batch: the 'same batches' plateau)
    forward/backward  debug.inject_nan_at_step / inject_spike_at_step (a bad batch: loss and
                      gradients hit), debug.forget_accum_division (the lesson's accumulation bug)
    evaluation        debug.pause_in_eval_s (a marked window in which to kill the process)
    resume            debug.drop_optimizer_state_on_resume (a resume that forgets Adam's moments)

The save's half-written window (debug.pause_in_save_s) is the saver's `pause` argument.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from stalwart.config import DebugConfig


def pause(seconds: float, where: str) -> None:
    """debug.pause_in_*_s (tests, demos only): a marked window in which to kill the process."""
    if seconds > 0:
        print(f"debug: pausing {seconds}s in {where}", file=sys.stderr, flush=True)
        time.sleep(seconds)


class LoaderFault:
    """A loader seen through a fault: reads and `position` go to the real loader (checkpoints,
    the doctor's rollback and the detectors see its true state)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def position(self) -> int:
        return self.inner.position

    @position.setter
    def position(self, value: int) -> None:
        self.inner.position = value


class SlowLoader(LoaderFault):
    """debug.slow_data_ms: every batch fetch sleeps (the playbook's 'throughput drops')."""

    def __init__(self, inner, ms: float):
        super().__init__(inner)
        self.ms = ms

    def next(self):
        time.sleep(self.ms / 1000)
        return self.inner.next()


class RepeatingLoader(LoaderFault):
    """debug.repeat_batches: the loader never advances (a data-order bug: the same batch)."""

    def next(self):
        batches = self.inner.next()
        self.inner.position -= 1
        return batches


def wrap_loader(loader, debug: DebugConfig):
    if debug.slow_data_ms:
        loader = SlowLoader(loader, debug.slow_data_ms)
    if debug.repeat_batches:
        loader = RepeatingLoader(loader)
    return loader


def wrap_forward_backward(fwd_bwd: Callable, debug: DebugConfig, loader, model, rank: int):
    """debug.inject_*: after forward/backward of the batch at a given loader position, multiply
    the loss and every gradient by NaN (inject_nan) or 1e3 (inject_spike), as a bad batch or an
    overflow would. Keyed to the batch, not the step: a bad batch stays bad, and a rollback
    that skips its data window never sees it again."""
    # NaN wins where both name the same batch
    factors = {debug.inject_spike_at_step: 1e3, debug.inject_nan_at_step: float("nan")}
    factors.pop(-1, None)
    if not factors or debug.inject_rank not in (-1, rank):
        return fwd_bwd

    def faulty(batches) -> torch.Tensor:
        loss = fwd_bwd(batches)
        factor = factors.get(loader.position)  # 1-based: the batch just taken
        if factor is None:
            return loss
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        return loss * factor

    return faulty


def wrap_evaluate(evaluate: Callable, debug: DebugConfig, step: Callable[[], int]):
    if debug.pause_in_eval_s <= 0:
        return evaluate

    def paused(*args, **kwargs):
        pause(debug.pause_in_eval_s, f"evaluation at step {step()}")
        return evaluate(*args, **kwargs)

    return paused


def wrap_resume(resume: Callable, debug: DebugConfig, optimizer):
    if not debug.drop_optimizer_state_on_resume:
        return resume

    def forgetful():
        path = resume()
        if path is not None:
            optimizer.state.clear()  # a resume that forgets Adam's moments (the playbook)
        return path

    return forgetful


def accum_divisor(grad_accum: int, debug: DebugConfig) -> int:
    """debug.forget_accum_division (demo only): the lesson's bug, effective LR x grad_accum."""
    return 1 if debug.forget_accum_division else grad_accum
