"""Resuming: the checkpoint run.resume selects, every piece of state put back, the continuity
self-check, and the checkpoints of a discarded future set aside. The doctor's rollback uses the
same restore (`restore_latest`). The loop needs a few lines (see trainer.py):

    resumer = Resumer(run_dir, parts, backend, config=to_dict(cfg), mode=cfg.run.resume, ...)
    path = resumer.resume()           # newest *valid* checkpoint -> all state, then a self-check;
                                      # drops the metrics records of the steps it replays
    resumer.attach_log(log)           # its records so far, then every later one
    resumer.restore_latest(before)    # rollback: the newest valid checkpoint older than `before`

The selection and the self-check are plain functions in resume.py; what is restored, state.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stalwart import parallel
from stalwart.checkpoint import format as ck
from stalwart.checkpoint import state as trainstate
from stalwart.checkpoint.backend import DistributedBackend, LocalBackend
from stalwart.checkpoint.resume import (
    ResumeCheckFailed,
    adopt_threads,
    check_probe,
    select_checkpoint,
    set_aside_newer,
    valid_checkpoints,
)
from stalwart.checkpoint.state import TrainParts
from stalwart.checkpoint.writer import join_writers
from stalwart.errors import UserError
from stalwart.logs.metrics import MetricsLog, truncate_after


class Resumer:
    def __init__(
        self,
        run_dir: Path,
        parts: TrainParts,
        backend: LocalBackend | DistributedBackend,
        *,
        config: dict,
        mode: str = "auto",
        threads: int = 0,
        check: str = "strict",
        data_meta: dict | None = None,
        probe: Callable[[], float] | None = None,
        precision: str = "fp32",
        say: Callable[[str], None] = print,
    ):
        """`config`: this run's resolved config as a dict (checked against the checkpoint's);
        `mode`: run.resume (auto | never | PATH); `threads`: run.threads (0: adopt the saved
        count); `check`: ckpt.resume_check (strict | warn | off); `probe`: the continuity
        probe's loss, recomputed after a restore."""
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.parts, self.backend = parts, backend
        self.config, self.mode, self.threads, self.check = config, mode, threads, check
        self.data_meta = data_meta or {}
        self.probe, self.precision, self.say = probe, precision, say
        self.log = None
        self._queued: list[dict] = []

    # ---- records ----------------------------------------------------------------------------

    def attach_log(self, log) -> None:
        """The records of the resume (written before the log opened), then every later one."""
        self.log = log
        for record in self._queued:
            log.write(record)
        self._queued.clear()

    def _emit(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)
        else:
            self._queued.append(record)

    def _append_now(self, record: dict) -> None:
        """A record that must reach metrics.jsonl although the run ends here (an exception)."""
        if self.backend.is_main:
            log = MetricsLog(self.run_dir / "metrics.jsonl")
            log.write(record)
            log.close()

    # ---- resume -------------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Restore the checkpoint run.resume names (auto: the newest valid one), check it, and
        drop metrics records of the steps after it (they are replayed). None = fresh start."""
        join_writers()  # an earlier run of this process may still be writing
        strays = [t.name for t in ck.temp_dirs(self.root)]
        for name in strays:
            self.say(f"stray temporary directory {name} (an interrupted save): never loaded")
        # allow-changes: auto, and a change of settings is continued rather than refused
        mode = "auto" if self.mode == "allow-changes" else self.mode
        chosen = select_checkpoint(self.run_dir, mode, self.say)
        if chosen is None:
            if self.backend.is_main:  # records of a killed attempt that never saved are replayed
                truncate_after(self.run_dir / "metrics.jsonl", 0)
            if strays:
                self._emit({"event": "stray_temp_dirs", "step": 0, "paths": strays})
            return None
        path, model_state, state = chosen
        changes = trainstate.check_compatible(
            state["config"], self.config, self.data_meta, state.get("data_meta")
        )
        if self.mode == "auto":  # before anything is restored or truncated
            same_batch = _saved_global_batch(state) == self.parts.loader.global_batch
            _refuse_changed_settings(self.run_dir, state["config"], self.config, same_batch)
        changes += adopt_threads(state.get("threads"), self.threads)
        changes += self._restore(path, model_state, state)
        step = self.parts.loop.step
        if self.backend.is_main:
            truncate_after(self.run_dir / "metrics.jsonl", step)
        record = {"event": "resume", "step": step, "from": str(path), "changes": changes}
        self._emit({**record, "stray_temp_dirs": strays} if strays else record)
        self.say(
            f"resumed from {path} at step {step}"
            + (f" (changed: {'; '.join(changes)})" if changes else "")
        )
        return path

    def restore_latest(self, before_step: int | None = None) -> Path | None:
        """Rollback: restore the newest valid checkpoint (older than `before_step` if given)
        into the live objects; returns its path, None if there is none. The saver's save in
        flight must have been waited for (its record comes first)."""
        join_writers()
        for path in valid_checkpoints(self.root, self.say):
            if before_step is not None and (ck.manifest_step(path) or 0) >= before_step:
                continue
            model_state, state = ck.read_checkpoint(path, check=False)
            self._restore(path, model_state, state)
            return path
        return None

    # ---- every restore ------------------------------------------------------------------------

    def _restore(self, path: Path, model_state: dict, state: dict) -> list[str]:
        p = self.parts
        # weights (resharded if need be), the optimizer state in this run's layout, rank RNG
        notes = self.backend.restore(path, model_state, state, p.model, p.optimizer)
        # the continuity self-check runs before the RNG is restored, so even a probe that drew
        # random numbers could not shift the run
        try:
            check, diagnosis = check_probe(path, state, self.probe, self.precision, self.check)
        except ResumeCheckFailed as e:
            self._append_now(e.record)
            raise
        trainstate.restore(state, p.optimizer, p.scaler, p.loader, p.monitor, p.loop)
        self._emit(check)
        if diagnosis is not None:
            self.say(f"WARNING: {diagnosis['evidence']}: continuing (--ckpt.resume_check warn)")
            self._emit(diagnosis)
        self._set_aside_newer(p.loop.step, path)
        return notes

    def _set_aside_newer(self, step: int, restored: Path) -> None:
        parallel.barrier(self.backend.ctx)  # every rank has chosen its checkpoint before any moves
        if not self.backend.is_main:
            return
        for dest in set_aside_newer(self.root, step, restored):
            self.say(f"set aside {dest.name}: newer than the restored step {step}")
            self._emit({"event": "checkpoint_abandoned", "step": step, "path": str(dest)})


def _saved_global_batch(state: dict) -> int:
    """Sequences per optimizer step when the checkpoint was written (all ranks)."""
    dist = state.get("dist") or {}
    if dist.get("global_batch"):
        return int(dist["global_batch"])
    train = state["config"]["train"]
    try:
        return int(train["micro_batch"]) * int(train["grad_accum"])  # one process
    except (TypeError, ValueError):  # micro_batch auto: the planner's choice, unknown here
        return -1


def _refuse_changed_settings(run_dir: Path, saved: dict, now: dict, same_batch: bool) -> None:
    changed = trainstate.changed_settings(saved, now, same_batch)
    if changed:
        raise UserError(
            f"{run_dir} holds a run trained with other settings ({'; '.join(changed)}): train "
            "into a new --run.dir for a new run, or pass --run.resume allow-changes to continue "
            "this one with the new values"
        )
