"""Recovery: what the loop does with the doctor's verdicts (record, print, roll back, stop).

monitor.py decides; this module acts, so the loop needs only a few lines:
    verdict = medic.forced_verdict(step) or monitor.check_step(step, ...)
    action = medic.act(verdict, step, batches)
    # "apply" | "skip" | "rolled_back" (start the step over) | "stop" (end the run cleanly)
    ...
    medic.after_save(saver.maybe_save(...))   # a save refused NaN/Inf weights: see below
A rollback restores the newest good checkpoint older than the trouble (the `restore` it is
given: checkpoint/resumer.py), skips the data window that caused it (the loader's position
jumps past the bad batch: batches are a pure function of the position), lowers the LR by health.lr_backoff for
health.backoff_steps steps, and training goes on. After health.max_rollbacks rollbacks the
run stops with a critical diagnosis, and `stalwart train` exits with EXIT_HEALTH_STOP.

A save that finds NaN/Inf weights writes nothing (checkpoint/saver.py) and returns that. Then the
weights are bad whatever the next step shows: `after_save` records the critical diagnosis and
the next step rolls back (stops, when health is off or health.on_nan is ignore); at the end of
the run, `finish` reports it and stops with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from stalwart.checkpoint.saver import SaveResult
from stalwart.config import HealthConfig
from stalwart.health.detectors import diagnosis
from stalwart.health.monitor import HealthMonitor, Verdict, format_note

# `stalwart train` exit code when the doctor stopped the run (2 = user error, 1 = a bug)
EXIT_HEALTH_STOP = 3


class Recovery:
    def __init__(
        self,
        cfg: HealthConfig,
        monitor: HealthMonitor,
        loader,
        loop,
        model: torch.nn.Module,
        vocab_size: int,
        log,
        say: Callable[[str], None],
        restore: Callable[[int], Path | None],
    ):
        """`restore(before_step)` puts the newest valid checkpoint older than `before_step`
        back into every live object and returns its path (None: there is none)."""
        self.cfg, self.monitor, self.loader, self.loop = cfg, monitor, loader, loop
        self.model, self.vocab = model, vocab_size
        self.log, self.say, self.restore = log, say, restore
        self.stop_diagnosis: dict | None = None  # set when the doctor ends the run
        # a refused save: its diagnosis, and the action it forces on the next step
        self._pending = Verdict()
        self._forced: str | None = None

    def after_save(self, outcome: SaveResult) -> None:
        """A save refused because the weights hold NaN/Inf: record the critical diagnosis, and
        make the next step roll back (stop, with health off or health.on_nan ignore)."""
        if not outcome.refused:
            return
        stop = self.cfg.on_nan == "ignore" or not self.cfg.enabled
        self._forced = "stop" if stop else "rollback"
        d = diagnosis("nonfinite_weights", outcome.step, outcome.evidence, action=self._forced)
        self.monitor.emit(self._pending, d)  # counted and rate-limited like any diagnosis

    def forced_verdict(self, step: int) -> Verdict | None:
        """The verdict a refused save imposed on step `step` (the weights went bad: whatever
        the step shows, it cannot help), in place of the monitor's; None when there is none."""
        if self._forced is None:
            return None
        verdict, self._pending = self._pending, Verdict()
        verdict.action, verdict.since, self._forced = self._forced, step - 1, None
        return verdict

    def act(self, verdict: Verdict, step: int, batches=None) -> str:
        """Carry out the monitor's verdict on step `step`; return what the loop does next."""
        if verdict.nonfinite and batches is not None and self.cfg.enabled:
            self._explain_tokens(verdict, step, batches)
        action = verdict.action
        if action == "rollback" and self.monitor.counts["rollbacks"] >= self.cfg.max_rollbacks:
            action = "stop"
            evidence = f"{self.monitor.counts['rollbacks']} rollbacks already (budget "
            evidence += f"--health.max_rollbacks {self.cfg.max_rollbacks}); the trouble is back"
            self._add(verdict, self._giving_up(verdict, step, evidence))
        self.report(verdict)
        if action == "rollback":
            action = self._rollback(verdict, step)
        if action == "stop" and self.stop_diagnosis is None:
            self.stop_diagnosis = _worst(verdict.diagnoses)
        return action

    def report(self, verdict: Verdict) -> None:
        for d in verdict.diagnoses:
            self.log.write(d)
        for note in verdict.notes:
            self.say(note)

    def _add(self, verdict: Verdict, d: dict) -> None:
        verdict.diagnoses.append(d)
        verdict.notes.append(format_note(d))

    def _giving_up(self, verdict: Verdict, step: int, evidence: str) -> dict:
        last = verdict.diagnoses[-1] if verdict.diagnoses else {}
        if last:
            evidence += f"; last: {last['symptom']} ({last['evidence']})"
        fix = last.get("fix", "")
        fix = (fix + "; then " if fix else "") + "resume with the same command"
        return diagnosis("unrecoverable", step, evidence, fix=fix, action="stop")

    def _rollback(self, verdict: Verdict, step: int) -> str:
        resume_at = self.loader.position  # the batch after the one that caused the trouble
        live = self.monitor.state_dict()
        before = verdict.since if verdict.since is not None else step
        path = self.restore(before)
        if path is None:
            stuck = max(self.monitor.consecutive_nonfinite, self.monitor.consecutive_spikes)
            if stuck < self.cfg.nan_patience:
                self.say(f"doctor: no checkpoint before step {before} to roll back to: skipped")
                return "skip"
            d = self._giving_up(verdict, step, f"no checkpoint before step {before}")
            self.stop_diagnosis = d
            self.report(Verdict(diagnoses=[d], notes=[format_note(d)]))
            return "stop"
        # the monitor remembers the run, not the checkpoint: counters, budget, rate limits
        self.monitor.load_state_dict(live)
        to_step = self.loop.step
        skipped = [self.loader.position, resume_at]  # batches [from, to) are never seen again
        self.loader.position = resume_at
        self.monitor.after_rollback(to_step)
        n = self.monitor.counts["rollbacks"]
        record = {
            "event": "rollback",
            "step": step,
            "to_step": to_step,
            "checkpoint": str(path),
            "symptom": verdict.diagnoses[-1]["symptom"] if verdict.diagnoses else None,
            "skipped_batches": skipped,
            "lr_scale": self.cfg.lr_backoff,
            "lr_backoff_until": self.monitor.backoff_until,
            "rollbacks": n,
            "budget": self.cfg.max_rollbacks,
        }
        self.log.write(record)
        self.say(
            f"doctor: rolled back from step {step} to {Path(path).name} (step {to_step}), "
            f"skipping batches {skipped[0]}..{skipped[1] - 1}, LR x{self.cfg.lr_backoff} until "
            f"step {self.monitor.backoff_until} ({n}/{self.cfg.max_rollbacks} rollbacks)"
        )
        return "rolled_back"

    def _explain_tokens(self, verdict: Verdict, step: int, batches) -> None:
        """A non-finite step: is it specific tokens? (Checked only now: costs nothing normally.)"""
        found = inspect_tokens(batches, self.model, self.vocab)
        if found is None:
            return
        for i, d in enumerate(verdict.diagnoses):
            if d["symptom"] in ("nonfinite", "nonfinite_early"):
                verdict.diagnoses[i] = diagnosis(
                    "bad_tokens", step, f"{found}; {d['evidence']}", action=d["action"]
                )
                verdict.notes = [format_note(verdict.diagnoses[i])]

    def explain_crash(self, step: int, batches) -> bool:
        """The forward pass raised. If the batch holds ids the embedding cannot look up (CPU:
        IndexError; CUDA: a device assert), record the playbook's diagnosis and stop cleanly
        (True). Anything else is a bug: False, and the caller re-raises it."""
        try:
            found = inspect_tokens(batches, self.model, self.vocab)
        except RuntimeError:  # a CUDA assert poisons the context: nothing more to learn
            return False
        if found is None:
            return False
        d = diagnosis("bad_tokens", step, f"the forward pass failed: {found}", action="stop")
        self.stop_diagnosis = d
        self.report(Verdict(diagnoses=[d], notes=[format_note(d)]))
        return True

    def finish(self) -> dict | None:
        """End of the run: diagnoses still queued (a save refused at the last step)."""
        pending, self._pending, self._forced = self._pending, Verdict(), None
        self.report(pending)
        if self.stop_diagnosis is None and any(d["action"] != "none" for d in pending.diagnoses):
            self.stop_diagnosis = _worst(pending.diagnoses)
        return self.stop_diagnosis


def _worst(diagnoses: list[dict]) -> dict | None:
    order = {"info": 0, "warning": 1, "critical": 2}
    return max(diagnoses, key=lambda d: order.get(d["severity"], 0), default=None)


def _embedding(model: torch.nn.Module, vocab: int) -> torch.nn.Embedding | None:
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for m in embeddings:
        if m.num_embeddings == vocab:
            return m
    return embeddings[0] if embeddings else None


@torch.no_grad()
def inspect_tokens(batches, model: torch.nn.Module, vocab: int) -> str | None:
    """The playbook's 'NaN on specific tokens': ids outside the embedding, or embedding rows
    that hold NaN/Inf while the rest do not (all rows bad = the weights, not the tokens)."""
    ids = torch.cat([t.flatten() for x, y in batches for t in (x, y)])
    lo, hi = int(ids.min()), int(ids.max())
    emb = _embedding(model, vocab)
    rows = emb.num_embeddings if emb is not None else vocab
    if lo < 0 or hi >= rows:
        out = ids[(ids < 0) | (ids >= rows)].unique()
        return (
            f"token ids {out[:5].tolist()} (range {lo}..{hi}) are outside the embedding's "
            f"0..{rows - 1}"
        )
    if emb is None or hasattr(emb.weight, "to_local"):  # FSDP: rows sharded across ranks
        return None
    bad = (~torch.isfinite(emb.weight).all(dim=1)).nonzero().flatten()
    if len(bad) == 0 or len(bad) == rows:
        return None
    hit = sorted(set(bad.tolist()) & set(ids.unique().tolist()))
    if not hit:
        return None
    return f"embedding rows of token ids {hit[:5]} hold NaN/Inf and this batch uses them"
