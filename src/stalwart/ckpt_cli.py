"""`stalwart ckpt list|verify RUN_DIR`: the checkpoints of a run and their integrity."""

from __future__ import annotations

import time
from pathlib import Path

from stalwart import checkpoint as ck
from stalwart.errors import UserError


def _all_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        raise UserError(f"{run_dir} has no checkpoints/ directory: is it a run directory?")
    dirs = ck.step_dirs(root)
    if (root / "best").is_dir():
        dirs.append(root / "best")
    return dirs


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run_ckpt(action: str, run_dir: Path) -> int:
    dirs = _all_checkpoints(run_dir)
    stray = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(ck.TMP_PREFIX)]
    bad = 0
    if action == "list":
        print(f"{'name':<16} {'step':>8} {'saved':<19} {'val_loss':>9} {'size':>10}  status")
    for d in dirs:
        info = ck.verify(d)
        bad += not info.ok
        status = "ok" if info.ok else f"CORRUPT: {info.problem}"
        if action == "list":
            m = info.manifest
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created"])) if m else "?"
            val = m.get("best_val") if m else None
            val_s = f"{val:.4f}" if isinstance(val, float) and val < float("inf") else "-"
            print(
                f"{d.name:<16} {str(info.step or '-'):>8} {saved:<19} {val_s:>9} "
                f"{_size(d) / 1e6:>8.2f}MB  {status}"
            )
        elif not info.ok:
            print(f"CORRUPT {d}: {info.problem}")
    for p in stray:
        print(f"stray temporary directory {p} (an interrupted save; safe to delete)")
    if action == "verify":
        print(f"{len(dirs) - bad}/{len(dirs)} checkpoints ok" + (f", {bad} corrupt" if bad else ""))
    return 1 if (bad and action == "verify") else 0
