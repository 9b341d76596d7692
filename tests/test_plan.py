"""`stalwart plan` (JSON contract, fits?, the lesson's table) and `train` refusing a step that
cannot fit, through the real CLI."""

from __future__ import annotations

import json

import pytest

from stalwart.cli import main
from tests.conftest import TINY, run_cli

BIG = ["--model.n_layer", "12", "--model.n_embd", "768", "--model.n_head", "12"]
BIG += ["--model.block_size", "1024"]  # GPT-2 small's shape: ~0.6 GB of activations a sequence
HUGE = ["--model.n_layer", "96", "--model.n_embd", "12288", "--model.n_head", "96"]


def test_plan_json_contract(capsys):
    assert main(["plan", "--model.vocab_size", "256", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["total_bytes"], int) and out["total_bytes"] > 0
    for key in ("weights", "gradients", "optimizer", "activations"):
        assert isinstance(out["components"][key], int)
    assert out["components"]["optimizer"] == 2 * out["components"]["weights"]  # AdamW, fp32
    assert sum(out["at_peak"].values()) == out["total_bytes"]
    assert out["device"]["fits"] is True and out["device"]["largest_micro_batch"] >= 8
    assert out["inference"]["total_bytes"] > 0


def test_plan_splits_a_token_target(capsys):
    args = ["plan", "--model.vocab_size", "50257", *BIG, "--device", "A100-40GB"]
    assert main([*args, "--tokens-per-step", "524288", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    b, largest = out["batch"], out["device"]["largest_micro_batch"]
    assert 1 <= b["micro_batch"] <= largest
    assert b["micro_batch"] * b["grad_accum"] * 1024 >= 524288
    assert (b["grad_accum"] - 1) * b["micro_batch"] * 1024 < 524288  # no needless accumulation


def test_lesson_table(capsys):
    assert main(["plan", "--lesson-table", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["model"].split()[0] for r in rows] == ["GPT-2", "GPT-2", "LLaMA-7B", "LLaMA-70B"]
    small = rows[0]
    assert small["inference_bf16_bytes"] == 2 * small["params"]  # bf16 weights
    for r in rows:  # 16 bytes/parameter is the floor of fp32 + AdamW training
        assert r["training_fp32_adamw_bytes"] >= 16 * r["params"]
        assert r["training_ckpt_bytes"] <= r["training_fp32_adamw_bytes"]


@pytest.mark.slow
def test_plan_reports_a_config_that_cannot_fit():
    r = run_cli("plan", "--model.vocab_size", "50257", *HUGE, "--device", "A100-40GB", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "DOES NOT FIT" in r.stdout and "not even micro-batch 1 fits" in r.stdout


@pytest.mark.slow
def test_train_refuses_before_allocating(tiny_data, tmp_path):
    base = [*TINY, "--data.dir", tiny_data, "--run.device", "cpu", *BIG]
    r = run_cli(
        "train", *base, "--run.dir", tmp_path / "a", "--train.micro_batch", "4096", timeout=120
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "the largest micro-batch that fits is" in lines[0]
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    r = run_cli("train", *base, *HUGE, "--run.dir", tmp_path / "b", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "even at" in r.stderr


@pytest.mark.slow
def test_train_micro_batch_auto_and_peak_in_metrics(tiny_data, tmp_path):
    r = run_cli(
        "train",
        *TINY,
        "--data.dir",
        tiny_data,
        "--run.dir",
        tmp_path,
        "--run.device",
        "cpu",
        "--train.micro_batch",
        "auto",
        "--train.max_steps",
        "2",
        "--schedule.warmup_steps",
        "1",
        "--train.eval_batches",
        "1",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "tokens_per_sec" in rec]
    assert steps and all(rec["peak_rss_bytes"] > 0 for rec in steps)
    config = (tmp_path / "config.toml").read_text()
    assert 'micro_batch = "auto"' in config
