"""`stalwart bench`, the step-time breakdown in the metrics, and the progress display."""

from __future__ import annotations

import functools
import io
import json
import statistics
import time

import pytest
import torch
from safetensors import safe_open

from stalwart.bench import format_compare, format_report, run_bench, run_compare
from stalwart.logs.metrics import Progress, Smoothed, StepTimer, read_metrics
from stalwart.model.gpt import flops_per_token
from stalwart.train import train
from tests.conftest import run_cli, tiny_config

PHASES = ("data_wait_s", "fwd_bwd_s", "optim_s", "overhead_s")


def test_bench_json_contract(tiny_data, tmp_path):
    r = run_cli(
        "bench",
        *("--data.dir", tiny_data, "--run.dir", tmp_path / "rd"),
        *"--model.n_layer 2 --model.n_head 2 --model.n_embd 64 --model.block_size 32".split(),
        *"--train.micro_batch 8 --run.threads 1 --train.precision fp32".split(),
        *"--steps 3 --warmup 1 --json".split(),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("tokens_per_sec", "mfu", "peak_memory_bytes", "step_time_s"):  # DESIGN.md
        assert key in out
    assert 0 < out["mfu"] < 1.5 and out["hfu"] == out["mfu"]  # no recomputation
    assert out["tokens_per_sec"] == pytest.approx(out["tokens_per_step"] / out["step_time_s"])
    assert out["tokens_per_step"] == 8 * 32
    assert sum(out[p] for p in PHASES) == pytest.approx(out["step_time_s"], rel=1e-6)
    mem = out["memory"]["measured"]
    state = mem["weights"] + mem["gradients"] + mem["optimizer"]
    # AdamW: m and v in fp32 like the weights, plus a step counter per tensor
    assert 2 * mem["weights"] <= mem["optimizer"] <= 2 * mem["weights"] + 1024
    assert out["peak_memory_bytes"] > state
    assert not (tmp_path / "rd").exists()  # the bench never writes into a run dir


def test_bench_mfu_is_null_without_a_peak_and_uses_an_override(tiny_data, tmp_path):
    cfg = tiny_config(tmp_path, tiny_data, "--train.precision", "bf16")
    r = run_bench(cfg, steps=1, warmup=1, memory=False)
    assert r["mfu"] is None and r["hfu"] is None and "--train.peak_flops" in r["peak_source"]
    assert "MFU         n/a" in format_report(r)

    cfg = tiny_config(tmp_path, tiny_data, "--train.precision", "fp32", "--train.peak_flops", "1e9")
    r = run_bench(cfg, steps=2, warmup=1, memory=False)
    flops = flops_per_token(cfg.model, r["model"]["vocab_size"]) * r["tokens_per_step"]
    assert r["peak_source"] == "--train.peak_flops"
    assert r["mfu"] == pytest.approx(flops / r["step_time_s"] / 1e9, rel=1e-9)
    assert r["peak_memory_bytes"] is None


def test_compare_runs_every_variant_in_one_process(tiny_data, tmp_path):
    cfg = tiny_config(tmp_path, tiny_data, "--train.precision", "fp32")
    res = run_compare(
        cfg, "activation_checkpointing", steps=2, warmup=1, say=lambda m: None, memory=False
    )
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows) == ["none", "selective", "every:2", "full"]
    assert all("error" not in r for r in rows.values())
    assert rows["none"]["ratio"] == 1.0 and rows["none"]["hfu"] == rows["none"]["mfu"]
    assert rows["full"]["hfu"] > rows["full"]["mfu"]  # recomputation is hardware work
    assert rows["full"]["hardware_flops_per_token"] > rows["every:2"]["hardware_flops_per_token"]
    table = format_compare(res)
    assert all(name in table for name in rows) and "ratio" in table


def _median(records, key):
    return statistics.median(r[key] for r in records)


def test_a_slow_data_source_shows_up_as_data_wait(tiny_data, tmp_path):
    runs = {}
    for name, slow in (("fast", "0"), ("slow", "30")):
        cfg = tiny_config(
            tmp_path / name,
            tiny_data,
            *"--train.max_steps 8 --train.eval_interval 0 --ckpt.interval 0".split(),
            *("--debug.slow_data_ms", slow, "--train.eval_batches", "1"),
            *("--train.peak_flops", "1e9"),  # train honours the override too
        )
        train(cfg, progress=False)
        recs = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "step_time_s" in r]
        runs[name] = recs[1:]  # the first step warms up
    fast, slow = runs["fast"], runs["slow"]
    assert all(r["data_wait_s"] >= 0.030 for r in slow)  # each fetch sleeps 30 ms
    assert _median(fast, "data_wait_s") < 0.010
    assert _median(slow, "tokens_per_sec") < _median(fast, "tokens_per_sec")
    assert _median(slow, "data_wait_frac") > 3 * _median(fast, "data_wait_frac")
    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    flops_per_step = flops_per_token(cfg.model, vocab) * 8 * 32
    for r in slow:  # the phases account for the whole step; MFU is against the given peak
        assert sum(r[p] for p in PHASES) == pytest.approx(r["step_time_s"], rel=1e-6)
        assert r["mfu"] == pytest.approx(flops_per_step / r["step_time_s"] / 1e9, rel=1e-9)
        assert r["hfu"] == r["mfu"]


def test_step_timer_splits_a_step_and_skips_what_is_not_training():
    timer = StepTimer(torch.device("cpu"))
    timer.step_start()
    time.sleep(0.02)
    timer.lap("data_wait")
    time.sleep(0.01)
    timer.lap("fwd_bwd")
    timer.lap("optim")
    time.sleep(0.05)
    timer.skip()  # e.g. a checkpoint: not training time
    t = timer.read()
    assert t["steps"] == 1
    assert t["data_wait_s"] >= 0.02 and t["fwd_bwd_s"] >= 0.01
    assert t["step_time_s"] < t["data_wait_s"] + t["fwd_bwd_s"] + t["optim_s"] + 0.04
    assert 0 < t["data_wait_frac"] < 1
    assert timer.read()["steps"] == 0  # read() starts the next interval


def test_progress_shows_smoothed_rate_mfu_data_wait_and_eta():
    s = Smoothed()
    assert s.value is None and s.add(10.0) == pytest.approx(10.0)  # bias-corrected start
    assert 10.0 < s.add(20.0) < 20.0
    out = io.StringIO()
    p = Progress(100, stream=out, plain_every_s=0.0)
    p.update(10, 2.5, 5000.0, 0.75, data_wait_frac=0.4)
    p.update(20, 2.4, 7000.0, 0.76, data_wait_frac=0.01)
    first, second = out.getvalue().splitlines()
    assert "step 10/100" in first and "5.0k tok/s" in first and "MFU 75.0%" in first
    assert "data wait 40%" in first and "data wait" not in second
    assert "ETA" in second and "5.0k" not in second  # smoothed towards 7k


@pytest.mark.slow
def test_compiled_model_checkpoints_and_resumes_as_the_plain_module(
    tiny_data, tmp_path, monkeypatch
):
    # dynamo's eager backend wraps the model exactly as inductor does (OptimizedModule with
    # `_orig_mod.` keys) without a C++ build; the bench's --compare compile runs inductor
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    args = ("--train.compile", "true", "--train.max_steps", "6", "--ckpt.interval", "3")
    train(tiny_config(tmp_path, tiny_data, *args), progress=False)
    ckpt = tmp_path / "checkpoints" / "step_00000003" / "model.safetensors"
    with safe_open(ckpt, "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)
    again = train(
        tiny_config(
            tmp_path,
            tiny_data,
            *args[:2],
            "--train.max_steps",
            "8",
            "--run.resume",
            "allow-changes",
        ),
        progress=False,
    )
    assert again.step == 8


def test_compare_fused_gelu_runs_both_kernels(tiny_data, tmp_path):
    cfg = tiny_config(tmp_path, tiny_data, "--train.precision", "fp32")
    res = run_compare(cfg, "fused_gelu", steps=2, warmup=1, say=lambda m: None, memory=False)
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows) == ["torch GELU", "fused GELU"]
    assert all("error" not in r for r in rows.values())
    assert rows["torch GELU"]["ratio"] == 1.0 and rows["fused GELU"]["ratio"] > 0
    assert "fused GELU" in format_compare(res)


def test_compare_cpu_kernels_runs_both(tiny_data, tmp_path):
    cfg = tiny_config(tmp_path, tiny_data, "--train.precision", "fp32")
    res = run_compare(cfg, "cpu_kernels", steps=2, warmup=1, say=lambda m: None, memory=False)
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows) == ["torch ops", "stalwart kernels"]
    assert all("error" not in r for r in rows.values())
    assert rows["torch ops"]["cpu_kernels"] is False
    assert rows["stalwart kernels"]["cpu_kernels"] is True  # they really ran
    assert "stalwart kernels" in format_compare(res)
