"""SIGTERM/SIGINT (preemption, Ctrl-C): finish the current step, save, exit cleanly."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class StopRequest:
    """Remembers the first SIGTERM/SIGINT; the loop agrees on it across ranks at its host sync,
    saves a checkpoint and returns. A second signal kills at once (checkpoints are atomic)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextmanager
    def installed(self):
        previous = {}

        def handler(signum, frame):
            if self.signum is not None:  # a second signal: die now
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            self.signum = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
