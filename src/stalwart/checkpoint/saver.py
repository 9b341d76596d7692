"""Saving checkpoints in the loop: when (interval, minutes, end of run, SIGTERM, best/), the write
(on a writer thread with ckpt.async_save), best/ linked to the step's files, rotation, and one
record per save. The loop needs a few lines (see trainer.py):

    saver = CheckpointSaver(cfg.ckpt, run_dir, parts, backend, config=to_dict(cfg), ...)
    saver.restored(path)              # after a resume or a rollback: the newest good checkpoint
    saver.attach_log(log)
    saver.request_best()              # after an evaluation that improved the best val loss
    outcome = saver.maybe_save(step, force=..., val_loss=...)   # -> SaveResult
    saver.close()                     # waits for an asynchronous save; surfaces its error

A save that finds NaN/Inf weights writes nothing: the newest checkpoint stays the last good one,
and the result says so (`outcome.refused`). The doctor acts on it (health/recovery.py).
The on-disk format and its atomicity live in format.py; what a checkpoint holds, in state.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stalwart import parallel
from stalwart.checkpoint import format as ck
from stalwart.checkpoint import retention as ckpt_retention
from stalwart.checkpoint.backend import Captured, DistributedBackend, LocalBackend
from stalwart.checkpoint.state import TrainParts
from stalwart.checkpoint.writer import Background
from stalwart.config import CkptConfig
from stalwart.errors import UserError


@dataclass
class SaveResult:
    """What `maybe_save` did at `step`: nothing due (no targets), a save (written, or being
    written on the writer thread), or a refusal: the weights hold NaN/Inf, nothing written."""

    step: int
    targets: list[Path] = field(default_factory=list)  # step_* and/or best/ due at this step
    nonfinite: list[str] = field(default_factory=list)  # the weight tensors holding NaN/Inf

    @property
    def due(self) -> bool:
        """A save was due (and took the training thread's time), written or refused."""
        return bool(self.targets)

    @property
    def refused(self) -> bool:
        return bool(self.nonfinite)

    @property
    def evidence(self) -> str:
        bad = self.nonfinite
        return f"{len(bad)} weight tensors hold NaN/Inf ({', '.join(bad[:3])}); not saved"


def tokenizer_files(data_dir: Path) -> dict[str, Path]:
    """Files a checkpoint carries besides the state: the dataset's tokenizer, when it has one
    (sampling then needs nothing else)."""
    tok = Path(data_dir) / "tokenizer.json"
    return {"tokenizer.json": tok} if tok.is_file() else {}


class CheckpointSaver:
    def __init__(
        self,
        cfg: CkptConfig,
        run_dir: Path,
        parts: TrainParts,
        backend: LocalBackend | DistributedBackend,
        *,
        config: dict,
        data_meta: dict | None = None,
        extra_files: dict[str, Path] | None = None,
        probe: Callable[[], float] | None = None,
        precision: str = "fp32",
        say: Callable[[str], None] = print,
        pause: Callable[[Path], None] | None = None,
    ):
        """`config`: the run's resolved config as a dict (stored in every checkpoint);
        `extra_files`: name -> file copied into each checkpoint (tokenizer_files); `probe`:
        the continuity probe's loss, stored for the resume check; `pause(tmp)`: called once
        a save's files are written, before its commit (debug.pause_in_save_s)."""
        self.cfg, self.parts, self.backend = cfg, parts, backend
        self.root = Path(run_dir) / "checkpoints"
        self.config, self.data_meta = config, data_meta or {}
        self.extra_files = extra_files or {}
        self.probe, self.precision, self.say, self.pause = probe, precision, say, pause
        self.last_good: Path | None = None  # newest checkpoint known valid (written or restored)
        self.log = None
        self._best_pending = False
        self._bg: Background | None = None
        self._pool: dict[str, torch.Tensor] = {}  # async snapshot buffers, reused every save
        self._last_save = time.monotonic()

    def attach_log(self, log) -> None:
        """Where the checkpoint records go (metrics.jsonl); before the first save."""
        self.log = log

    def restored(self, path: Path) -> None:
        """A resume or a rollback restored `path`: the newest good checkpoint now."""
        self.last_good, self._best_pending = path, False

    # ---- when ----------------------------------------------------------------------------------

    def request_best(self) -> None:
        """The last evaluation is the best so far: best/ gets this step's state at maybe_save."""
        self._best_pending = True

    def due(self, step: int) -> bool:
        c = self.cfg
        if c.interval and step % c.interval == 0:
            return True
        if not c.interval_minutes:
            return False
        late = (time.monotonic() - self._last_save) / 60 >= c.interval_minutes
        # every rank must decide alike (a collective save on some ranks only would hang), and
        # their clocks differ: one small all-reduce, only when interval_minutes is set
        return parallel.any_rank(late, self.backend.ctx)

    def maybe_save(
        self, step: int, *, force: bool = False, val_loss: float | None = None
    ) -> SaveResult:
        """Save if an interval is due, `force` (end of run, SIGTERM) or best/ was requested."""
        self.poll()
        targets = [ck.step_dir(self.root, step)] if force or self.due(step) else []
        if self._best_pending:
            targets.append(self.root / "best")
            self._best_pending = False
        if not targets:
            return SaveResult(step)
        return self.save(targets, val_loss)

    # ---- the save ------------------------------------------------------------------------------

    def save(self, targets: list[Path], val_loss: float | None = None) -> SaveResult:
        """Write the state now into targets[0] (the others link to it)."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        loop = self.parts.loop
        extra = {"data_meta": self.data_meta, "probe": self._probe_now()}
        asynchronous = self.cfg.async_save and self.backend.asynchronous
        # async: a private copy (training goes on updating the live tensors), into buffers
        # kept from the previous save: free again, since at most one save is in flight
        captured = self.backend.capture(
            self.parts, self.config, extra, copy=asynchronous, pool=self._pool
        )
        self._last_save = time.monotonic()
        result = SaveResult(loop.step, targets, captured.nonfinite)
        if result.refused:  # never write NaN weights: the newest checkpoint stays the last good
            return result
        info = {
            "step": loop.step,
            "tokens": loop.tokens,
            "best_val": loop.best_val,
            "val_loss": val_loss,
        }
        job = functools.partial(self._write, targets, captured, info)
        if asynchronous:
            self._bg = Background(job)
            self._bg.blocking_s = time.perf_counter() - t0
        else:
            written = job()
            if self.backend.is_main:
                self._report(written, time.perf_counter() - t0, False)
        return result

    def _probe_now(self) -> dict | None:
        if self.probe is None or self.cfg.resume_check == "off":
            return None
        device = next(self.parts.model.parameters()).device
        return {
            "loss": float(self.probe()),
            "precision": self.precision,
            "threads": torch.get_num_threads(),
            "device": str(device),
        }

    def _write(self, targets: list[Path], captured: Captured, info: dict) -> dict:
        """The part that may run on the writer thread: files, manifest, rename, links, rotation.
        Other ranks than the main one only take part in the write: {}."""
        t0 = time.perf_counter()
        try:
            first = self.backend.write(
                captured, targets[0], {**info, "kind": _kind(targets[0])},
                self.extra_files, self.pause,
            )  # fmt: skip
            if not self.backend.is_main:
                return {}
            for other in targets[1:]:
                ck.link_checkpoint(first, other, {**info, "kind": _kind(other)})
        except OSError as e:
            newest = self.last_good.name if self.last_good else "none yet"
            raise UserError(
                f"could not write checkpoint {targets[0].name} in {self.root}: "
                f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}; every earlier "
                f"checkpoint is intact (newest valid: {newest}): free space on that file system "
                "(or repair it), then run the same command to resume"
            ) from e
        self.last_good = first
        c = self.cfg
        rotated = (
            ckpt_retention.rotate(self.root, first, c.keep_last, c.milestone_interval)
            if ck.step_of(first) is not None
            else []
        )
        return {
            "step": info["step"],
            "paths": [str(t) for t in targets],
            "bytes": sum(f.stat().st_size for f in first.iterdir() if f.is_file()),
            "write_s": time.perf_counter() - t0,
            "rotated": rotated,
            "cleaned": ckpt_retention.clean_temps(self.root),  # (none in flight: we are it)
        }

    def _report(self, result: dict, blocking_s: float, asynchronous: bool) -> None:
        record = {
            "event": "checkpoint",
            "step": result["step"],
            "path": result["paths"][0],
            **result,
            "save_s": blocking_s,
            "async": asynchronous,
        }
        self.log.write(record)
        names = ", ".join(Path(p).name for p in result["paths"])
        self.say(
            f"saved {names} ({result['bytes'] / 1e6:.1f} MB; blocked {blocking_s:.2f}s, "
            f"written in {result['write_s']:.2f}s)"
        )

    # ---- the save in flight ----------------------------------------------------------------

    def poll(self) -> None:
        """Pick up a finished background save (its record, or its error)."""
        if self._bg is not None and not self._bg.thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Join the save in flight; raise its error here, in the training thread."""
        bg, self._bg = self._bg, None
        if bg is None:
            return
        bg.thread.join()
        if bg.error is not None:
            raise bg.error
        self._report(bg.result, bg.blocking_s, True)

    def close(self) -> None:
        self.wait()


def _kind(path: Path) -> str:
    return "best" if path.name == "best" else "step"
