"""The main job: its recipe trains (a few steps, in the suite) and ends with the whole-split
bits per byte; `stalwart experiment main-job --quick` writes its report. Its quality is a
benchmark (experiments/main-job), not a timed test."""

from __future__ import annotations

import json

from stalwart.config import load_config
from stalwart.experiments import run_experiment
from stalwart.experiments.main_job import CANDIDATES
from tests.conftest import ROOT, run_cli


def test_main_job_recipe_is_llama_on_bpe_and_trains_a_few_steps(tmp_path, tiny_data):
    cfg = load_config(str(ROOT / "configs" / "tiny-cpu.toml"), [])
    assert cfg.model.arch == "llama" and "bpe" in cfg.data.dir
    res = run_cli(
        "train", "--config", ROOT / "configs" / "tiny-cpu.toml", "--data.dir", tiny_data,
        "--run.dir", tmp_path / "run", "--train.max_steps", "3", "--schedule.warmup_steps", "1",
        "--train.eval_interval", "3", "--train.eval_batches", "1", "--ckpt.interval", "3",
        "--train.sample_tokens", "8", "--model.block_size", "64", "--train.micro_batch", "2",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "held-out, whole split:" in res.stdout and "bits/byte" in res.stdout
    assert "sample:" in res.stdout


def test_main_job_experiment_quick_writes_report_plot_and_arms(tmp_path, tiny_data):
    out = tmp_path / "exp"
    report = run_experiment("main-job", out, quick=True, data_dir=tiny_data)
    text = report.read_text()
    assert (out / "loss_vs_time.png").stat().st_size > 0
    arms = [json.loads(line) for line in (out / "arms.jsonl").read_text().splitlines()]
    assert len(arms) == len(CANDIDATES) and all(a["tokens"] > 0 for a in (x["score"] for x in arms))
    assert "whole held-out split" in text and "Calibration" in text and "--quick" in text
