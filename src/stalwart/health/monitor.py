"""Health checks on the training signals: the lesson's debugging playbook, live.

The loop hands the monitor what it reads anyway: before the update, the step's loss and pre-clip
grad norm (Python floats, one host sync per step that the loop already makes); after it, the
step's metrics record. The monitor answers what to do with the step ("apply" | "skip" |
"rollback" | "stop") and which diagnoses to record, at no device cost of its own. recovery.py
carries out rollbacks and stops; doctor.py re-runs these detectors over a run's records.
Everything it remembers (windows, counters, rate limits) is in state_dict(), so a resumed
run's monitor is the one that was saved.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

# the save path's NaN guard lives in checkpoint/backend.py (nonfinite_tensors); doctor.py uses it
from stalwart.config import HealthConfig
from stalwart.health.detectors import PLAYBOOK, diagnosis, robust_center
from stalwart.health.trends import TrendDetectors

MIN_HISTORY = 20  # losses in the window before a z-score means anything
RESTORE_STEPS = 5  # steps after a resume judged against the loss window saved in the checkpoint


@dataclass
class Verdict:
    action: str = "apply"  # "apply" | "skip" | "rollback" | "stop"
    diagnoses: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines for a person (rate-limited)
    nonfinite: bool = False
    since: int | None = None  # first step of the trouble: a rollback target must predate it


class HealthMonitor:
    def __init__(self, cfg: HealthConfig, grad_clip: float = 0.0):
        self.cfg, self.grad_clip = cfg, grad_clip
        self.load_state_dict({})

    # ---- before the update ----------------------------------------------------------------

    def check_step(self, step: int, loss: float, grad_norm: float, scaler_active=False) -> Verdict:
        """Decide about step `step` (counting from 1) *before* the optimizer applies it."""
        v = Verdict()
        self.step = step
        # fp16: an overflowing gradient with a finite loss is the GradScaler's business (it
        # skips the step and halves the scale), not a health problem
        if not (math.isfinite(loss) and (math.isfinite(grad_norm) or scaler_active)):
            self._nonfinite(v, step, loss, grad_norm)
            return v
        self.consecutive_nonfinite = 0
        if self.cfg.enabled:
            if self._restore is not None:
                self._after_restore(v, step, loss)  # judged against the saved window instead
            elif self._is_spike(loss):
                self._spike(v, step, loss, grad_norm)
                return v
            self.consecutive_spikes = 0
        self.losses.append(loss)
        return v

    def _nonfinite(self, v: Verdict, step: int, loss: float, grad_norm: float) -> None:
        v.nonfinite = True
        self.counts["nonfinite"] += 1
        self.consecutive_nonfinite += 1
        n = self.consecutive_nonfinite
        if n == 1:
            self.trouble_since = step
        evidence = f"loss={loss:.4g}, pre-clip grad norm={grad_norm:.4g}"
        evidence += f" ({n} steps in a row)" if n > 1 else ""
        if not self.cfg.enabled or self.cfg.on_nan == "ignore":
            fix = "the update was applied (--health.on_nan ignore): use skip or rollback"
            self.emit(v, diagnosis("nonfinite", step, evidence, fix=fix, action="none"))
            return
        if step <= self.cfg.early_steps:  # at once: nothing good to roll back to
            symptom, action = "nonfinite_early", "stop" if n >= self.cfg.nan_patience else "skip"
        else:  # later: skip; roll back at once (on_nan=rollback) or when it repeats
            symptom = "nonfinite"
            repeated = n >= self.cfg.nan_patience
            action = "rollback" if self.cfg.on_nan == "rollback" or repeated else "skip"
        v.action, v.since = action, self.trouble_since
        self.emit(v, diagnosis(symptom, step, evidence, action=action))

    def _is_spike(self, loss: float) -> bool:
        if len(self.losses) < MIN_HISTORY:
            return False
        med, sigma = robust_center(self.losses)
        # and 5% above the median: a window of near-identical losses has a tiny sigma
        return loss > med + max(self.cfg.spike_zscore * sigma, 0.05 * abs(med))

    def _spike(self, v: Verdict, step: int, loss: float, grad_norm: float) -> None:
        self.counts["spikes"] += 1
        self.consecutive_spikes += 1
        self.spike_steps.append(step)
        if self.consecutive_spikes == 1:
            self.trouble_since = step - 1  # the update before the spike may be the culprit
        med, sigma = robust_center(self.losses)
        evidence = (
            f"loss {loss:.4g} = median {med:.4g} + {(loss - med) / sigma:.1f} robust std devs "
            f"of the last {len(self.losses)} steps; pre-clip grad norm {grad_norm:.3g}"
        )
        if self.consecutive_spikes >= self.cfg.nan_patience:  # not isolated: diverging
            action = "apply" if self.cfg.on_spike == "ignore" else "rollback"
            evidence = f"{self.consecutive_spikes} spikes in a row; {evidence}"
            d = diagnosis("divergence", step, evidence, action=action)
        else:
            action = {"ignore": "apply", "skip": "skip", "rollback": "rollback"}[self.cfg.on_spike]
            horizon = 10 * self.cfg.window
            recent = sum(1 for s in self.spike_steps if s > step - horizon)
            frequent = recent >= 3
            if frequent:
                evidence += f"; {recent} spikes in the last {horizon} steps"
            d = diagnosis(
                "loss_spike",
                step,
                evidence,
                severity="warning" if frequent else None,
                action=action,
            )
        v.action, v.since = action, self.trouble_since
        self.emit(v, d)

    def _after_restore(self, v: Verdict, step: int, loss: float) -> None:
        r = self._restore
        r["losses"].append(loss)
        if len(r["losses"]) < RESTORE_STEPS:
            return
        self._restore = None
        mean = statistics.fmean(r["losses"])
        # the mean of 5 steps has 0.45x the noise of one: 2.5 single-step sigmas is far out
        # (over 835 resume points of healthy tiny runs the worst was 2.05)
        if mean - r["median"] > 2.5 * r["sigma"]:
            evidence = (
                f"mean loss {mean:.4g} over the {len(r['losses'])} steps after resuming at step "
                f"{r['at']}, vs median {r['median']:.4g} (std {r['sigma']:.3g}) of the "
                f"{r['n']} steps saved with the checkpoint"
            )
            self.emit(v, diagnosis("diverged_after_restore", step, evidence))
            self.losses.clear()  # a new level: the old window would call every step a spike

    # ---- after the update: the step's record ------------------------------------------------

    def observe(self, record: dict, digest: str | None = None) -> Verdict:
        """The trend detectors (trends.py) over the step's metrics record and batch hash."""
        v = Verdict()
        if self.cfg.enabled:
            self.trends.observe(v, record, digest)
        return v

    # ---- recording --------------------------------------------------------------------------

    def emit(self, v: Verdict, d: dict) -> None:
        """Add diagnosis `d` to verdict `v`. Every diagnosis is recorded; a person hears of a
        symptom when it first fires and then at most once per 10 windows of steps (with the
        count), not on every step. (Recovery records a refused save's diagnosis here too.)"""
        v.diagnoses.append(d)
        f = self.fired.setdefault(d["symptom"], {"first": d["step"], "count": 0, "printed": None})
        f["count"] += 1
        f["last"] = d["step"]
        if f["printed"] is None or d["step"] - f["printed"] >= 10 * self.cfg.window:
            f["printed"] = d["step"]
            v.notes.append(format_note(d, f["count"]))

    # ---- recovery support -------------------------------------------------------------------

    def lr_scale(self, step: int) -> float:
        """The LR multiplier of `step`: health.lr_backoff for a while after a rollback."""
        return self.cfg.lr_backoff if step < self.backoff_until else 1.0

    def after_rollback(self, to_step: int) -> None:
        self.counts["rollbacks"] += 1
        self.backoff_until = to_step + self.cfg.backoff_steps
        self.consecutive_nonfinite = self.consecutive_spikes = 0
        self.trouble_since, self._restore = None, None

    # ---- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "losses": list(self.losses),
            "trends": self.trends.state_dict(),
            "counts": dict(self.counts),
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "consecutive_spikes": self.consecutive_spikes,
            "trouble_since": self.trouble_since,
            "spike_steps": list(self.spike_steps),
            "backoff_until": self.backoff_until,
            "fired": {k: dict(f) for k, f in self.fired.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        w = self.cfg.window
        self.step = int(d.get("step", 0))
        self.losses = deque(d.get("losses", []), maxlen=w)
        self.trends = TrendDetectors(
            self.cfg, self.grad_clip, self.emit, lambda s: self.fired.get(s, {}).get("last")
        )
        self.trends.load_state_dict(d.get("trends", {}))
        self.counts = {"nonfinite": 0, "skipped": 0, "spikes": 0, "rollbacks": 0}
        self.counts.update(d.get("counts", {}))
        self.consecutive_nonfinite = int(d.get("consecutive_nonfinite", 0))
        self.consecutive_spikes = int(d.get("consecutive_spikes", 0))
        self.trouble_since = d.get("trouble_since")
        self.spike_steps = deque(d.get("spike_steps", []), maxlen=w)
        self.backoff_until = int(d.get("backoff_until", 0))
        self.fired = {k: dict(f) for k, f in d.get("fired", {}).items()}
        # a resume: the next steps are judged against the latest losses saved with the
        # checkpoint (the latest: the level and the noise of the run as it was when saved)
        self._restore = None
        recent = list(self.losses)[-MIN_HISTORY:]
        if len(recent) >= 10:
            # the noise of a mean of losses is their spread: the standard deviation, not the
            # MAD (batch losses are heavy-tailed, and the MAD would call the tails a jump)
            med, sigma = robust_center(recent)
            sigma = max(sigma, statistics.pstdev(recent))
            self._restore = {"at": self.step, "median": med, "sigma": sigma, "n": len(recent)}
            self._restore["losses"] = []


def format_note(d: dict, count: int = 1) -> str:
    more = f" ({count} times so far)" if count > 1 else ""
    return (
        f"doctor: step {d['step']}: [{d['severity']}] {PLAYBOOK[d['symptom']].row}{more}: "
        f"{d['evidence']}. Likely cause: {d['cause']}. Fix: {d['fix']}"
    )


def build_monitor(cfg: HealthConfig, grad_clip: float = 0.0) -> HealthMonitor:
    return HealthMonitor(cfg, grad_clip)
