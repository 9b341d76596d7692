"""Health checks on the training signals (the lesson's debugging playbook, live).

This is the foundation's minimum: a non-finite loss or gradient norm never reaches the weights.
The monitor sees every step's loss and pre-clip norm and answers what to do with the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stalwart.config import HealthConfig


@dataclass
class Verdict:
    action: str  # "apply" | "skip" | "rollback" | "stop"
    diagnoses: list[dict] = field(default_factory=list)


class HealthMonitor:
    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.nonfinite_steps = 0
        self.skipped_steps = 0

    def check_step(self, step: int, loss: float, grad_norm: float, scaler_active: bool) -> Verdict:
        """Decide about a step *before* the optimizer applies it."""
        if math.isfinite(loss) and (math.isfinite(grad_norm) or scaler_active):
            # fp16: an overflowing gradient is the GradScaler's business (it skips the step and
            # halves the scale), not a health problem
            return Verdict("apply")
        self.nonfinite_steps += 1
        self.skipped_steps += 1
        diag = {
            "event": "diagnosis",
            "step": step,
            "symptom": "nonfinite",
            "evidence": f"loss={loss}, grad_norm={grad_norm}",
            "cause": "LR too high, no warmup, or NaN in the data",
            "fix": "lower the LR 10x, add warmup, check the data",
        }
        if not self.cfg.enabled or self.cfg.on_nan == "ignore":
            return Verdict("apply", [diag])
        return Verdict("skip", [diag])

    def state_dict(self) -> dict:
        return {"nonfinite_steps": self.nonfinite_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, d: dict) -> None:
        self.nonfinite_steps = int(d.get("nonfinite_steps", 0))
        self.skipped_steps = int(d.get("skipped_steps", 0))


def build_monitor(cfg: HealthConfig) -> HealthMonitor:
    return HealthMonitor(cfg)
