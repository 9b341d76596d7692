"""The run dashboard: the lesson's "single most useful debugging instrument".

Five panels against the step: (1) train loss, (2) val loss, (3) pre-clip grad norm with the
clip threshold and the clipped steps, (4) learning rate, (5) tokens/s with MFU on a twin axis;
checkpoints, diagnoses and rollbacks are marked on every panel, so a spike in one panel can be
read against the others (a grad-norm spike often comes 1-2 steps before the loss reacts).
`stalwart dashboard RUN_DIR` writes dashboard.png and a self-contained dashboard.html (the PNG
inlined as base64, no network assets); `stalwart train` writes both at the end of every run.
matplotlib (Agg backend) is imported only when drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from stalwart.health.dashboard_html import to_html
from stalwart.health.detectors import robust_center
from stalwart.health.doctor import Report, diagnose_run, load_run_config
from stalwart.logs.metrics import read_metrics

PANELS = ("train loss", "val loss", "grad norm", "learning rate", "throughput")
# each panel's data colour (tests look for it inside the panel), and the event markers'
COLORS = {
    "train loss": "#1f77b4",
    "val loss": "#9467bd",
    "grad norm": "#2ca02c",
    "learning rate": "#8c564b",
    "throughput": "#17becf",
    "mfu": "#bcbd22",
    "checkpoint": "#9a9a9a",
    "info": "#7fa7d0",
    "warning": "#ff7f0e",
    "critical": "#d62728",
    "rollback": "#e377c2",
    "abandoned": "#b0b0b0",
}
SIZE_IN, DPI = (11.0, 15.0), 100  # 1100 x 1500 pixels
MAX_EVENT_LINES = 200  # a long run's checkpoints would paint the panels grey


@dataclass
class RunData:
    """A run's records sorted for plotting: the surviving timeline and what was rolled back."""

    train: list[dict] = field(default_factory=list)  # one record per step, final branch
    abandoned: list[dict] = field(default_factory=list)  # steps undone by a rollback
    checkpoints: list[int] = field(default_factory=list)
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
        elif event == "diagnosis":
            run.diagnoses.append(r)
        elif "train_loss" in r and "step" in r:
            by_step[int(r["step"])] = r
    run.train = [by_step[s] for s in sorted(by_step)]
    return run


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), _num(r.get(key))) for r in records if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def _smooth(values: list[float]) -> list[float]:
    """A centred moving average over ~1/40 of the run: unlike an EMA it does not lag behind
    the fast early fall of the loss."""
    import numpy as np

    half = len(values) // 80
    if half == 0:
        return list(values)
    v = np.asarray(values, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(v))
    return list((c[hi] - c[lo]) / (hi - lo))


def _robust_top(values: list[float]) -> float | None:
    """The top of a y-axis that a spike of 1000x does not flatten: the largest value within
    20 robust standard deviations of the median; anything above is drawn as off-scale."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    med, sigma = robust_center(finite)
    return max(v for v in finite if v <= med + 20 * sigma)


def _mark_events(ax, run: RunData) -> None:
    for s in run.checkpoints[:MAX_EVENT_LINES]:
        ax.axvline(s, color=COLORS["checkpoint"], lw=0.7, ls=":", zorder=0)
    for d in run.diagnoses[:MAX_EVENT_LINES]:
        color = COLORS.get(d.get("severity"), COLORS["warning"])
        ax.axvline(int(d["step"]), color=color, lw=1.3, alpha=0.85, zorder=1)
    for r in run.rollbacks:
        ax.axvline(int(r["step"]), color=COLORS["rollback"], lw=1.8, ls="--", zorder=1)


def _off_scale(ax, steps, values, top, color) -> None:
    """Values above the axis (spikes) as triangles on its top edge, labelled with the value;
    non-finite ones (NaN/Inf) as crosses."""
    for s, v in zip(steps, values):
        if not math.isfinite(v):
            ax.plot([s], [top], marker="x", color=COLORS["critical"], ms=8, clip_on=False)
        elif v > top:
            ax.plot([s], [top], marker="^", color=color, ms=8, clip_on=False)
            ax.annotate(f"{v:.3g}", (s, top), xytext=(4, -10), textcoords="offset points",
                        fontsize=7, color=color)  # fmt: skip


def _loss_panel(ax, run: RunData, key: str, title: str) -> None:
    steps, vals = _series(run.train, key)
    color = COLORS[title]
    ax.set_title(f"{title} (lower is better)")
    ax.set_ylabel("loss (nats/token)")
    if not steps:
        ax.text(0.5, 0.5, f"no {title} records yet", ha="center", transform=ax.transAxes)
        return
    top = _robust_top(vals + (_series(run.abandoned, key)[1] if key == "train_loss" else []))
    if key == "train_loss":
        a_steps, a_vals = _series(run.abandoned, key)
        if a_steps:
            ax.plot(a_steps, a_vals, ".", color=COLORS["abandoned"], ms=3)
        # the trajectory: applied steps only (a skipped spike is marked, not averaged in)
        kept = [(s, v) for s, v, r in zip(steps, vals, run.train) if not r.get("skipped")]
        kept = [(s, v) for s, v in kept if top is None or v <= top]
        k_steps, k_vals = [s for s, _ in kept], [v for _, v in kept]
        ax.plot(k_steps, k_vals, color=color, lw=0.7, alpha=0.45)
        ax.plot(k_steps, _smooth(k_vals), color=color, lw=2.0)
    else:
        ax.plot(steps, vals, "o-", color=color, lw=1.8, ms=4)
        best = min(range(len(vals)), key=lambda i: vals[i] if math.isfinite(vals[i]) else 1e30)
        ax.plot([steps[best]], [vals[best]], "*", color=color, ms=14)
    if top is not None:
        bottom = min(v for v in vals if math.isfinite(v))
        pad = 0.08 * max(top - bottom, 1e-3)
        ax.set_ylim(bottom - pad, top + pad)
        _off_scale(ax, steps, vals, top + pad, color)
    if key == "train_loss":  # name each symptom once, where it first fired
        seen = set()
        for d in run.diagnoses:
            if d.get("symptom") not in seen:
                seen.add(d.get("symptom"))
                ax.annotate(d.get("symptom", ""), (int(d["step"]), 0.0), xycoords=("data",
                            "axes fraction"), xytext=(3, 3), textcoords="offset points",
                            rotation=90, va="bottom", fontsize=8,
                            color=COLORS.get(d.get("severity"), COLORS["warning"]))  # fmt: skip


def _grad_panel(ax, run: RunData, clip: float) -> None:
    steps, norms = _series(run.train, "grad_norm")
    color = COLORS["grad norm"]
    ax.set_title("pre-clip gradient norm (log scale)")
    ax.set_ylabel("L2 norm")
    ok = [(s, v) for s, v in zip(steps, norms) if math.isfinite(v) and v > 0]
    if not ok:
        ax.text(0.5, 0.5, "no gradient norms recorded", ha="center", transform=ax.transAxes)
        return
    ax.plot([s for s, _ in ok], [v for _, v in ok], color=color, lw=1.2)
    ax.set_yscale("log")
    clipped = [(s, v) for (s, v), r in zip(zip(steps, norms), run.train) if r.get("clipped")]
    clipped = [(s, v) for s, v in clipped if math.isfinite(v) and v > 0]
    if clipped:
        ax.plot([s for s, _ in clipped], [v for _, v in clipped], "o", ms=3.5, mfc="none",
                mec=COLORS["warning"], mew=0.9)  # fmt: skip
    if clip and math.isfinite(clip):
        ax.axhline(clip, color="#333333", ls="--", lw=1.2)
        ax.annotate(f"clip = {clip:g}", (0.005, clip), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8)  # fmt: skip
    rate = len(clipped) / max(len(ok), 1)
    ax.set_title(f"pre-clip gradient norm (log scale; clipped at {100 * rate:.0f}% of steps)")


def _lr_panel(ax, run: RunData) -> None:
    steps, lrs = _series(run.train, "lr")
    ax.set_title("learning rate")
    ax.set_ylabel("LR")
    if steps:
        ax.plot(steps, lrs, color=COLORS["learning rate"], lw=1.8)
        ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _throughput_panel(ax, run: RunData) -> None:
    steps, tps = _series(run.train, "tokens_per_sec")
    ax.set_title("throughput")
    ax.set_ylabel("tokens/s")
    ax.set_xlabel("step")
    if not steps:
        ax.text(0.5, 0.5, "no throughput records yet", ha="center", transform=ax.transAxes)
        return
    ax.plot(steps, tps, color=COLORS["throughput"], lw=1.5)
    ax.set_ylim(bottom=0, top=1.15 * max(v for v in tps if math.isfinite(v)))
    m_steps, mfu = _series(run.train, "mfu")
    if m_steps and any(math.isfinite(v) for v in mfu):
        twin = ax.twinx()
        twin.plot(m_steps, [100 * v for v in mfu], color=COLORS["mfu"], lw=1.2, ls="--")
        twin.set_ylabel("MFU (%)", color=COLORS["mfu"])
        twin.set_ylim(bottom=0)
        ax.set_title("throughput (tokens/s) and MFU (dashed, right axis)")


def _legend(fig):
    from matplotlib.lines import Line2D

    entries = [
        ("train loss (smoothed bold)", dict(color=COLORS["train loss"], lw=2)),
        ("val loss (* best)", dict(color=COLORS["val loss"], marker="o", lw=1.8)),
        ("grad norm", dict(color=COLORS["grad norm"], lw=1.2)),
        ("clip threshold", dict(color="#333333", ls="--")),
        ("clipped step", dict(color=COLORS["warning"], marker="o", mfc="none", lw=0)),
        ("learning rate", dict(color=COLORS["learning rate"], lw=1.8)),
        ("tokens/s", dict(color=COLORS["throughput"], lw=1.5)),
        ("MFU", dict(color=COLORS["mfu"], ls="--")),
        ("checkpoint", dict(color=COLORS["checkpoint"], ls=":")),
        ("diagnosis: info", dict(color=COLORS["info"])),
        ("diagnosis: warning", dict(color=COLORS["warning"])),
        ("diagnosis: critical", dict(color=COLORS["critical"])),
        ("rollback", dict(color=COLORS["rollback"], ls="--", lw=1.8)),
        ("rolled-back steps", dict(color=COLORS["abandoned"], marker=".", lw=0)),
        ("off scale / NaN", dict(color=COLORS["critical"], marker="x", lw=0)),
    ]
    handles = [Line2D([], [], **kw) for _, kw in entries]
    fig.legend(handles, [e[0] for e in entries], loc="upper center", ncol=5, fontsize=8.5,
               bbox_to_anchor=(0.5, 0.962), frameon=False)  # fmt: skip


def render(run: RunData, clip: float, title: str, png: Path) -> dict[str, tuple[int, ...]]:
    """Draw the five panels into `png`; return each panel's pixel box (x0, y0, x1, y1), origin
    at the top left of the image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    axes = fig.subplots(5, 1, sharex=True)
    fig.subplots_adjust(top=0.895, bottom=0.04, left=0.085, right=0.915, hspace=0.38)
    fig.suptitle(title, fontsize=12, y=0.992)
    _loss_panel(axes[0], run, "train_loss", "train loss")
    _loss_panel(axes[1], run, "val_loss", "val loss")
    _grad_panel(axes[2], run, clip)
    _lr_panel(axes[3], run)
    _throughput_panel(axes[4], run)
    for ax in axes:
        _mark_events(ax, run)
        ax.grid(True, alpha=0.25)
        ax.tick_params(labelbottom=True)
    _legend(fig)
    fig.canvas.draw()
    height = fig.bbox.height
    boxes = {}
    for name, ax in zip(PANELS, axes):
        b = ax.get_window_extent()
        boxes[name] = tuple(round(v) for v in (b.x0, height - b.y1, b.x1, height - b.y0))
    fig.savefig(png, dpi=DPI)
    return boxes


def _title(run_dir: Path, run: RunData, report: Report) -> str:
    last = run.train[-1] if run.train else {}
    vals = [v for v in _series(run.train, "val_loss")[1] if math.isfinite(v)]
    parts = [f"stalwart run {run_dir.name}", report.status.split(":")[0]]
    if last:
        parts.append(f"step {last['step']}, train loss {_num(last['train_loss']):.4g}")
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
    page.write_text(to_html(report, run, png.read_bytes()))
    return png, page, boxes


def write_dashboard_quietly(run_dir: str | Path, say=print) -> Path | None:
    """End of a run: a failure to plot must never fail the run, only say so."""
    try:
        return write_dashboard(run_dir)[0]
    except Exception as e:  # noqa: BLE001 (anything: matplotlib missing, a full disk, a bug)
        say(f"warning: could not write the dashboard ({type(e).__name__}: {e})")
        return None
