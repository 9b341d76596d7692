"""The run dashboard: the lesson's "single most useful debugging instrument".

Five panels against the step: (1) train loss, (2) val loss, (3) pre-clip grad norm with the
clip threshold and the clipped steps, (4) learning rate, (5) tokens/s with MFU on a twin axis;
checkpoints, diagnoses and rollbacks are marked on every panel, so a spike in one panel can be
read against the others (a grad-norm spike often comes 1-2 steps before the loss reacts).
`stalwart dashboard RUN_DIR` writes dashboard.png and a self-contained dashboard.html (the PNG
inlined as base64, no network assets); `stalwart train` writes both at the end of every run.
A long run (more than `MAX_POINTS` records) is drawn reduced: bucket medians over min-max
bands, thinned markers and checkpoint lines, every diagnosis and rollback (dashboard_panels.py,
downsample.py). matplotlib (Agg backend) is imported only when drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from stalwart.health import dashboard_panels as panels
from stalwart.health.dashboard_eval import eval_section
from stalwart.health.dashboard_html import to_html
from stalwart.health.dashboard_panels import COLORS, View, num, series
from stalwart.health.doctor import Report, diagnose_run, load_run_config
from stalwart.health.downsample import MAX_POINTS, bucket_width, one_per_bucket, thin_steps
from stalwart.logs.metrics import read_metrics

__all__ = ["COLORS", "PANELS", "RunData", "draw", "render", "split_records", "write_dashboard"]

PANELS = ("train loss", "val loss", "grad norm", "learning rate", "throughput")
SIZE_IN, DPI = (11.0, 15.0), 100  # 1100 x 1500 pixels
MAX_CHECKPOINT_LINES = 40  # checkpoints drawn per panel (+ best, last, rollback targets)
EVENT_COLUMNS = 450  # a reduced run: one diagnosis / rollback line per 1/450 (2 pixels)
SEVERITY = {"info": 0, "warning": 1, "critical": 2}


@dataclass
class RunData:
    """A run's records sorted for plotting: the surviving timeline and what was rolled back."""

    train: list[dict] = field(default_factory=list)  # one record per step, final branch
    abandoned: list[dict] = field(default_factory=list)  # steps undone by a rollback
    checkpoints: list[int] = field(default_factory=list)
    best_checkpoints: list[int] = field(default_factory=list)  # those also saved as best/
    diagnoses: list[dict] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)


def split_records(records: list[dict]) -> RunData:
    """A rollback to step c abandons the records of steps > c written before it; the steps are
    then trained again. Keep the final timeline, and the abandoned one to draw faintly."""
    run = RunData()
    by_step: dict[int, dict] = {}
    for r in records:
        event = r.get("event")
        if event == "rollback":
            run.rollbacks.append(r)
            to = int(r.get("to_step", 0))
            run.abandoned += [by_step.pop(s) for s in sorted(by_step) if s > to]
        elif event == "checkpoint":
            run.checkpoints.append(int(r["step"]))
            if any(Path(str(p)).name == "best" for p in r.get("paths") or ()):
                run.best_checkpoints.append(int(r["step"]))
        elif event == "diagnosis":
            run.diagnoses.append(r)
        elif "train_loss" in r and "step" in r:
            by_step[int(r["step"])] = r
    run.train = [by_step[s] for s in sorted(by_step)]
    return run


@dataclass
class Marks:
    """The event lines every panel draws: a long run's checkpoints thinned to what the eye can
    separate (keeping the best, the last and every rollback's target), its diagnoses and
    rollbacks merged only where they share a 2-pixel column (the most severe shown)."""

    checkpoints: list[int]
    diagnoses: list[dict]
    rollbacks: list[dict]

    @classmethod
    def of(cls, run: RunData, view: View) -> Marks:
        keep = run.checkpoints[-1:] + run.best_checkpoints[-1:]
        keep += [int(r.get("to_step", -1)) for r in run.rollbacks]
        ckpts = thin_steps(run.checkpoints, view.lo, view.hi, MAX_CHECKPOINT_LINES, keep)
        width = (view.hi - view.lo) / EVENT_COLUMNS if view.reduced else 0.0
        rank = [SEVERITY.get(d.get("severity"), 1) for d in run.diagnoses]
        diags = one_per_bucket([int(d["step"]) for d in run.diagnoses], view.lo, width, rank)
        rbs = one_per_bucket([int(r["step"]) for r in run.rollbacks], view.lo, width)
        return cls(ckpts, [run.diagnoses[i] for i in diags], [run.rollbacks[i] for i in rbs])

    def draw(self, ax) -> None:
        for s in self.checkpoints:
            ax.axvline(s, color=COLORS["checkpoint"], lw=0.7, ls=":", zorder=0)
        for d in self.diagnoses:
            color = COLORS.get(d.get("severity"), COLORS["warning"])
            ax.axvline(int(d["step"]), color=color, lw=1.3, alpha=0.85, zorder=1)
        for r in self.rollbacks:
            ax.axvline(int(r["step"]), color=COLORS["rollback"], lw=1.8, ls="--", zorder=1)


def _legend(fig, reduced: bool) -> None:
    from matplotlib.lines import Line2D

    c = COLORS
    entries = [
        (("train loss (median; smoothed bold)" if reduced else "train loss (smoothed bold)"),
         dict(color=c["train loss"], lw=2)),
        ("val loss (* best)", dict(color=c["val loss"], marker=None if reduced else "o", lw=1.8)),
        ("grad norm", dict(color=c["grad norm"], lw=1.2)),
        ("clip threshold", dict(color="#333333", ls="--")),
        ("clipped % (right axis)", dict(color=c["warning"], lw=0.9)) if reduced else
        ("clipped step", dict(color=c["warning"], marker="o", mfc="none", lw=0)),
        ("learning rate", dict(color=c["learning rate"], lw=1.8)),
        ("tokens/s", dict(color=c["throughput"], lw=1.5)),
        ("MFU", dict(color=c["mfu"], ls="--")),
        ("checkpoint", dict(color=c["checkpoint"], ls=":")),
        ("diagnosis: info", dict(color=c["info"])),
        ("diagnosis: warning", dict(color=c["warning"])),
        ("diagnosis: critical", dict(color=c["critical"])),
        ("rollback", dict(color=c["rollback"], ls="--", lw=1.8)),
        ("rolled-back steps", dict(color=c["abandoned"], marker=".", lw=0)),
        ("off scale / NaN", dict(color=c["critical"], marker="x", lw=0)),
    ]  # fmt: skip
    if reduced:  # what the bands mean
        entries.append(("band: min-max, 10-90%", dict(color="#a9c4de", lw=7)))
    ncol = 6 if reduced else 5
    handles = [Line2D([], [], **kw) for _, kw in entries]
    fig.legend(handles, [e[0] for e in entries], loc="upper center", ncol=ncol, fontsize=8.5,
               bbox_to_anchor=(0.5, 0.962), frameon=False)  # fmt: skip


def draw(run: RunData, clip: float, title: str):
    """The five panels as a matplotlib Figure (not yet drawn)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    axes = fig.subplots(5, 1, sharex=True)
    fig.subplots_adjust(top=0.895, bottom=0.04, left=0.085, right=0.915, hspace=0.38)
    fig.suptitle(title, fontsize=12, y=0.992)
    view = View.of(run)
    panels.loss_panel(axes[0], run, "train_loss", "train loss", view)
    panels.loss_panel(axes[1], run, "val_loss", "val loss", view)
    panels.grad_panel(axes[2], run, clip, view)
    panels.lr_panel(axes[3], run, view)
    panels.throughput_panel(axes[4], run, view)
    marks = Marks.of(run, view)
    for ax in axes:
        marks.draw(ax)
        ax.grid(True, alpha=0.25)
        ax.tick_params(labelbottom=True)
    _legend(fig, view.reduced)
    return fig


def render(run: RunData, clip: float, title: str, png: Path) -> dict[str, tuple[int, ...]]:
    """Draw the five panels into `png`; return each panel's pixel box (x0, y0, x1, y1), origin
    at the top left of the image."""
    fig = draw(run, clip, title)
    fig.canvas.draw()
    height = fig.bbox.height
    boxes = {}
    for name, ax in zip(PANELS, fig.axes[:5]):
        b = ax.get_window_extent()
        boxes[name] = tuple(round(v) for v in (b.x0, height - b.y1, b.x1, height - b.y0))
    fig.savefig(png, dpi=DPI)
    return boxes


def drawing_note(run: RunData) -> str:
    """How a long run was reduced, in words (the HTML page says it under the picture)."""
    view = View.of(run)
    if not view.reduced:
        return ""
    width = bucket_width(len(run.train), view.lo, view.hi)
    marks = Marks.of(run, view)

    def shown(drawn: list, every: list, what: str) -> str:
        if len(drawn) == len(every):
            return f"all {len(every)} {what}"
        return f"{len(drawn)} of {len(every)} {what} (those sharing a 2-pixel column merged)"

    return (
        f"{len(run.train):,} steps drawn as {MAX_POINTS} buckets of ~{width:.3g} steps: the "
        "line is each bucket's median, the bands its min-max and 10-90th percentiles; the "
        "grad-norm panel dots its spikes and shows the share of clipped steps over the last "
        f"{panels.CLIP_WINDOW} steps (right axis); {len(marks.checkpoints)} of "
        f"{len(run.checkpoints)} checkpoint lines (the best, the last and every rollback's "
        f"target kept); {shown(marks.diagnoses, run.diagnoses, 'diagnoses')} and "
        f"{shown(marks.rollbacks, run.rollbacks, 'rollbacks')} marked."
    )


def _title(run_dir: Path, run: RunData, report: Report) -> str:
    last = run.train[-1] if run.train else {}
    vals = [v for v in series(run.train, "val_loss")[1] if math.isfinite(v)]
    parts = [f"stalwart run {run_dir.name}", report.status.split(":")[0]]
    if last:
        parts.append(f"step {last['step']}, train loss {num(last['train_loss']):.4g}")
    if vals:
        parts.append(f"best val {min(vals):.4g}")
    return " | ".join(parts)


def write_dashboard(run_dir: str | Path) -> tuple[Path, Path, dict]:
    """Write RUN_DIR/dashboard.png and dashboard.html; return their paths and panel boxes."""
    run_dir = Path(run_dir)
    report = diagnose_run(run_dir, check_checkpoints=False)
    cfg = load_run_config(run_dir)
    run = split_records(read_metrics(run_dir / "metrics.jsonl"))
    png, page = run_dir / "dashboard.png", run_dir / "dashboard.html"
    boxes = render(run, cfg.optim.grad_clip, _title(run_dir, run, report), png)
    downstream = eval_section(run.train, run_dir / "samples.jsonl")  # tasks, samples
    page.write_text(to_html(report, run, png.read_bytes(), drawing_note(run), downstream))
    return png, page, boxes


def write_dashboard_quietly(run_dir: str | Path, say=print) -> Path | None:
    """End of a run: a failure to plot must never fail the run, only say so."""
    try:
        return write_dashboard(run_dir)[0]
    except Exception as e:  # noqa: BLE001 (anything: matplotlib missing, a full disk, a bug)
        say(f"warning: could not write the dashboard ({type(e).__name__}: {e})")
        return None
