"""The lesson's debugging playbook as data, and the pure functions its detectors are made of.

Each symptom maps to the playbook row it belongs to, the most likely cause, the fix, and a
severity (info: normal if rare; warning: look at it; critical: the run is broken or stopped).
The functions here take plain Python numbers (the loop has already read them from the device
once per step) and return evidence in words, or None: no state, no torch, no host syncs, so the
live monitor (monitor.py) and the offline doctor (doctor.py) share them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Rule:
    row: str  # the lesson's playbook row
    cause: str
    fix: str
    severity: str


PLAYBOOK: dict[str, Rule] = {
    "nonfinite_early": Rule(
        "loss NaN/Inf at once",
        "LR too high, no warmup, or NaN/Inf in the data",
        "lower the LR 10x (--optim.lr), add warmup (--schedule.warmup_steps), "
        "check the data for NaN",
        "critical",
    ),
    "nonfinite": Rule(
        "loss NaN/Inf later",
        "one bad batch, or the run starting to diverge",
        "nothing, if it stays rare: the update was skipped (or rolled back); if it recurs, "
        "lower the LR (--optim.lr)",
        "warning",
    ),
    "nonfinite_weights": Rule(
        "loss NaN/Inf later",
        "the weights themselves hold NaN/Inf (a non-finite update was applied)",
        "roll back to the last good checkpoint; keep --health.on_nan at skip or rollback",
        "critical",
    ),
    "clipping": Rule(
        "gradients constantly clipped",
        "LR too high for this phase (or --optim.grad_clip far below this model's gradient norm)",
        "lower the peak LR (--optim.lr) or lengthen warmup (--schedule.warmup_steps)",
        "warning",
    ),
    "loss_spike": Rule(
        "isolated loss spike then recovery",
        "one bad batch (the update was skipped or noted, per --health.on_spike)",
        "normal if rare; if frequent, lower the LR (--optim.lr)",
        "info",
    ),
    "divergence": Rule(
        "loss spikes and does not recover",
        "the update became unstable (LR too high for this phase)",
        "roll back and lower the LR (--health.on_spike rollback does both); lower --optim.lr",
        "warning",
    ),
    "plateau": Rule(
        "loss plateaus early",
        "LR too low: the loss is flat and the LR is near zero",
        "check the LR schedule (--optim.lr, --schedule.name, --schedule.warmup_steps)",
        "warning",
    ),
    "repeated_batches": Rule(
        "loss plateaus early",
        "data shuffle bug: the loader returns batches it already returned",
        "verify the data loading seeds and the loader's position (data order)",
        "warning",
    ),
    "overfitting": Rule(
        "val loss rises while train loss falls",
        "overfitting: the model is too large for the data",
        "more weight decay (--optim.weight_decay), dropout (--model.dropout), or more data",
        "warning",
    ),
    "diverged_after_restore": Rule(
        "loss diverges after checkpoint restore",
        "optimizer or scaler state not saved/restored",
        "save and restore the full state (optimizer moments, scaler, step, RNG); "
        "see `stalwart ckpt verify`",
        "critical",
    ),
    "bad_tokens": Rule(
        "NaN only on specific tokens",
        "token ids out of the embedding's range, or non-finite embedding rows",
        "check the token id range against --model.vocab_size (re-run `stalwart prepare` with "
        "the right tokenizer); verify the causal/pad mask",
        "critical",
    ),
    "throughput_drop": Rule(
        "throughput drops mid-run",
        "the data loader falls behind: the device waits on the CPU",
        "more loader workers, pre-tokenize, memory-map the data",
        "warning",
    ),
    "unrecoverable": Rule(
        "recovery budget spent",
        "the trouble came back after every rollback",
        "fix the cause named above, then resume with the same command",
        "critical",
    ),
}


def diagnosis(
    symptom: str,
    step: int,
    evidence: str,
    *,
    severity: str | None = None,
    cause: str | None = None,
    fix: str | None = None,
    action: str = "none",
    **extra,
) -> dict:
    """One metrics.jsonl record (`"event": "diagnosis"`) in the playbook's words."""
    rule = PLAYBOOK[symptom]
    return {
        "event": "diagnosis",
        "step": step,
        "symptom": symptom,
        "row": rule.row,
        "evidence": evidence,
        "cause": cause or rule.cause,
        "fix": fix or rule.fix,
        "severity": severity or rule.severity,
        "action": action,
        **extra,
    }


def robust_center(values: Sequence[float]) -> tuple[float, float]:
    """(median, robust standard deviation = 1.4826 * MAD): one bad value moves neither."""
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    # floor: a window of identical losses (e.g. a frozen model) must not give sigma = 0
    return med, max(1.4826 * mad, 1e-3 * abs(med), 1e-12)


def robust_z(value: float, window: Sequence[float]) -> float:
    med, sigma = robust_center(window)
    return (value - med) / sigma


def clip_evidence(
    clipped: Sequence[bool], norms: Sequence[float], max_norm: float, rate: float, factor: float
) -> str | None:
    """Constantly clipped: most steps clipped, and by a lot. (Tiny models sit with their
    gradient norm near 1.0, so a high clip rate alone is normal for them; clipped by 2x or
    more, the update is set by the clip threshold rather than by the gradient.)"""
    if not clipped or not max_norm or max_norm == float("inf"):
        return None
    frac = sum(clipped) / len(clipped)
    med = statistics.median(norms) if norms else 0.0
    if frac > rate and med >= factor * max_norm:
        return (
            f"{100 * frac:.0f}% of the last {len(clipped)} steps clipped; median pre-clip grad "
            f"norm {med:.3g} = {med / max_norm:.1f}x the threshold {max_norm:g}"
        )
    return None


def plateau_evidence(losses: Sequence[float], lrs: Sequence[float], low_lr: float) -> str | None:
    """Loss flat over the window (the later half no lower than the earlier) while the LR is
    below `low_lr` throughout."""
    if len(losses) < 8 or not lrs or max(lrs) >= low_lr:
        return None
    half = len(losses) // 2
    before, after = statistics.median(losses[:half]), statistics.median(losses[half:])
    if before - after > 0.01 * abs(before):
        return None  # still improving by more than 1%: not a plateau
    return (
        f"loss flat at {after:.4g} over the last {len(losses)} steps (was {before:.4g}) "
        f"while the LR stayed below {max(lrs):.2g}"
    )


def repeat_evidence(digests: Sequence[str]) -> str | None:
    """The same batch (hash of its token windows) seen 3+ times within the window."""
    if not digests:
        return None
    counts: dict[str, int] = {}
    for d in digests:
        counts[d] = counts.get(d, 0) + 1
    top, n = max(counts.items(), key=lambda kv: kv[1])
    if n < 3:
        return None
    return (
        f"batch {top} seen {n} times in the last {len(digests)} steps "
        f"({len(counts)} distinct batches)"
    )


def overfit_evidence(evals: Sequence[Sequence[float]], best_val: float) -> str | None:
    """Over the last three evaluations (step, val, mean train loss since the previous one):
    val rises at every one while train falls at every one, and val is now 2% or more above
    the best it has been (a rise of noise size is not overfitting)."""
    if len(evals) < 3:
        return None
    (s0, v0, t0), (_, v1, t1), (s2, v2, t2) = evals[-3:]
    if v0 < v1 < v2 and t0 > t1 > t2 and v2 >= best_val + 0.02 * abs(best_val):
        return (
            f"val loss rose {v0:.4g} -> {v1:.4g} -> {v2:.4g} (steps {s0}-{s2}; best "
            f"{best_val:.4g}) while train loss fell {t0:.4g} -> {t1:.4g} -> {t2:.4g}"
        )
    return None


def throughput_evidence(
    baseline: Sequence[float], recent: Sequence[float], drop: float, wait_frac: float | None
) -> tuple[str, str] | None:
    """(evidence, cause) when every one of the `recent` tokens/s readings is below `drop` x
    the median of the `baseline` readings."""
    if len(baseline) < 5 or not recent:
        return None
    med = statistics.median(baseline)
    if med <= 0 or max(recent) >= drop * med:
        return None
    now = statistics.median(recent)
    evidence = f"tokens/s {now:.4g} over the last {len(recent)} records vs median {med:.4g}"
    if wait_frac is None:
        return evidence, PLAYBOOK["throughput_drop"].cause
    evidence += f"; the step waits on data {100 * wait_frac:.0f}% of the time"
    if wait_frac >= 0.3:
        return evidence, PLAYBOOK["throughput_drop"].cause
    return evidence, (
        "the step itself got slower (another job on the device, throttling, a slow host), "
        "not the data loader"
    )
