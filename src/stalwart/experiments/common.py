"""What every experiment shares: the data, configs, runs of the real loop, records, figures and
the report.

An experiment is a function `run(ctx: Context) -> Path` in its own module. It trains through
the one real `stalwart.train.train(cfg)` (never a re-implemented loop), reads the runs' own
metrics.jsonl, draws a figure with matplotlib's Agg backend (no display needed) and writes
`OUT/report.md` with the machine, the exact command and the conclusion. Run directories go to
`OUT/runs/` (ignored by git through `OUT/.gitignore`, so a results dir can be committed).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stalwart.config import Config, load_config
from stalwart.data.prepare import prepare
from stalwart.errors import UserError
from stalwart.hardware import cpu_model
from stalwart.logs.metrics import read_metrics
from stalwart.train import train

DEFAULT_DATA = Path("data/stdlib-byte")


@dataclass
class Context:
    """Where an experiment writes, how big it runs, on which data, and the command that ran it."""

    name: str
    out: Path
    quick: bool
    data_dir: Path
    command: str
    started: float = field(default_factory=time.time)

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"


def ensure_dataset(data_dir: str | Path | None = None) -> Path:
    """The prepared dataset dir; the built-in stdlib corpus (byte tokens) is prepared if missing."""
    path = Path(data_dir) if data_dir else DEFAULT_DATA
    if not (path / "meta.json").is_file():
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} exists but holds no prepared dataset (no meta.json)")
        print(f"preparing the built-in stdlib corpus into {path} (once)", flush=True)
        prepare([], "byte", path)
    return path


def to_flags(overrides: dict[str, Any]) -> list[str]:
    """{"optim.lr": 3e-3, "model.bias": False} -> ["--optim.lr", "0.003", "--model.bias", "false"]."""
    flags = []
    for key, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        flags += [f"--{key}", text]
    return flags


def make_config(ctx: Context, run_name: str, overrides: dict[str, Any]) -> Config:
    """A validated Config: the experiment's overrides, this run's dir, the context's data."""
    fixed = {"run.dir": ctx.runs_dir / run_name, "data.dir": ctx.data_dir, "run.resume": "never"}
    return load_config(None, to_flags({**overrides, **fixed}))


@dataclass
class RunRecord:
    """A finished run: its config, the loop's result, its records and how long it took."""

    name: str
    cfg: Config
    result: Any  # stalwart.train.RunResult
    records: list[dict]
    wall_s: float

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric over the run."""
        rows = [r for r in self.records if key in r and "step" in r and "event" not in r]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]

    @property
    def final_val(self) -> float:
        return float(self.result.val_loss)

    def median(self, key: str) -> float | None:
        values = sorted(self.curve(key)[1])
        return values[len(values) // 2] if values else None


def run_training(ctx: Context, run_name: str, overrides: dict[str, Any], callbacks=()) -> RunRecord:
    """Train one configuration from scratch with the real loop (watched by `callbacks`, if
    any); a previous run of it is replaced."""
    cfg = make_config(ctx, run_name, overrides)
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out / ".gitignore").write_text("runs/\n")
    print(f"[{ctx.name}] {run_name}: training into {cfg.run.dir}", flush=True)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        result = train(cfg, progress=False, callbacks=callbacks)
    finally:
        torch.set_num_threads(threads)  # run.threads is process-wide: do not leak it
    wall = time.perf_counter() - t0
    records = read_metrics(Path(cfg.run.dir) / "metrics.jsonl")
    print(f"[{ctx.name}] {run_name}: val loss {result.val_loss:.4f} in {wall:.1f} s", flush=True)
    # the run's resolved config: the dataset's vocabulary filled in (cfg itself is unchanged)
    return RunRecord(run_name, result.cfg, result, records, wall)


def final_checkpoint(rec: RunRecord) -> Path:
    return Path(rec.cfg.run.dir) / "checkpoints" / f"step_{rec.result.step:08d}"


# ----------------------------------------------------------------------------------------------
# Figures and the report


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    """(fig, axes) on the Agg backend: PNGs without a display; matplotlib imported lazily."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_curves(fig, axes, path: Path, title: str, **legend) -> Path:
    """Save a figure of curves over the run: every axis gets the step axis, a grid and a legend
    (`legend`: its keyword arguments), the figure its title."""
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(**legend)
    fig.suptitle(title)
    return save_figure(fig, path)


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (the same correction Adam applies)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


QUICK_NOTE = "**--quick run: too short to support any conclusion; smoke test only.**"


def bullets(lines: list[str], quick: bool = False, note: str = QUICK_NOTE) -> str:
    """A conclusion's lines as a markdown list; a --quick run's list opens with `note`."""
    return "\n".join(f"- {line}" for line in ([note] if quick else []) + lines)


def setup_text(settings: dict[str, Any]) -> str:
    """The settings every run of an experiment shares, as "`key = value`, ..."."""
    return ", ".join(f"`{k} = {v}`" for k, v in settings.items())


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def machine_info() -> dict[str, str]:
    info = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):  # timings mean little on a busy machine: say how busy it was
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        info["load average (1, 5, 15 min) at the end"] = f"{load} on {os.cpu_count()} cores"
    return info


def write_report(ctx: Context, title: str, body: str, note: str = "") -> Path:
    """OUT/report.md: title, the command, the machine, then the experiment's own sections."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    minutes = (time.time() - ctx.started) / 60
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info().items())
    text = (
        f"# {title}\n\n"
        f"Command (from the repository root):\n\n```\n{ctx.command}\n```\n\n"
        f"Run {when}, {minutes:.1f} min wall clock"
        + (" (`--quick`: a CI-sized smoke run, not a result)" if ctx.quick else "")
        + f". Machine:\n\n{machine}\n"
        + (f"\n{note}\n" if note else "")
        + f"\n{body.strip()}\n"
    )
    path = ctx.out / "report.md"
    path.write_text(text)
    return path
