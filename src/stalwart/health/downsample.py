"""What a dashboard panel can show of a long run: pure reductions, shared by the PNG and the
HTML page.

A panel is ~900 pixels wide; a 60,000-step run drawn point by point paints it into a solid
band. `downsample` cuts the step range into at most `max_points` equal buckets and keeps, per
bucket, the median (the line), the mean, the min and max (the band) and two percentiles; a
non-finite value (NaN, Inf) is never averaged in, and one per bucket is kept, as recorded, to
be marked. A series of at most `max_points` records is kept point by point, exactly.
`one_per_bucket` and `thin_steps` do the same for markers and event lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_POINTS = 600  # ~1.5 pixels of a panel per bucket; a run of up to 600 records: every point


@dataclass
class Series:
    """A series as drawn. Exact (`width == 0`): one point per record, every field the value
    itself (NaN where it was not finite: a gap in the line). Reduced: one point per bucket
    (`steps` = the mean step of its records), NaN where a bucket held no finite value."""

    steps: np.ndarray
    median: np.ndarray
    mean: np.ndarray
    lo: np.ndarray  # min
    hi: np.ndarray  # max
    q_lo: np.ndarray  # 10th percentile
    q_hi: np.ndarray  # 90th percentile
    count: np.ndarray  # finite values per point
    bad_steps: np.ndarray  # non-finite values: every one (exact) or the first per bucket
    bad_values: np.ndarray  # nan, inf or -inf, as recorded
    width: float = 0.0  # bucket width in steps; 0: every point

    @property
    def exact(self) -> bool:
        return self.width == 0

    def __len__(self) -> int:
        return len(self.steps)


def bucket_width(n: int, lo: float, hi: float, max_points: int = MAX_POINTS) -> float:
    """The bucket width (steps) for `n` records over [lo, hi]; 0 when they fit as they are."""
    if n <= max_points:
        return 0.0
    return max((hi - lo) / max_points, 1e-9)


def _bucket_of(steps: np.ndarray, lo: float, width: float, n_buckets: int) -> np.ndarray:
    return np.clip(((steps - lo) / width).astype(np.int64), 0, n_buckets - 1)


def _exact(s: np.ndarray, v: np.ndarray) -> Series:
    fin = np.isfinite(v)
    shown = np.where(fin, v, np.nan)
    return Series(
        s, shown, shown, shown, shown, shown, shown, fin.astype(np.int64), s[~fin], v[~fin]
    )


def _quantile(vs: np.ndarray, start: np.ndarray, count: np.ndarray, q: float) -> np.ndarray:
    """The q-quantile of each run vs[start:start+count] of a sorted array (linear)."""
    pos = start + q * (count - 1)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, len(vs) - 1)
    frac = pos - below
    return vs[below] * (1 - frac) + vs[above] * frac


def downsample(
    steps,
    values,
    max_points: int = MAX_POINTS,
    span: tuple[float, float] | None = None,
) -> Series:
    """Reduce (step, value) pairs to at most `max_points` buckets of equal step range (the
    panels of a figure pass the same `span` so that their buckets line up); at most
    `max_points` pairs are kept as they are."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    if len(s) == 0:
        return _exact(s, v)
    lo, hi = span if span is not None else (s[0], s[-1])
    width = bucket_width(len(s), lo, hi, max_points)
    if width == 0:
        return _exact(s, v)
    b = _bucket_of(s, lo, width, max_points)
    present, first, per = np.unique(b, return_index=True, return_counts=True)
    step_mean = np.add.reduceat(s, first) / per
    fin = np.isfinite(v)
    # finite values, sorted by (bucket, value): each bucket's run gives min/max/quantiles
    fb, fv = b[fin], v[fin]
    srt = np.lexsort((fv, fb))
    fb, fv = fb[srt], fv[srt]
    out = {k: np.full(len(present), np.nan) for k in ("median", "mean", "lo", "hi", "ql", "qh")}
    count = np.zeros(len(present), dtype=np.int64)
    if len(fv):
        fbuckets, fstart, fcount = np.unique(fb, return_index=True, return_counts=True)
        at = np.searchsorted(present, fbuckets)
        count[at] = fcount
        out["lo"][at], out["hi"][at] = fv[fstart], fv[fstart + fcount - 1]
        out["mean"][at] = np.add.reduceat(fv, fstart) / fcount
        for key, q in (("median", 0.5), ("ql", 0.1), ("qh", 0.9)):
            out[key][at] = _quantile(fv, fstart, fcount, q)
    bad = np.flatnonzero(~fin)
    _, first_bad = np.unique(b[bad], return_index=True)  # the first non-finite per bucket
    bad = bad[first_bad]
    return Series(
        step_mean, out["median"], out["mean"], out["lo"], out["hi"], out["ql"], out["qh"],
        count, s[bad], v[bad], width,
    )  # fmt: skip


def one_per_bucket(steps, lo: float, width: float, rank=None) -> list[int]:
    """Indices of the items to mark: per bucket of `width` steps from `lo`, the one of highest
    `rank` (the first of equals); every item when `width` is 0. Sorted by step."""
    steps = [float(s) for s in steps]
    if width <= 0:
        return sorted(range(len(steps)), key=lambda i: steps[i])
    rank = list(rank) if rank is not None else [0.0] * len(steps)
    best: dict[int, int] = {}
    for i, s in enumerate(steps):
        k = math.floor((s - lo) / width)
        j = best.get(k)
        if j is None or rank[i] > rank[j]:
            best[k] = i
    return sorted(best.values(), key=lambda i: steps[i])


def thin_steps(steps, lo: float, hi: float, max_n: int, keep=()) -> list[int]:
    """Event lines the eye can separate: at most `max_n` of `steps`, every step of `keep` that
    is among them (the best checkpoint, the last one, a rollback's target) and, for the rest,
    one per bucket that none of those occupies. Sorted, without repeats."""
    uniq = sorted(set(int(s) for s in steps))
    if len(uniq) <= max_n:
        return uniq
    kept = sorted({int(s) for s in keep} & set(uniq))[:max_n]
    n_buckets = max_n - len(kept)
    if n_buckets <= 0:
        return kept
    width = max((hi - lo) / n_buckets, 1e-9)

    def bucket(s: int) -> int:
        return min(math.floor((s - lo) / width), n_buckets - 1)

    taken = {bucket(s) for s in kept}
    out = set(kept)
    for s in uniq:
        if bucket(s) not in taken:
            taken.add(bucket(s))
            out.add(s)
    return sorted(out)
