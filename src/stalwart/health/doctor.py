"""`stalwart doctor RUN_DIR`: the debugging playbook applied to a run, after the fact.

Works on a running, finished or crashed run. It reads metrics.jsonl (a line torn by a crash is
skipped), config.toml and the checkpoint manifests; collects the diagnoses the live doctor
recorded; re-runs the same detectors (monitor.py) over the training records to find what the
live run did not record (a run with --health.enabled false, or thresholds changed since); and
prints what it finds in plain words: symptom, evidence, likely cause, fix.

Exit codes (documented in docs/doctor.md):
    0  healthy: nothing found, or notes only (an isolated spike is normal)
    4  warnings: something to look at (constant clipping, overfitting, a recovered NaN, ...)
    3  critical: the run is broken or was stopped by the doctor (the same code `stalwart train`
       exits with then), or a checkpoint holds NaN weights
    2  not a run directory (the usual `error:` line)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

try:  # Python 3.11+; 3.10 reads TOML with tomli, the same parser
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.backend import nonfinite_tensors
from stalwart.config import Config, _set
from stalwart.errors import UserError
from stalwart.health.detectors import PLAYBOOK
from stalwart.health.monitor import HealthMonitor
from stalwart.logs.metrics import read_metrics

EXIT_OK, EXIT_CRITICAL, EXIT_WARNINGS = 0, 3, 4
_RANK = {"info": 0, "warning": 1, "critical": 2}


@dataclass
class Finding:
    symptom: str
    severity: str
    first_step: int
    evidence: str
    cause: str
    fix: str
    count: int = 1
    source: str = "live"  # "live" (recorded by the run) or "offline" (found by re-running)


@dataclass
class Report:
    run_dir: Path
    status: str
    summary: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)

    @property
    def worst(self) -> str | None:
        return max((f.severity for f in self.findings), key=_RANK.__getitem__, default=None)

    @property
    def exit_code(self) -> int:
        return {"critical": EXIT_CRITICAL, "warning": EXIT_WARNINGS}.get(self.worst, EXIT_OK)


def load_run_config(run_dir: Path) -> Config:
    """The run's config.toml, tolerantly: fields this version does not know are ignored."""
    cfg = Config()
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return cfg
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        return cfg
    for sec, body in tree.items():
        for key, value in body.items() if isinstance(body, dict) else ():
            try:
                _set(cfg, f"{sec}.{key}", value, f"{sec}.{key}")
            except UserError:
                continue
    return cfg


def _float(v) -> float:
    try:
        return float(v)  # records write NaN/Inf as the strings "nan", "inf"
    except (TypeError, ValueError):
        return math.nan


def replay(records: list[dict], cfg: Config) -> list[dict]:
    """Re-run the live detectors over the records, in order; return their diagnoses."""
    health = dataclasses.replace(cfg.health, enabled=True)  # the run's settings, always on
    mon = HealthMonitor(health, cfg.optim.grad_clip)
    found: list[dict] = []
    for r in records:
        event = r.get("event")
        if event == "rollback":
            mon.after_rollback(int(r.get("to_step", 0)))
        elif event == "resume":
            mon.load_state_dict(mon.state_dict())  # judge the next steps against the window
        elif "train_loss" in r and "step" in r:
            loss, norm = _float(r["train_loss"]), _float(r.get("grad_norm"))
            found += mon.check_step(int(r["step"]), loss, norm).diagnoses
            found += mon.observe(r).diagnoses
    return found


def _findings(live: list[dict], offline: list[dict]) -> list[Finding]:
    by_symptom: dict[str, Finding] = {}
    for source, diags in (("live", live), ("offline", offline)):
        for d in diags:
            sym = d.get("symptom", "?")
            f = by_symptom.get(sym)
            if f is None:
                rule = PLAYBOOK.get(sym)
                by_symptom[sym] = Finding(
                    sym,
                    d.get("severity") or (rule.severity if rule else "warning"),
                    int(d.get("step", 0)),
                    str(d.get("evidence", "")),
                    str(d.get("cause") or (rule.cause if rule else "")),
                    str(d.get("fix") or (rule.fix if rule else "")),
                    source=source,
                )
            elif f.source == source:  # the live record is authoritative for what it saw
                f.count += 1
                if _RANK.get(d.get("severity"), 0) > _RANK[f.severity]:
                    f.severity = d["severity"]
    return sorted(by_symptom.values(), key=lambda f: (-_RANK[f.severity], f.first_step))


def _status(records: list[dict], cfg: Config, metrics: Path) -> str:
    steps = [r["step"] for r in records if "train_loss" in r]
    last = max(steps, default=0)
    # the last word: a stop (by the doctor or a signal) counts unless a resume came after it
    ends = [
        ("doctor" if r.get("event") == "diagnosis" else r.get("event"))
        for r in records
        if r.get("event") in ("stopped", "resume")
        or (r.get("event") == "diagnosis" and r.get("action") == "stop")
    ]
    if ends and ends[-1] == "doctor":
        return f"stopped by the doctor at step {last}/{cfg.train.max_steps}"
    if ends and ends[-1] == "stopped" and last < cfg.train.max_steps:
        return f"stopped by a signal at step {last}/{cfg.train.max_steps} (resumable)"
    if last >= cfg.train.max_steps:
        return f"finished: step {last}/{cfg.train.max_steps}"
    age = time.time() - metrics.stat().st_mtime if metrics.is_file() else math.inf
    return (
        f"incomplete: last record at step {last}/{cfg.train.max_steps}, written {age:.0f}s ago "
        "(still running, or crashed/killed: `stalwart train` with the same config resumes it)"
    )


def _checkpoints(run_dir: Path) -> tuple[list[str], list[Finding]]:
    """One line about the checkpoints, and a critical finding if the newest holds NaN."""
    root = Path(run_dir) / "checkpoints"
    dirs = ck.step_dirs(root)
    if not dirs:
        return ["no step checkpoints yet"], []
    newest = dirs[-1]
    info = ck.verify(newest)
    line = f"{len(dirs)} step checkpoints; newest {newest.name}: "
    if not info.ok:
        return [line + f"NOT usable ({info.problem})"], []
    bad = nonfinite_tensors(ck.read_model_state(newest))
    if not bad:
        return [line + "valid, finite weights"], []
    f = Finding(
        "nonfinite_weights",
        "critical",
        ck.step_of(newest) or 0,
        f"{newest.name}: {len(bad)} weight tensors hold NaN/Inf ({', '.join(bad[:3])})",
        PLAYBOOK["nonfinite_weights"].cause,
        "resume from an older checkpoint (--run.resume PATH)",
    )
    return [line + "holds NaN/Inf weights"], [f]


def diagnose_run(run_dir: str | Path, check_checkpoints: bool = True) -> Report:
    """The report on a run; `check_checkpoints`: verify the newest one and look for NaN in it
    (reads its weights; the dashboard at the end of a run skips it)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} is not a run directory (no metrics.jsonl): pass a --run.dir")
    records = read_metrics(metrics)
    cfg = load_run_config(run_dir)
    live = [r for r in records if r.get("event") == "diagnosis"]
    report = Report(run_dir, _status(records, cfg, metrics))
    report.findings = _findings(live, replay(records, cfg))
    report.rollbacks = [r for r in records if r.get("event") == "rollback"]
    train = [r for r in records if "train_loss" in r]
    vals = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), int | float)]
    if train:
        report.summary.append(
            f"last train loss {_float(train[-1]['train_loss']):.4g}"
            + (f", best val loss {min(vals):.4g}" if vals else "")
        )
    if check_checkpoints:
        lines, more = _checkpoints(run_dir)
        report.summary += lines
        report.findings += more
    return report


def format_report(report: Report, max_rollbacks: int | None = None) -> str:
    out = [f"stalwart doctor: {report.run_dir}  ({report.status})"]
    out += [f"  {line}" for line in report.summary]
    if not report.findings:
        out.append("\nno symptoms of the playbook found: healthy")
    else:
        n = len(report.findings)
        out.append(f"\n{n} finding{'s' if n > 1 else ''}:")
    for f in report.findings:
        times = f"{f.count} time{'s' if f.count > 1 else ''}"
        where = "" if f.source == "live" else " (found by re-running the detectors)"
        out.append(f"  [{f.severity}] {PLAYBOOK[f.symptom].row}: {f.symptom} at step "
                   f"{f.first_step} ({times}){where}")  # fmt: skip
        out.append(f"      evidence:     {f.evidence}")
        out.append(f"      likely cause: {f.cause}")
        out.append(f"      fix:          {f.fix}")
    if report.rollbacks:
        budget = report.rollbacks[-1].get("budget", max_rollbacks)
        out.append(f"  rollbacks: {len(report.rollbacks)} (budget {budget})")
        for r in report.rollbacks:
            a, b = r.get("skipped_batches", [0, 0])
            out.append(
                f"      step {r['step']} -> step {r.get('to_step')} ({r.get('symptom')}); "
                f"skipped batches {a}..{b - 1}; LR x{r.get('lr_scale')} until step "
                f"{r.get('lr_backoff_until')}"
            )
    verdict = {EXIT_OK: "healthy", EXIT_WARNINGS: "warnings", EXIT_CRITICAL: "critical"}
    out.append(f"\nverdict: {verdict[report.exit_code]} (exit {report.exit_code})")
    return "\n".join(out)


def run_doctor(run_dir: str | Path, as_json: bool = False) -> int:
    report = diagnose_run(run_dir)
    if as_json:
        print(json.dumps(_as_dict(report), indent=2))
    else:
        print(format_report(report))
    return report.exit_code


def _as_dict(report: Report) -> dict:
    return {
        "run_dir": str(report.run_dir),
        "status": report.status,
        "summary": report.summary,
        "findings": [f.__dict__ for f in report.findings],
        "rollbacks": report.rollbacks,
        "exit_code": report.exit_code,
    }
