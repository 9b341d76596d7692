"""Typed callbacks: how tests, `bench` and the experiments watch a run from outside the loop.

They receive the Trainer (trainer.py), whose parts are all reachable (`trainer.model`,
`.optimizer`, `.loader`, `.loop`, `.cfg`, ...); they never change the loop's text.
"""

from __future__ import annotations


class Callback:
    """Watch a run from outside the loop (tests, bench, experiments). The trainer's parts are
    reachable from `trainer`; a callback may raise to end the run (a simulated crash)."""

    def on_run_start(self, trainer) -> None:
        """Once every part is built and resumed, before the first step of this process."""

    def on_step_end(self, trainer, record: dict) -> None:
        """After step 7 of every optimizer step; `record` is that step's metrics record."""


class AfterStep(Callback):
    """A callback made of a function `fn(step, record)`, called after every optimizer step."""

    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, trainer, record: dict) -> None:
        self.fn(trainer.loop.step, record)
