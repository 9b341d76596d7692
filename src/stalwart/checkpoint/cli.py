"""`stalwart ckpt list|verify RUN_DIR`: the checkpoints of a run and their integrity.

Both re-hash every file against its manifest. `verify` exits 1 if any checkpoint is corrupt
(naming it and what is wrong), if an interrupted save left a stray temporary directory (its
writer is dead or on another host; a save in progress is only reported), or if the run has no
valid checkpoint at all. Files a manifest does not list are reported; they are never loaded.
A checkpoint directory may be given instead of a run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.retention import owner_state
from stalwart.errors import UserError

_OWNER = {
    "dead": "its writer is gone: an interrupted save, safe to delete (the next save does)",
    "self": "an interrupted save of this process",
    "alive": "its writer is still running: a save in progress?",
    "unknown": "written on another host or by another tool: check before deleting",
}


def _checkpoints(path: Path) -> tuple[list[Path], Path | None]:
    """(checkpoint dirs, the checkpoints/ root or None when `path` is one checkpoint)."""
    if (path / ck.MANIFEST).is_file() or ck.STEP_RE.match(path.name):
        return [path], None
    root = path / "checkpoints"
    if not root.is_dir():
        raise UserError(f"{path} has no checkpoints/ directory: give a run or checkpoint dir")
    dirs = ck.step_dirs(root)
    if (root / "best").is_dir():
        dirs.append(root / "best")
    return dirs, root


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _row(d: Path, info: ck.CheckpointInfo) -> str:
    m = info.manifest
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created"])) if m else "?"
    val = m.get("val_loss") if m else None
    val_s = f"{val:.4f}" if isinstance(val, float) else "-"
    status = "ok" if info.ok else f"CORRUPT: {info.problem}"
    step = "-" if info.step is None else str(info.step)
    return f"{d.name:<16} {step:>8} {saved:<19} {val_s:>9} {_size(d) / 1e6:>9.2f}MB  {status}"


def run_ckpt(action: str, run_dir: Path) -> int:
    dirs, root = _checkpoints(Path(run_dir))
    if action == "list":
        print(f"{'name':<16} {'step':>8} {'saved':<19} {'val_loss':>9} {'size':>11}  status")
    bad = []
    for d in dirs:
        info = ck.verify(d)
        if not info.ok:
            bad.append(d)
        if action == "list":
            print(_row(d, info))
        elif not info.ok:
            print(f"CORRUPT {d}: {info.problem}")
        if info.unlisted:
            print(
                f"  {d.name}: files not in its manifest, never loaded: {', '.join(info.unlisted)}"
            )
    interrupted = 0
    for t in ck.temp_dirs(root) if root else []:
        owner = owner_state(t)
        interrupted += owner in ("dead", "unknown")
        print(f"stray temporary directory {t} ({_OWNER[owner]})")
    for a in sorted(root.glob("abandoned-*")) if root else []:
        print(f"set aside: {a.name} (newer than a checkpoint a run resumed or rolled back to)")
    ok = len(dirs) - len(bad)
    if action == "verify":
        print(
            f"{ok}/{len(dirs)} checkpoints ok"
            + (f", {len(bad)} corrupt" if bad else "")
            + (
                f", {interrupted} interrupted save(s) left a temporary directory"
                if interrupted
                else ""
            )
        )
        if not dirs:
            print(f"no checkpoints in {run_dir}")
    return 1 if action == "verify" and (bad or not ok or interrupted) else 0
