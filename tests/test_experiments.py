"""`stalwart experiment`: the optimizers experiment end to end (--quick), and the shared helpers."""

from __future__ import annotations

import re

import pytest

from stalwart.cli import main
from stalwart.errors import UserError
from stalwart.experiments import EXPERIMENTS, command_line, run_experiment
from stalwart.experiments.common import ensure_dataset, markdown_table, smooth, to_flags
from stalwart.experiments.presets import PRESETS, RUN, preset
from stalwart.logs.metrics import read_metrics

NAMES = ["sgd", "momentum", "adam", "adamw", "muon"]


def test_optimizers_quick_writes_report_and_plot(tmp_path, tiny_data):
    out = tmp_path / "exp"
    report = run_experiment("optimizers", out, quick=True, data_dir=tiny_data)
    assert report == out / "report.md"
    text = report.read_text()
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![loss curves](loss_curves.png)" in text
    assert f"stalwart experiment optimizers --out {out} --quick --data {tiny_data}" in text
    assert "cpu:" in text and "torch:" in text and "## Conclusion" in text
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    assert list(rows) == NAMES
    # state / fp32 weights column: 0x, 1x, 2x, 2x, and Muon in between
    ratios = {n: float(re.findall(r"\| ([\d.]+)x \|", rows[n])[0]) for n in NAMES}
    assert ratios["sgd"] == 0 and ratios["momentum"] == 1 and ratios["adam"] == 2
    assert ratios["adamw"] == 2 and 1 < ratios["muon"] < 2
    # every run went through the real loop: same steps, its own records and checkpoint
    for n in NAMES:
        records = read_metrics(out / "runs" / n / "metrics.jsonl")
        assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 13))
        assert any("val_loss" in r for r in records)
        assert (out / "runs" / n / "checkpoints" / "step_00000012" / "manifest.json").is_file()
    assert (out / ".gitignore").read_text() == "runs/\n"


def test_unknown_experiment_is_a_user_error(tmp_path, tiny_data, capsys):
    with pytest.raises(UserError, match="unknown experiment 'nope'"):
        run_experiment("nope", tmp_path, quick=True, data_dir=tiny_data)
    assert main(["experiment", "nope", "--out", str(tmp_path), "--quick"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown experiment")
    assert "optimizers" in EXPERIMENTS


def test_common_helpers(tmp_path, tiny_data):
    assert ensure_dataset(tiny_data) == tiny_data
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("not a dataset")
    with pytest.raises(UserError, match="no prepared dataset"):
        ensure_dataset(junk)
    assert to_flags({"optim.lr": 0.5, "model.bias": False}) == [
        "--optim.lr",
        "0.5",
        "--model.bias",
        "false",
    ]
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected EMA
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert command_line("optimizers", tmp_path, False, None).endswith(f"--out {tmp_path}")


def test_presets_live_in_one_table():
    assert set(PRESETS) <= set(EXPERIMENTS)
    assert preset("optimizers", quick=True) == {
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "train.micro_batch": 4,
        "train.max_steps": 12,
        "schedule.warmup_steps": 2,
        "train.eval_interval": 6,
        "train.eval_batches": 2,
    }
    assert "train.micro_batch" not in preset("accumulation", quick=False)  # its arms set it
    assert RUN["run.threads"] == 1 and RUN["run.seed"] == 1337  # bit-reproducible runs


NEW = [
    "schedule",
    "precision",
    "fp16-no-scaler",
    "high-lr",
    "memory-table",
    "activation-checkpointing",
    "accumulation",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_lesson_experiment_quick_writes_report_and_plots(name, tmp_path, tiny_data):
    out = tmp_path / name
    report = run_experiment(name, out, quick=True, data_dir=tiny_data)
    text = report.read_text()
    pngs = sorted(out.glob("*.png"))
    assert pngs, "no plot written"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"]({png.name})" in text  # the report shows it
    assert f"stalwart experiment {name} --out {out} --quick" in text
    assert "cpu:" in text and "## Conclusion" in text
    # a table of measured numbers: rows whose cells hold digits
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 2 and any(re.search(r"\| [\d.,]+\s*(%|x|MiB|KiB|GB)? \|", r) for r in rows)
    if name in EXTRA_CHECKS:
        EXTRA_CHECKS[name](out)


def check_accumulation(out):
    """4 x 4 accumulated == 16 x 1; debug.forget_accum_division makes the gradient 4x."""

    def curve(run, key):
        return [r[key] for r in read_metrics(out / "runs" / run / "metrics.jsonl") if key in r]

    big, acc = curve("sgd_big", "train_loss"), curve("sgd_accum", "train_loss")
    assert len(big) == len(acc) == 8 and max(abs(a - b) for a, b in zip(big, acc)) < 1e-4
    # the same weights at step 1, a gradient grad_accum times larger
    forgot, right = curve("sgd_forgot", "grad_norm")[0], curve("sgd_accum", "grad_norm")[0]
    assert forgot == pytest.approx(4 * right, rel=1e-4)


def check_fp16(out):
    """train.grad_scaler reached the loop: only the scaled fp16 run checkpoints a live scaler."""
    from stalwart.checkpoint.format import read_checkpoint

    def scaler_state(run):
        (last,) = sorted((out / "runs" / run / "checkpoints").glob("step_*"))[-1:]
        return read_checkpoint(last)[1]["scaler"]

    assert scaler_state("fp16_no_scaler") == {} and "scale" in scaler_state("fp16_GradScaler")
    text = (out / "report.md").read_text()
    assert "| `fp16, no scaler` |" in text and "| `fp16 + GradScaler` |" in text


EXTRA_CHECKS = {"accumulation": check_accumulation, "fp16-no-scaler": check_fp16}
