"""The resume side of checkpointing, as plain functions (resumer.py's Resumer calls them): which
checkpoint to restore, the thread count, the continuity self-check, and checkpoints newer than
the one restored (a discarded future) set aside."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from stalwart.checkpoint import format as ck
from stalwart.errors import UserError

# ----------------------------------------------------------------------------------------------
# Which checkpoint


def resume_candidates(ckpt_root: Path) -> list[Path]:
    """step_* and best/ (a full state too), newest step first; a step_ dir before best/ on a tie."""
    dirs = [(ck.step_of(p), 1, p) for p in ck.step_dirs(ckpt_root)]
    best = Path(ckpt_root) / "best"
    if best.is_dir():
        dirs.append((ck.manifest_step(best) or -1, 0, best))
    return [p for _, _, p in sorted(dirs, key=lambda t: (t[0], t[1]), reverse=True)]


def valid_checkpoints(ckpt_root: Path, report=None) -> Iterator[Path]:
    """Verified checkpoints, newest first; `report(text)` hears about each one skipped."""
    for path in resume_candidates(ckpt_root):
        info = ck.verify(path)
        if info.ok:
            yield path
        elif report is not None:
            report(f"checkpoint {path.name} is not usable ({info.problem}); trying an older one")


def latest_valid_checkpoint(run_dir: Path, report=None) -> Path | None:
    """The newest checkpoint of a run that passes verification."""
    return next(valid_checkpoints(Path(run_dir) / "checkpoints", report), None)


class Chosen(NamedTuple):
    """A checkpoint selected for a resume, read (verified, never unpickled)."""

    path: Path
    model_state: dict
    state: dict


def select_checkpoint(run_dir: Path, mode: str, say: Callable[[str], None]) -> Chosen | None:
    """The checkpoint that run.resume selects, read; None for a fresh start.

    auto: the newest valid checkpoint of `run_dir` (none at all: a fresh start; some, but none
    usable: refused). never: none (refused if `run_dir` holds checkpoints). PATH: that
    checkpoint directory, or the newest valid checkpoint of that run directory. A checkpoint
    that verifies but cannot be parsed (forged, foreign) is skipped for an older one."""
    root = Path(run_dir) / "checkpoints"
    if mode == "never":
        if resume_candidates(root):
            raise UserError(
                f"{run_dir} already holds checkpoints and --run.resume is never: "
                "choose a new --run.dir or resume with --run.resume auto"
            )
        return None
    if mode == "auto":
        chosen = _newest_readable(root, say)
        if chosen is None and resume_candidates(root):
            raise _none_valid_error(run_dir)
        return chosen
    path = Path(mode)
    if not (path / ck.MANIFEST).is_file() and (path / "checkpoints").is_dir():
        chosen = _newest_readable(path / "checkpoints", say)
        if chosen is None:
            raise UserError(f"--run.resume {path}: that run holds no valid checkpoint")
        return chosen
    info = ck.verify(path)
    if not info.ok:
        raise UserError(f"--run.resume {path}: {info.problem}; pick another checkpoint")
    return Chosen(path, *ck.read_checkpoint(path, check=False))


def _newest_readable(ckpt_root: Path, say: Callable[[str], None]) -> Chosen | None:
    for path in valid_checkpoints(ckpt_root, say):
        try:  # verified just now: read without hashing it all again
            return Chosen(path, *ck.read_checkpoint(path, check=False))
        except ck.CheckpointUnreadable as e:
            say(f"{e}; trying an older one")
    return None


def _none_valid_error(run_dir: Path) -> UserError:
    # Starting from scratch over a run's damaged checkpoints would silently throw away its
    # progress (and truncate its records): make a person decide.
    return UserError(
        f"{Path(run_dir) / 'checkpoints'} holds checkpoints but none is usable (see `stalwart "
        f"ckpt verify {run_dir}`): repair or move them away, or start a new --run.dir"
    )


# ----------------------------------------------------------------------------------------------
# The thread count


def adopt_threads(saved: int | None, configured: int) -> list[str]:
    """CPU matmul results depend on the thread count: keep the saved one unless told."""
    now = torch.get_num_threads()
    if saved is None or saved == now:
        return []
    if not configured:
        torch.set_num_threads(saved)
        return [f"threads: {saved} (as saved; --run.threads 0)"]
    return [f"threads: {saved} -> {now} (results will not match an uninterrupted run bit for bit)"]


# ----------------------------------------------------------------------------------------------
# The continuity self-check


def probe_tolerance(saved_precision: str | None, precision: str, loss: float) -> float:
    """How far a restored probe loss may drift without the state being different.

    Same fp32 numerics give the same bits; another thread count or device moves fp32 by ~1e-7
    relative, 16-bit autocast by ~1e-3. A broken restore (untrained or wrong weights, a changed
    model) moves it by far more than these bounds."""
    rel = 1e-4 if saved_precision == precision == "fp32" else 2e-2
    return rel * max(1.0, abs(loss))


def compare_probe(saved: float, now: float, tol: float) -> str:
    if now == saved or (math.isnan(now) and math.isnan(saved)):
        return "exact"
    return "close" if abs(now - saved) <= tol else "mismatch"


class ResumeCheckFailed(UserError):
    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def check_probe(
    path: Path, state: dict, probe: Callable[[], float] | None, precision: str, mode: str
) -> tuple[dict, dict | None]:
    """The fixed probe batch's loss, recomputed from the restored weights, against the loss
    measured when the checkpoint was written: (resume_check record, diagnosis or None).
    mode strict raises ResumeCheckFailed on a mismatch; warn returns a diagnosis."""
    step = int(state["loop"]["step"])
    record = {"event": "resume_check", "step": step, "from": str(path)}
    saved = state.get("probe") or {}
    if mode == "off" or probe is None or "loss" not in saved:
        return {**record, "status": "off" if mode == "off" else "unavailable"}, None
    now = float(probe())
    tol = probe_tolerance(saved.get("precision"), precision, saved["loss"])
    status = compare_probe(saved["loss"], now, tol)
    record.update(saved_loss=saved["loss"], restored_loss=now, tolerance=tol, status=status)
    if status != "mismatch":
        return record, None
    evidence = (
        f"probe-batch loss {now!r} right after restoring {Path(path).name}, {saved['loss']!r} "
        f"when it was saved (tolerance {tol:.2g})"
    )
    if mode == "strict":
        raise ResumeCheckFailed(
            f"resume check failed: {evidence}: the restored state is not the saved one "
            "(changed model code or precision, or a damaged restore); fix that, or pass "
            "--ckpt.resume_check warn to continue anyway",
            {**record, "action": "refused"},
        )
    diagnosis = {
        "event": "diagnosis",
        "step": step,
        "symptom": "restore_mismatch",
        "evidence": evidence,
        "cause": "the restored state differs from the saved one (model code, dtype, precision "
        "or a restore bug): the playbook's 'loss diverges after restore'",
        "fix": "resume with the code and precision that wrote the checkpoint",
    }
    return {**record, "action": "warned"}, diagnosis


def set_aside_newer(ckpt_root: Path, step: int, restored: Path) -> list[Path]:
    """Checkpoints newer than the one restored belong to a discarded future (corrupt ones, or
    those a rollback went back past): rename them `abandoned-NAME-TIME` so that a later resume
    cannot pick them up. Nothing is deleted. Returns the new paths."""
    moved = []
    for path in resume_candidates(ckpt_root):
        newer = ck.manifest_step(path) if path.name == "best" else ck.step_of(path)
        if path != restored and newer is not None and newer > step:
            dest = Path(ckpt_root) / f"abandoned-{path.name}-{int(time.time())}"
            os.rename(path, dest)
            moved.append(dest)
    return moved
