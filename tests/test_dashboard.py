"""The five-panel dashboard of a real run: the PNG has data in every panel, the HTML is one
self-contained file, and a failure to plot never fails a run."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from stalwart.cli import main
from stalwart.health.dashboard import (
    COLORS,
    PANELS,
    split_records,
    write_dashboard,
    write_dashboard_quietly,
)
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
