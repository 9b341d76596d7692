"""The run directory's lock: one live `stalwart train` per run directory.

A second `train` on the same directory would append to the same metrics.jsonl and write the
same checkpoints. The lock is `RUN_DIR/.lock`, held with flock(2) by rank 0 for the whole run:
the kernel releases it when the process ends in any way (SIGKILL and crashes included), so no
lock ever outlives its holder. The file records who holds it (pid, host, start time); a
second process is refused with that, and a run that finds a record left by a holder that is
gone (killed, or its machine crashed) takes the lock over and says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from stalwart.errors import UserError

LOCK = ".lock"


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (or refuse: UserError); returns a note when a gone holder's record
        was taken over."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(
                f"{self.run_dir} is in use by another `stalwart train` ({_who(holder)}): wait "
                "for it to end or stop it, or train into another --run.dir"
            ) from None
        left = _read(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        if left:  # its holder is gone, or the lock would still be held
            return f"took over the lock of {self.run_dir}: its holder ({_who(left)}) is gone"
        return None

    def release(self) -> None:
        """Empty the record, then unlock (the file stays: removing it could let two processes
        lock two different files)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else {}
    except (ValueError, OSError):
        return {"pid": "?", "host": "?"}


def _who(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"
