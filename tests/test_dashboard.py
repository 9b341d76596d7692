"""The five-panel dashboard of a real run: the PNG has data in every panel, the HTML is one
self-contained file, and a failure to plot never fails a run. A long run (50,000 steps) is
drawn reduced: a bounded number of points, markers and lines, every diagnosis and rollback."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from stalwart.cli import main
from stalwart.health.dashboard import (
    COLORS,
    MAX_CHECKPOINT_LINES,
    PANELS,
    draw,
    split_records,
    write_dashboard,
    write_dashboard_quietly,
)
from stalwart.health.downsample import MAX_POINTS, downsample, one_per_bucket, thin_steps
from stalwart.train import train
from tests.conftest import tiny_config


def test_split_records_keeps_the_final_timeline_after_a_rollback():
    recs = [{"step": s, "train_loss": 5.0 - s} for s in range(1, 6)]
    recs += [{"event": "rollback", "step": 6, "to_step": 3}, {"event": "checkpoint", "step": 3}]
    recs += [{"step": s, "train_loss": 10.0 + s} for s in (4, 5)]
    run = split_records(recs)
    assert [r["step"] for r in run.train] == [1, 2, 3, 4, 5]
    assert [r["train_loss"] for r in run.train][3:] == [14.0, 15.0]  # the branch that stayed
    assert [r["train_loss"] for r in run.abandoned] == [1.0, 0.0]
    assert run.checkpoints == [3] and len(run.rollbacks) == 1


@pytest.mark.slow
def test_dashboard_of_a_real_run(tmp_path, tiny_data, capsys):
    """A run with a spike (skipped), a NaN (rolled back), checkpoints and evaluations."""
    import matplotlib.image
    from matplotlib.colors import to_rgb

    run = tmp_path / "run"
    cfg = tiny_config(
        run, tiny_data, "--train.max_steps", "40", "--debug.inject_spike_at_step", "25",
        "--debug.inject_nan_at_step", "33", "--health.backoff_steps", "5",
    )  # fmt: skip
    train(cfg, progress=False)
    png, page, boxes = write_dashboard(run)
    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (1500, 1100)
    assert list(boxes) == list(PANELS)
    tops = [boxes[p][1] for p in PANELS]
    assert tops == sorted(tops) and len(set(tops)) == 5  # five stacked panels
    for name, (x0, y0, x1, y1) in boxes.items():
        region = img[y0:y1, x0:x1, :3]
        assert region.std() > 0.05, f"{name} panel is blank"
        # the panel's own data colour: its curve is drawn, not just axes and event lines
        near = (np.abs(region - np.array(to_rgb(COLORS[name]))).max(axis=2) < 0.1).sum()
        assert near > 150, f"{name} panel has no data ({near} pixels of its colour)"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text
    inline = text.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(inline) == png.read_bytes()
    for word in ("loss_spike", "nonfinite", "Rollbacks", "step 33 &rarr; step 30"):
        assert word in text
    assert main(["dashboard", str(run)]) == 0
    assert "dashboard.html" in capsys.readouterr().out


def test_a_failure_to_plot_never_fails_a_run(tmp_path):
    said = []
    assert write_dashboard_quietly(tmp_path / "not-a-run", say=said.append) is None
    assert said and said[0].startswith("warning: could not write the dashboard")


# ---- optional loggers (extras): TensorBoard, W&B offline -----------------------------------


def test_unknown_logger_is_a_user_error():
    from stalwart.config import load_config
    from stalwart.errors import UserError

    with pytest.raises(UserError, match="unknown logger 'mlflow'"):
        load_config(None, ["--train.loggers", "tensorboard,mlflow"])


def test_tensorboard_logger_mirrors_the_records(tmp_path, tiny_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_config(
        run, tiny_data, "--train.max_steps", "12", "--train.loggers", "tensorboard",
        "--debug.inject_nan_at_step", "3",
    )  # fmt: skip
    train(cfg, progress=False)
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    losses = ea.Scalars("train/train_loss")
    assert [e.step for e in losses] == [s for s in range(1, 13) if s != 3]  # NaN: not a scalar
    assert "train/tokens_per_sec" in ea.Tags()["scalars"]
    assert [e.step for e in ea.Scalars("doctor/diagnosis")] == [3]
    assert any("nonfinite_early" in t for t in ea.Tags()["tensors"])


def test_wandb_logger_offline(tmp_path, tiny_data):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_data, "--train.max_steps", "8", "--train.loggers", "wandb")
    train(cfg, progress=False)
    assert list((run / "wandb").glob("offline-run-*"))


# ---- long runs: what a panel can show -------------------------------------------------------


def long_run_records(n: int = 50_000, seed: int = 0) -> list[dict]:
    """A GPT-2-like run's metrics.jsonl, synthetic: noisy decaying loss, val and a checkpoint
    every n/240 steps (best/ while val improves), ~30% clipped steps, warmup + cosine LR, a
    throughput drop, 12 skipped spikes (info), a skipped NaN (warning), one divergence
    (critical) rolled back to the checkpoint before it."""
    rng = np.random.default_rng(seed)
    s = np.arange(1, n + 1)
    warm, peak, every = n // 30, 6e-4, n // 240
    cos = peak / 10 + 0.45 * peak * (1 + np.cos(np.pi * (s - warm) / (n - warm)))
    lr = np.where(s < warm, peak * s / warm, cos)
    trend = 2.9 + 2.2 / np.sqrt(1 + s / 400) + 5.8 * np.exp(-s / 250)
    loss = trend + rng.normal(0, 0.05, n) + 0.024 * rng.standard_t(3, n)
    norm = np.exp(rng.normal(math.log(0.8), 0.4, n)) * (1 + 6 * np.exp(-s / 300))
    tps = 4.6e5 * (1 + rng.normal(0, 0.02, n))
    tps[int(0.52 * n) : int(0.55 * n)] *= 0.4  # a slow data loader
    spikes = set(rng.choice(np.arange(n // 10, n - n // 10), 12, replace=False).tolist())
    nan_at, diverge_at = int(0.67 * n) + 17, int(0.75 * n) // every * every + 130
    out, best = [], math.inf
    for i, step in enumerate(s.tolist()):
        rec = {"step": step, "train_loss": float(loss[i]), "lr": float(lr[i]),
               "grad_norm": float(norm[i]), "clipped": bool(norm[i] > 1.0),
               "tokens": step * 524_288, "tokens_per_sec": float(tps[i]),
               "step_time_s": 524_288 / float(tps[i]), "mfu": float(tps[i]) / 1.1e6}  # fmt: skip
        if i in spikes:
            rec.update(train_loss=rec["train_loss"] * 1.8, grad_norm=rec["grad_norm"] * 25)
            rec["skipped"] = True
            out.append(_diagnosis(step, "loss_spike", "info"))
        if step == nan_at:  # a NaN the monitor skipped
            rec.update(train_loss="nan", grad_norm="nan", skipped=True)
            out.append(_diagnosis(step, "nonfinite", "warning"))
        if step == int(0.52 * n) + 100:
            out.append(_diagnosis(step, "throughput_drop", "warning"))
        if step % every == 0:
            rec["val_loss"] = float(trend[i] + 0.04 + rng.normal(0, 0.01))
        out.append(rec)
        if step % every == 0:
            paths = [f"ckpt/step_{step:08d}"] + (["ckpt/best"] if rec["val_loss"] < best else [])
            best = min(best, rec["val_loss"])
            out.append({"event": "checkpoint", "step": step, "path": paths[0], "paths": paths})
        if step == diverge_at:  # the abandoned branch climbed; the steps are trained again
            to = step - 130
            redo = [dict(r, train_loss=r["train_loss"] - 0.01, lr=r["lr"] / 2)
                    for r in out if "train_loss" in r and r["step"] > to]  # fmt: skip
            for r in out:
                if "train_loss" in r and r["step"] > to:
                    r["train_loss"] += (r["step"] - to) * 0.02
            out += [_diagnosis(step, "divergence", "critical"), _rollback(step, to), *redo]
    return out


def _diagnosis(step: int, symptom: str, severity: str) -> dict:
    return {"event": "diagnosis", "step": step, "symptom": symptom, "severity": severity,
            "evidence": "synthetic", "cause": "synthetic", "fix": "none"}  # fmt: skip


def _rollback(step: int, to: int) -> dict:
    return {"event": "rollback", "step": step, "to_step": to, "symptom": "divergence",
            "skipped_batches": [step, step + 10]}  # fmt: skip


def write_run(run_dir, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.toml").write_text("[optim]\ngrad_clip = 1.0\n")


@pytest.fixture(scope="module")
def long_run() -> list[dict]:
    return long_run_records(50_000)


def _drawn(ax) -> dict:
    """What an axes draws: points per line, markers, vertical event lines, band vertices."""
    vlines = [ln for ln in ax.lines if list(ln.get_ydata()) == [0, 1] and ln.get_xdata()[0]
              == ln.get_xdata()[-1] and ln.get_transform() != ax.transData]  # fmt: skip
    data = [ln for ln in ax.lines if ln not in vlines]
    return {
        "points": [len(ln.get_xdata()) for ln in data],
        "markers": sum(len(ln.get_xdata()) for ln in data if ln.get_marker() not in ("None", "")),
        "vlines": [(float(ln.get_xdata()[0]), ln.get_color()) for ln in vlines],
        "band_vertices": [len(p.vertices) for c in ax.collections for p in c.get_paths()],
        "texts": len(ax.texts),
    }


def test_downsample_band_contains_every_extreme_and_keeps_nonfinite_values():
    rng = np.random.default_rng(3)
    steps = np.arange(1, 20_001)
    values = rng.standard_t(2, len(steps))  # heavy tails: the extremes are far out
    values[[10, 7_000, 7_001, 19_999]] = [np.nan, np.inf, -np.inf, np.nan]
    ser = downsample(steps, values, span=(1, 20_000))
    assert len(ser) == MAX_POINTS and not ser.exact
    bucket = np.clip(((steps - 1) / ser.width).astype(int), 0, MAX_POINTS - 1)
    at = np.searchsorted(np.unique(bucket), bucket)
    finite = np.isfinite(values)
    assert (ser.lo[at][finite] <= values[finite]).all()
    assert (values[finite] <= ser.hi[at][finite]).all()
    assert ser.hi.max() == values[finite].max() and ser.lo.min() == values[finite].min()
    assert (ser.q_lo <= ser.median).all() and (ser.median <= ser.q_hi).all()
    assert ser.steps.min() >= 1 and ser.steps.max() <= 20_000
    # one non-finite value per bucket, as recorded (7,000 and 7,001 share a bucket)
    assert ser.bad_steps.tolist() == [11, 7_001, 20_000]
    assert np.isnan(ser.bad_values[0]) and ser.bad_values[1] == np.inf
    exact = downsample(steps[:MAX_POINTS], values[:MAX_POINTS])  # short: every point, as is
    assert exact.exact and exact.steps.tolist() == steps[:MAX_POINTS].tolist()
    assert np.isnan(exact.median[10]) and exact.median[11] == values[11]


def test_thinning_keeps_what_matters_and_what_the_eye_can_separate():
    ckpts = list(range(250, 60_001, 250))
    kept = thin_steps(ckpts, 0, 60_000, 40, keep=[60_000, 59_750, 45_000])
    assert len(kept) <= 40 and {60_000, 59_750, 45_000} <= set(kept)
    assert thin_steps([5, 10], 0, 60_000, 40) == [5, 10]
    # one per bucket, the highest rank: a critical diagnosis wins its 2-pixel column
    assert one_per_bucket([100, 101, 900], 0, 10, rank=[0, 2, 1]) == [1, 2]
    assert one_per_bucket([3, 1, 2], 0, 0) == [1, 2, 0]  # width 0: every one


def test_the_dashboard_of_a_long_run_is_bounded(long_run):
    """50,000 steps: before, 120k points and 386 labels in the loss panel, 17,857 clipped-step
    circles, 216 event lines per panel; now each bounded, and every diagnosis and rollback
    still drawn on every panel, with the best and last checkpoints and the rollback target."""
    run = split_records(long_run)
    fig = draw(run, 1.0, "long")
    drawn = [_drawn(ax) for ax in fig.axes]
    assert max(max(d["points"]) for d in drawn if d["points"]) <= MAX_POINTS
    assert max(max(d["band_vertices"], default=0) for d in drawn) <= 2 * MAX_POINTS + 5
    assert sum(d["markers"] for d in drawn) <= 600
    assert max(d["texts"] for d in drawn) <= 25
    gray = COLORS["checkpoint"]
    rollback = run.rollbacks[0]
    for d in drawn[:5]:  # the five panels (the rest are twin axes)
        ckpts = {s for s, c in d["vlines"] if c == gray}
        assert len(ckpts) <= MAX_CHECKPOINT_LINES
        assert {run.checkpoints[-1], run.best_checkpoints[-1], rollback["to_step"]} <= ckpts
        events = {s for s, c in d["vlines"] if c != gray}
        assert {int(x["step"]) for x in run.diagnoses + run.rollbacks} <= events
        assert len(d["vlines"]) <= MAX_CHECKPOINT_LINES + len(events)
    # every skipped spike keeps a triangle (within the 1/80 of the run that one stands for)
    tri = [x for ln in fig.axes[0].lines if ln.get_marker() == "^" for x in ln.get_xdata()]
    spikes = [r["step"] for r in run.train if r.get("skipped") and r["train_loss"] != "nan"]
    assert len(spikes) == 12 and all(min(abs(x - s) for x in tri) < 50_000 / 80 for s in spikes)
    # the x25 grad-norm spikes stay visible as dots above the band, the largest among them
    dots = [y for ln in fig.axes[2].lines if ln.get_marker() == "o" for y in ln.get_ydata()]
    norms = [float(r["grad_norm"]) for r in run.train]
    assert len(dots) >= 8 and max(dots) == max(v for v in norms if math.isfinite(v))


def test_a_short_run_draws_every_point():
    records = long_run_records(480)
    run = split_records(records)
    fig = draw(run, 1.0, "short")
    drawn = [_drawn(ax) for ax in fig.axes]
    n = len(run.train)
    clipped = [r for r in run.train if r["clipped"] and math.isfinite(float(r["grad_norm"]))]
    assert n == 480 and all(not d["band_vertices"] for d in drawn)  # no band: the values
    assert n - 1 in drawn[2]["points"]  # every finite grad norm (one is NaN)
    assert drawn[2]["markers"] == len(clipped)  # a circle per clipped step
    assert n in drawn[3]["points"] and n in drawn[4]["points"]  # LR, tokens/s: every step
    vals = [r for r in run.train if "val_loss" in r]
    assert len(vals) in drawn[1]["points"]


@pytest.mark.slow
def test_dashboard_command_on_a_long_run(tmp_path, long_run, capsys):
    """`stalwart dashboard` on 50,000 records: a small page (the picture holds a bounded number
    of points) that says how the run was reduced, every finding in its table."""
    run = tmp_path / "long"
    write_run(run, long_run)
    assert main(["dashboard", str(run)]) == 0
    page = (run / "dashboard.html").read_text()
    assert len(page.encode()) < 1_000_000
    assert "50,000 steps drawn as 600 buckets" in page and "all 15 diagnoses" in page
    for word in ("divergence", "throughput_drop", "nonfinite", "Rollbacks"):
        assert word in page
