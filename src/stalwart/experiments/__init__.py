"""`stalwart experiment NAME`: reproducible experiments that write a report (markdown + PNG).

Each experiment is a module with `run(ctx: common.Context) -> Path` (the report it wrote). They
train through the real `stalwart.train.train`, on the built-in stdlib corpus unless told
otherwise. Add one by writing the module and naming it here.
"""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

from stalwart.errors import UserError
from stalwart.experiments.common import Context, ensure_dataset

# NAME -> module path (a plain dict: no registry magic)
EXPERIMENTS: dict[str, str] = {
    "optimizers": "stalwart.experiments.optimizers",
    "schedule": "stalwart.experiments.schedule",
    "precision": "stalwart.experiments.precision",
    "fp16-no-scaler": "stalwart.experiments.fp16_no_scaler",
    "high-lr": "stalwart.experiments.high_lr",
    "memory-table": "stalwart.experiments.memory_table",
    "activation-checkpointing": "stalwart.experiments.activation_checkpointing",
    "accumulation": "stalwart.experiments.accumulation",
    "main-job": "stalwart.experiments.main_job",
}


def command_line(name: str, out: Path, quick: bool, data_dir: Path | None) -> str:
    """The command that reproduces a run of `name` with these arguments."""
    parts = ["stalwart", "experiment", name, "--out", str(out)]
    if quick:
        parts.append("--quick")
    if data_dir is not None:
        parts += ["--data", str(data_dir)]
    return shlex.join(parts)


def run_experiment(
    name: str,
    out: str | Path | None = None,
    quick: bool = False,
    data_dir: str | Path | None = None,
) -> Path:
    """Run experiment `name` into `out` (default experiments/NAME); returns its report.md."""
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
    out = Path(out) if out else Path("experiments") / name
    data = Path(data_dir) if data_dir else None
    ctx = Context(
        name=name,
        out=out,
        quick=quick,
        data_dir=ensure_dataset(data),
        command=command_line(name, out, quick, data),
    )
    module = importlib.import_module(EXPERIMENTS[name])
    return module.run(ctx)
