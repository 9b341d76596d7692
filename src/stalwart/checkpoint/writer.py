"""The writer thread of an asynchronous save, and the set of those still running in this process.

A later run in the same process (tests, experiments) must not read checkpoints an earlier one is
still writing: the resumer joins them all first (`join_writers`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_INFLIGHT: set[threading.Thread] = set()


class Background:
    """One save on a writer thread; its result or error is picked up by the training thread."""

    def __init__(self, job: Callable[[], dict]):
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.blocking_s = 0.0  # what the training thread spent on this save
        # not a daemon: an interpreter exiting (even on an error) finishes the write first
        self.thread = threading.Thread(target=self._run, args=(job,), name="stalwart-ckpt")
        _INFLIGHT.add(self.thread)
        self.thread.start()

    def _run(self, job):
        try:
            self.result = job()
        except BaseException as e:  # handed to the training thread, raised there
            self.error = e
        finally:
            _INFLIGHT.discard(self.thread)


def join_writers() -> None:
    """Wait until every writer thread of this process has finished."""
    for t in list(_INFLIGHT):
        t.join()
