"""What stays on disk: the ring buffer of step checkpoints, milestones, and the temporary
directories interrupted saves leave behind. best/ is never touched here."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from stalwart.checkpoint import format as ck


def retention_plan(steps: list[int], keep_last: int, milestone_interval: int = 0) -> list[int]:
    """Steps whose checkpoints rotation deletes: all but the newest `keep_last`, milestones
    (multiples of `milestone_interval`) never. The newest is always kept (keep_last >= 1)."""
    ring = set(sorted(steps)[-max(keep_last, 1) :])
    return [
        s
        for s in sorted(steps)
        if s not in ring and not (milestone_interval and s % milestone_interval == 0)
    ]


def rotate(ckpt_root: Path, written: Path, keep_last: int, milestone_interval: int) -> list[str]:
    """Apply the retention plan after `written` was committed. It is the newest step, so it is
    inside the ring: rotation never deletes the only valid checkpoint."""
    dirs = {ck.step_of(p): p for p in ck.step_dirs(ckpt_root)}
    gone = []
    for s in retention_plan(list(dirs), keep_last, milestone_interval):
        if dirs[s] == written:
            continue
        trash = ck.temp_dir_for(dirs[s], "del_")
        os.rename(dirs[s], trash)  # atomic: never a half-deleted step dir that looks real
        shutil.rmtree(trash, ignore_errors=True)
        gone.append(dirs[s].name)
    return gone


def owner_state(path: Path) -> str:
    """Who owns a temporary directory: 'self' | 'dead' | 'alive' | 'unknown' (another host,
    or a name in another format). Only 'self' and 'dead' may be deleted safely."""
    owner = ck.temp_owner(path)
    if owner is None or owner[1] != socket.gethostname():
        return "unknown"
    if owner[0] == os.getpid():
        return "self"
    try:
        os.kill(owner[0], 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    return "alive"


def clean_temps(ckpt_root: Path) -> list[str]:
    """Remove temporary directories of interrupted saves whose writer is this process or is
    provably dead (call it when no save of this process is in flight); others (alive, another
    host) are only reported, by `stalwart ckpt list|verify` and at resume."""
    gone = []
    for t in ck.temp_dirs(ckpt_root):
        if owner_state(t) in ("self", "dead"):
            shutil.rmtree(t, ignore_errors=True)
            gone.append(t.name)
    return gone
