"""Checkpointing for the training loop: when to save, what to keep, how to resume and check it.

The loop needs a few lines (see train.py):
    ckpts = build_checkpoint_manager(cfg, run_dir, TrainParts(...), probe=..., ...)
    ckpts.resume()                  # newest *valid* checkpoint -> all state, then a self-check
    ckpts.attach_log(log)           # resume records now, checkpoint records from here on
    ckpts.request_best()            # after an evaluation that improved the best val loss
    ckpts.maybe_save(step, force=)  # interval / minutes / end / SIGTERM; best/ when requested
    ckpts.close()                   # waits for an asynchronous save; surfaces its error

The on-disk format and its atomicity live in checkpoint.py; the union of the state in
trainstate.py. The doctor (rollback) calls `restore_latest()`, or, without a manager,
`trainstate.latest_valid_checkpoint(run_dir)` + `trainstate.restore_checkpoint(path, ...)`.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stalwart.checkpoint import format as ck
from stalwart.checkpoint import resume as ckpt_resume
from stalwart.checkpoint import retention as ckpt_retention
from stalwart.checkpoint import state as trainstate
from stalwart.config import Config
from stalwart.errors import UserError
from stalwart.health.monitor import checkpoint_is_safe
from stalwart.logs.metrics import MetricsLog, truncate_after

# Writer threads of this process still running: a later train() in the same process (tests,
# experiments) must not read checkpoints an earlier one is still writing.
_INFLIGHT: set[threading.Thread] = set()


@dataclass
class TrainParts:
    """The live objects whose state a checkpoint holds (model: the unwrapped module)."""

    model: torch.nn.Module
    optimizer: Any
    scaler: Any
    loader: Any
    monitor: Any
    loop: trainstate.LoopState


class _Background:
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


class CheckpointManager:
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        parts: TrainParts,
        *,
        is_main: bool = True,
        data_meta: dict | None = None,
        probe: Callable[[], float] | None = None,
        precision: str = "fp32",
        say: Callable[[str], None] = print,
        ctx=None,
    ):
        self.cfg, self.parts, self.is_main = cfg, parts, is_main
        # a parallel.Context: distributed runs save and restore through dist_checkpoint
        self.ctx = ctx
        self.distributed = ctx is not None and (ctx.world_size > 1 or ctx.mode != "none")
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.data_meta = data_meta or {}
        self.probe, self.precision, self.say = probe, precision, say
        tok = Path(cfg.data.dir) / "tokenizer.json"
        self.extra_files = {"tokenizer.json": tok} if tok.is_file() else {}
        self.last_good: Path | None = None  # newest checkpoint known valid (written or verified)
        self.log: MetricsLog | None = None
        self._queued: list[dict] = []
        self._best_pending = False
        self._bg: _Background | None = None
        self._pool: dict[str, torch.Tensor] = {}  # async snapshot buffers, reused every save
        self._last_save = time.monotonic()

    # ---- records ----------------------------------------------------------------------------

    def attach_log(self, log: MetricsLog) -> None:
        self.log = log
        for record in self._queued:
            log.write(record)
        self._queued.clear()

    def _emit(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)
        else:
            self._queued.append(record)

    # ---- resume -------------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Restore the checkpoint run.resume names (auto: the newest valid one), check it, and
        drop metrics records of the steps after it (they are replayed). None = fresh start."""
        for t in list(_INFLIGHT):
            t.join()
        strays = [t.name for t in ck.temp_dirs(self.root)]
        for name in strays:
            self.say(f"stray temporary directory {name} (an interrupted save): never loaded")
        chosen = ckpt_resume.choose_checkpoint(self.run_dir, self.cfg.run.resume, self.say)
        if chosen is None:
            if self.is_main:  # records of a killed attempt that never saved are replayed too
                truncate_after(self.run_dir / "metrics.jsonl", 0)
            if strays:
                self._emit({"event": "stray_temp_dirs", "step": 0, "paths": strays})
            return None
        path, model_state, state = chosen
        changes = trainstate.check_compatible(
            state["config"], self.cfg, self.data_meta, state.get("data_meta")
        )
        changes += ckpt_resume.adopt_threads(state.get("threads"), self.cfg.run.threads)
        changes += self._restore(path, model_state, state)
        step = self.parts.loop.step
        if self.is_main:
            truncate_after(self.run_dir / "metrics.jsonl", step)
        record = {"event": "resume", "step": step, "from": str(path), "changes": changes}
        self._emit({**record, "stray_temp_dirs": strays} if strays else record)
        self.say(
            f"resumed from {path} at step {step}"
            + (f" (changed: {'; '.join(changes)})" if changes else "")
        )
        return path

    def _restore(self, path: Path, model_state: dict, state: dict) -> list[str]:
        p = self.parts
        notes = []
        if self.ctx is not None:  # weights (resharded if need be), optimizer layout, rank RNG
            from stalwart.checkpoint import distributed as dist_checkpoint

            notes = dist_checkpoint.restore(
                path, model_state, state, p.model, p.optimizer, self.cfg, self.ctx
            )
        else:
            ck.load_model_state(p.model, model_state)
        # the continuity self-check runs before the RNG is restored, so even a probe that drew
        # random numbers could not shift the run
        try:
            check, diagnosis = ckpt_resume.check_probe(
                path, state, self.probe, self.precision, self.cfg.ckpt.resume_check
            )
        except ckpt_resume.ResumeCheckFailed as e:
            self._append_now(e.record)
            raise
        trainstate.restore(state, p.optimizer, p.scaler, p.loader, p.monitor, p.loop)
        self.last_good, self._best_pending = path, False
        self._emit(check)
        if diagnosis is not None:
            self.say(f"WARNING: {diagnosis['evidence']}: continuing (--ckpt.resume_check warn)")
            self._emit(diagnosis)
        self._set_aside_newer(p.loop.step, path)
        return notes

    def _append_now(self, record: dict) -> None:
        if self.is_main:
            log = MetricsLog(self.run_dir / "metrics.jsonl")
            log.write(record)
            log.close()

    def _set_aside_newer(self, step: int, restored: Path) -> None:
        if self.distributed:  # every rank has chosen its checkpoint before any is moved
            from stalwart.checkpoint import distributed as dist_checkpoint

            dist_checkpoint._barrier(self.ctx)
        if not self.is_main:
            return
        for dest in ckpt_resume.set_aside_newer(self.root, step, restored):
            self.say(f"set aside {dest.name}: newer than the restored step {step}")
            self._emit({"event": "checkpoint_abandoned", "step": step, "path": str(dest)})

    def restore_latest(self, before_step: int | None = None) -> Path | None:
        """Rollback: restore the newest valid checkpoint (older than `before_step` if given)
        into the live objects; returns its path, None if there is none."""
        self.wait()
        for path in trainstate.valid_checkpoints(self.root, self.say):
            if before_step is not None and (ck.manifest_step(path) or 0) >= before_step:
                continue
            model_state, state = ck.read_checkpoint(path, check=False)
            self._restore(path, model_state, state)
            return path
        return None

    # ---- saving -------------------------------------------------------------------------------

    def request_best(self) -> None:
        """The last evaluation is the best so far: best/ gets this step's state at maybe_save."""
        self._best_pending = True

    def due(self, step: int) -> bool:
        c = self.cfg.ckpt
        if c.interval and step % c.interval == 0:
            return True
        if not c.interval_minutes:
            return False
        late = (time.monotonic() - self._last_save) / 60 >= c.interval_minutes
        if self.ctx is not None and self.ctx.world_size > 1:
            # every rank must decide alike (a collective save on some ranks only would hang),
            # and their clocks differ: one small all-reduce, only when interval_minutes is set
            import torch.distributed as dist

            flag = torch.tensor([float(late)], device=self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late

    def maybe_save(self, step: int, *, force: bool = False, val_loss: float | None = None) -> bool:
        """Save if an interval is due, `force` (end of run, SIGTERM) or best/ was requested."""
        self.poll()
        targets = [ck.step_dir(self.root, step)] if force or self.due(step) else []
        if self._best_pending:
            targets.append(self.root / "best")
            self._best_pending = False
        if targets:
            self.save(targets, val_loss)
        return bool(targets)

    def save(self, targets: list[Path], val_loss: float | None = None) -> None:
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        p = self.parts
        extra = {"data_meta": self.data_meta, "probe": self._probe_now()}
        model_state, state = (
            trainstate.capture(
                self.cfg, p.model, p.optimizer, p.scaler, p.loader, p.monitor, p.loop, extra
            )
            if not self.distributed
            else (None, None)
        )
        self._last_save = time.monotonic()
        # never write NaN weights: the newest checkpoint stays the last good one (health.py)
        if model_state is not None and not checkpoint_is_safe(model_state, p.monitor, p.loop.step):
            return
        info = {
            "step": p.loop.step,
            "tokens": p.loop.tokens,
            "best_val": p.loop.best_val,
            "val_loss": val_loss,
        }
        if self.distributed:  # every rank takes part (FSDP: its shards); synchronous
            from stalwart.checkpoint import distributed as dist_checkpoint

            def first(final: Path, kind_info: dict) -> Path:
                return dist_checkpoint.save(
                    final, self.cfg, p.model, p.optimizer, p.scaler, p.loader, p.monitor, p.loop,
                    extra, kind_info, self.ctx, self.extra_files,
                )  # fmt: skip

            result = self._write(targets, first, info, main=self.is_main)
            if self.is_main:
                self._report(result, time.perf_counter() - t0, False)
            return
        if not self.is_main:
            return
        asynchronous = self.cfg.ckpt.async_save
        # async: a private copy (training goes on updating the live tensors), into buffers
        # kept from the previous save: free again, since at most one save is in flight
        snap = ck.snapshot(model_state, state, copy=asynchronous, pool=self._pool)

        def first(final: Path, kind_info: dict) -> Path:
            return ck.write_snapshot(final, snap, kind_info, self.extra_files, self._pause)

        job = functools.partial(self._write, targets, first, info)
        if asynchronous:
            self._bg = _Background(job)
            self._bg.blocking_s = time.perf_counter() - t0
        else:
            self._report(job(), time.perf_counter() - t0, False)

    def _probe_now(self) -> dict | None:
        if self.probe is None or self.cfg.ckpt.resume_check == "off":
            return None
        device = next(self.parts.model.parameters()).device
        return {
            "loss": float(self.probe()),
            "precision": self.precision,
            "threads": torch.get_num_threads(),
            "device": str(device),
        }

    def _write(self, targets: list[Path], write_first, info: dict, main: bool = True) -> dict:
        """The part that may run on the writer thread: files, manifest, rename, rotation.
        `write_first(final, info)` writes targets[0]; the others link to it."""
        t0 = time.perf_counter()
        try:
            first = write_first(targets[0], {**info, "kind": _kind(targets[0])})
            if not main:
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
        c = self.cfg.ckpt
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

    def _pause(self, tmp: Path) -> None:
        """debug.pause_in_save_s (tests, demos): a window in which the save is half written."""
        seconds = self.cfg.debug.pause_in_save_s
        if seconds > 0:
            print(
                f"debug: pausing {seconds}s in the save of {tmp.name}", file=sys.stderr, flush=True
            )
            time.sleep(seconds)

    def _report(self, result: dict, blocking_s: float, asynchronous: bool) -> None:
        record = {
            "event": "checkpoint",
            "step": result["step"],
            "path": result["paths"][0],
            **result,
            "save_s": blocking_s,
            "async": asynchronous,
        }
        self._emit(record)
        names = ", ".join(Path(p).name for p in result["paths"])
        self.say(
            f"saved {names} ({result['bytes'] / 1e6:.1f} MB; blocked {blocking_s:.2f}s, "
            f"written in {result['write_s']:.2f}s)"
        )

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


def build_checkpoint_manager(
    cfg: Config, run_dir: Path, parts: TrainParts, **kwargs
) -> CheckpointManager:
    return CheckpointManager(cfg, run_dir, parts, **kwargs)
