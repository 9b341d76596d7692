"""The dashboard's five panels. A short run is drawn point by point; past `MAX_POINTS` records
a series is drawn as its per-bucket median over a min-max band (downsample.py), clipped steps
as the clip rate per bucket, and off-scale / NaN markers one per `MARK_BUCKETS`th of the run:
what a panel ~900 pixels wide can show."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stalwart.health.detectors import robust_center
from stalwart.health.downsample import MAX_POINTS, Series, downsample, one_per_bucket

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
MARK_BUCKETS = 80  # a reduced run: one off-scale / NaN / spike marker per 1/80 (~11 pixels)
MAX_LABELS = 15  # off-scale values written beside their triangle: the largest ones,
LABEL_SPACING = 40  # ... none closer than 1/40 of the steps to another (they would overlap)
MAX_VAL_MARKERS = 100  # evaluations drawn as dots up to this many, as a line beyond
CLIP_WINDOW = 50  # a reduced run's clip rate: over the last 50 steps (health.window's default)


@dataclass
class View:
    """The steps a figure spans, and whether it is drawn reduced (`reduced`: more records than
    `MAX_POINTS`); every panel buckets the same range, so that their buckets line up."""

    lo: float = 0.0
    hi: float = 1.0
    reduced: bool = False

    @classmethod
    def of(cls, run) -> View:
        steps = [int(r["step"]) for r in run.train + run.abandoned]
        if not steps:
            return cls()
        return cls(min(steps), max(max(steps), min(steps) + 1), len(run.train) > MAX_POINTS)

    @property
    def span(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    @property
    def label_gap(self) -> float:
        return (self.hi - self.lo) / LABEL_SPACING

    @property
    def mark_width(self) -> float:
        return (self.hi - self.lo) / MARK_BUCKETS if self.reduced else 0.0

    def reduce(self, steps, values) -> Series:
        return downsample(steps, values, MAX_POINTS, self.span)


def num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), num(r.get(key))) for r in records if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def _smooth(values) -> list[float]:
    """A centred moving average over ~1/40 of the points: unlike an EMA it does not lag behind
    the fast early fall of the loss. NaN (an empty bucket) stays out of the sums."""
    v = np.asarray(values, dtype=float)
    half = len(v) // 80
    if half == 0:
        return list(v)
    ok = np.isfinite(v)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(v))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(v))
    with np.errstate(invalid="ignore", divide="ignore"):
        return list((c[hi] - c[lo]) / (n[hi] - n[lo]))


def _robust_top(values: list[float]) -> float | None:
    """The top of a y-axis that a spike of 1000x does not flatten: the largest value within
    20 robust standard deviations of the median; anything above is drawn as off-scale."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    med, sigma = robust_center(finite)
    return max(v for v in finite if v <= med + 20 * sigma)


def _draw(ax, ser: Series, color: str, lw: float, exact_style: str = "-", **kw) -> None:
    """A series: as recorded, or its bucket medians over the min-max band (and, darker, the
    10-90th percentile band inside it)."""
    if ser.exact:
        ax.plot(ser.steps, ser.median, exact_style, color=color, lw=lw, **kw)
        return
    ax.fill_between(ser.steps, ser.lo, ser.hi, color=color, alpha=0.16, lw=0)
    ax.fill_between(ser.steps, ser.q_lo, ser.q_hi, color=color, alpha=0.22, lw=0)
    for edge in (ser.lo, ser.hi):  # a one-bucket extreme (a spike) stays visible as a needle
        ax.plot(ser.steps, edge, color=color, lw=0.5, alpha=0.45)
    ax.plot(ser.steps, ser.median, color=color, lw=min(lw, 1.0), **kw)


def _off_scale(ax, steps, values, top, edge, color, view: View) -> None:
    """Values above `top` (spikes: the axis ends at `edge`) as triangles on its top edge, the
    largest labelled with their value; non-finite ones (NaN/Inf) as crosses. A reduced run:
    one of each per bucket of `MARK_BUCKETS` (the largest value / the first NaN)."""
    bad = [(s, v) for s, v in zip(steps, values) if not math.isfinite(v)]
    keep = one_per_bucket([s for s, _ in bad], view.lo, view.mark_width)
    if keep:
        ax.plot([bad[i][0] for i in keep], [edge] * len(keep), "x", color=COLORS["critical"],
                ms=8, clip_on=False)  # fmt: skip
    high = [(s, v) for s, v in zip(steps, values) if math.isfinite(v) and v > top]
    keep = one_per_bucket([s for s, _ in high], view.lo, view.mark_width, [v for _, v in high])
    if not keep:
        return
    ax.plot([high[i][0] for i in keep], [edge] * len(keep), "^", color=color, ms=8, clip_on=False)
    labelled: list[float] = []  # the largest first, none within 1/LABEL_SPACING of another
    for i in sorted(keep, key=lambda i: -high[i][1]):
        s = high[i][0]
        if len(labelled) == MAX_LABELS or any(abs(s - o) < view.label_gap for o in labelled):
            continue
        labelled.append(s)
        ax.annotate(f"{high[i][1]:.3g}", (s, edge), xytext=(4, -10),
                    textcoords="offset points", fontsize=7, color=color)  # fmt: skip


def _clip_rate(clipped: list[bool], window: int = CLIP_WINDOW) -> np.ndarray:
    """% of the last `window` steps that were clipped, at every step (the detector's view)."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(clipped, dtype=float))])
    i = np.arange(1, len(c))
    return 100.0 * (c[i] - c[np.maximum(i - window, 0)]) / np.minimum(i, window)


def _spikes(ax, ser: Series, top: float | None, color: str, view: View) -> None:
    """A reduced series' buckets whose max lies above `top` (the robust top): a dot on the
    max, one per `MARK_BUCKETS`th of the run, so that a one-step spike reads as one."""
    if top is None:
        return
    high = [i for i in range(len(ser)) if ser.hi[i] > top]
    keep = one_per_bucket(ser.steps[high], view.lo, view.mark_width, ser.hi[high])
    if keep:
        idx = [high[i] for i in keep]
        ax.plot(ser.steps[idx], ser.hi[idx], "o", color=color, ms=3.5, zorder=3)


def _train_loss(ax, run, vals, steps, top, view: View) -> None:
    color = COLORS["train loss"]
    a_steps, a_vals = series(run.abandoned, "train_loss")
    if a_steps:
        a = view.reduce(a_steps, a_vals)
        ax.plot(a.steps, a.median, ".", color=COLORS["abandoned"], ms=3)
    # the trajectory: applied steps only (a skipped spike is marked, not averaged in)
    kept = [(s, v) for s, v, r in zip(steps, vals, run.train) if not r.get("skipped")]
    kept = [(s, v) for s, v in kept if top is None or v <= top]
    ser = view.reduce([s for s, _ in kept], [v for _, v in kept])
    _draw(ax, ser, color, 0.7, alpha=0.45 if ser.exact else 0.7)
    ax.plot(ser.steps, _smooth(ser.median), color=color, lw=2.0)
    # a skipped spike within the axis: a triangle at its value (above it: _off_scale's)
    skipped = [(s, v) for s, v, r in zip(steps, vals, run.train) if r.get("skipped")]
    skipped = [(s, v) for s, v in skipped if math.isfinite(v) and (top is None or v <= top)]
    keep = one_per_bucket(
        [s for s, _ in skipped], view.lo, view.mark_width, [v for _, v in skipped]
    )
    if keep:
        ax.plot([skipped[i][0] for i in keep], [skipped[i][1] for i in keep], "^", color=color,
                ms=6)  # fmt: skip


def loss_panel(ax, run, key: str, title: str, view: View) -> None:
    steps, vals = series(run.train, key)
    color = COLORS[title]
    ax.set_title(f"{title} (lower is better)")
    ax.set_ylabel("loss (nats/token)")
    if not steps:
        ax.text(0.5, 0.5, f"no {title} records yet", ha="center", transform=ax.transAxes)
        return
    top = _robust_top(vals + (series(run.abandoned, key)[1] if key == "train_loss" else []))
    if key == "train_loss":
        _train_loss(ax, run, vals, steps, top, view)
    else:
        ser = view.reduce(steps, vals)
        style = "o-" if ser.exact and len(ser) <= MAX_VAL_MARKERS else "-"
        _draw(ax, ser, color, 1.8, style, ms=4)
        best = min(range(len(vals)), key=lambda i: vals[i] if math.isfinite(vals[i]) else 1e30)
        ax.plot([steps[best]], [vals[best]], "*", color=color, ms=14)
    if top is not None:
        bottom = min(v for v in vals if math.isfinite(v))
        pad = 0.08 * max(top - bottom, 1e-3)
        ax.set_ylim(bottom - pad, top + pad)
        _off_scale(ax, steps, vals, top, top + pad, color, view)
    else:  # not one finite value: the NaNs are the whole story
        ax.set_ylim(0, 1)
        _off_scale(ax, steps, vals, math.inf, 1.0, color, view)
    if key == "train_loss":  # name each symptom once, where it first fired
        seen = set()
        for d in run.diagnoses:
            if d.get("symptom") not in seen:
                seen.add(d.get("symptom"))
                ax.annotate(d.get("symptom", ""), (int(d["step"]), 0.0), xycoords=("data",
                            "axes fraction"), xytext=(3, 3), textcoords="offset points",
                            rotation=90, va="bottom", fontsize=8,
                            color=COLORS.get(d.get("severity"), COLORS["warning"]))  # fmt: skip


def grad_panel(ax, run, clip: float, view: View) -> None:
    steps, norms = series(run.train, "grad_norm")
    color = COLORS["grad norm"]
    ax.set_title("pre-clip gradient norm (log scale)")
    ax.set_ylabel("L2 norm")
    ok = [(s, v, bool(r.get("clipped"))) for s, v, r in zip(steps, norms, run.train)]
    ok = [(s, v, c) for s, v, c in ok if math.isfinite(v) and v > 0]
    if not ok:
        ax.text(0.5, 0.5, "no gradient norms recorded", ha="center", transform=ax.transAxes)
        return
    ser = view.reduce([s for s, _, _ in ok], [v for _, v, _ in ok])
    _draw(ax, ser, color, 1.2)
    ax.set_yscale("log")
    if not ser.exact:  # spikes (a grad-norm spike often comes 1-2 steps before the loss's)
        _spikes(ax, ser, _robust_top([v for _, v, _ in ok]), color, view)
    clipped = [(s, v) for s, v, c in ok if c]
    if clipped and ser.exact:
        ax.plot([s for s, _ in clipped], [v for _, v in clipped], "o", ms=3.5, mfc="none",
                mec=COLORS["warning"], mew=0.9)  # fmt: skip
    elif clipped:  # a marker per clipped step would be a solid band: the rate per bucket
        rate = view.reduce([s for s, _, _ in ok], _clip_rate([c for _, _, c in ok]))
        twin = ax.twinx()  # behind the norms: the clip rate is the context, not the data
        twin.set_zorder(ax.get_zorder() - 1)
        ax.patch.set_visible(False)
        twin.fill_between(rate.steps, 0, rate.mean, color=COLORS["warning"], alpha=0.15, lw=0)
        twin.plot(rate.steps, rate.mean, color=COLORS["warning"], lw=0.8, alpha=0.6)
        twin.set_ylim(0, 100)
        twin.set_ylabel("clipped (% of steps)", color=COLORS["warning"])
    if clip and math.isfinite(clip):
        ax.axhline(clip, color="#333333", ls="--", lw=1.2)
        ax.annotate(f"clip = {clip:g}", (0.005, clip), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8)  # fmt: skip
    rate = len(clipped) / max(len(ok), 1)
    ax.set_title(f"pre-clip gradient norm (log scale; clipped at {100 * rate:.0f}% of steps)")


def lr_panel(ax, run, view: View) -> None:
    steps, lrs = series(run.train, "lr")
    ax.set_title("learning rate")
    ax.set_ylabel("LR")
    if steps:
        _draw(ax, view.reduce(steps, lrs), COLORS["learning rate"], 1.8)
        ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def throughput_panel(ax, run, view: View) -> None:
    steps, tps = series(run.train, "tokens_per_sec")
    ax.set_title("throughput")
    ax.set_ylabel("tokens/s")
    ax.set_xlabel("step")
    if not steps:
        ax.text(0.5, 0.5, "no throughput records yet", ha="center", transform=ax.transAxes)
        return
    _draw(ax, view.reduce(steps, tps), COLORS["throughput"], 1.5)
    ax.set_ylim(bottom=0, top=1.15 * max(v for v in tps if math.isfinite(v)))
    m_steps, mfu = series(run.train, "mfu")
    if m_steps and any(math.isfinite(v) for v in mfu):
        twin = ax.twinx()
        m = view.reduce(m_steps, [100 * v for v in mfu])
        twin.plot(m.steps, m.median, color=COLORS["mfu"], lw=1.2, ls="--")
        twin.set_ylabel("MFU (%)", color=COLORS["mfu"])
        twin.set_ylim(bottom=0)
        ax.set_title("throughput (tokens/s) and MFU (dashed, right axis)")
