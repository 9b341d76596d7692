"""The training doctor, live: one real run per playbook row, each checked for the right
diagnosis and only that one; recovery (skip, rollback, stop); the NaN guard on saves."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stalwart.checkpoint.backend import nonfinite_tensors
from stalwart.checkpoint.saver import SaveResult
from stalwart.config import HealthConfig
from stalwart.data.prepare import prepare
from stalwart.health.detectors import (
    clip_evidence,
    overfit_evidence,
    plateau_evidence,
    repeat_evidence,
    robust_center,
    throughput_evidence,
)
from stalwart.health.monitor import HealthMonitor
from stalwart.health.recovery import Recovery, inspect_tokens
from stalwart.logs.metrics import read_metrics
from stalwart.model.gpt import build_model
from stalwart.train import train
from tests.conftest import tiny_config

# detectors judge full windows after a grace period; short ones so tiny runs exercise them all
QUICK = ("--health.window", "20", "--health.grace_steps", "10")


def _run(run_dir: Path, data: Path, *overrides):
    result = train(tiny_config(run_dir, data, *map(str, overrides)), progress=False)
    return result, read_metrics(run_dir / "metrics.jsonl")


def _symptoms(records, after_step: int = 0) -> list[str]:
    return [
        r["symptom"] for r in records if r.get("event") == "diagnosis" and r["step"] > after_step
    ]


def _train_records(records) -> dict[int, dict]:
    return {r["step"]: r for r in records if "train_loss" in r}


def _all_checkpoint_tensors_finite(run_dir: Path) -> int:
    """Load every tensor of every checkpoint directory (step_*, best, abandoned-*)."""
    n = 0
    for d in sorted((run_dir / "checkpoints").iterdir()):
        for name in ("model.safetensors", "state.safetensors"):
            if (d / name).is_file():
                tensors = load_file(str(d / name))
                assert not nonfinite_tensors(tensors), f"{d.name}/{name} holds NaN/Inf"
                n += 1
    return n


# ---- the detectors as pure functions ------------------------------------------------------


def test_detectors_pure_functions():
    med, sigma = robust_center([3.0, 3.1, 2.9, 3.0, 1000.0])
    assert med == 3.0 and sigma < 0.2  # one wild value moves neither
    assert clip_evidence([True] * 9 + [False], [2.5] * 10, 1.0, 0.5, 1.5).startswith("90%")
    assert clip_evidence([True] * 10, [1.1] * 10, 1.0, 0.5, 1.5) is None  # clipped, but barely
    assert clip_evidence([True] * 10, [5.0] * 10, 0.0, 0.5, 1.5) is None  # clipping off
    assert plateau_evidence([5.5] * 20, [1e-7] * 20, 1e-5) is not None
    assert plateau_evidence([5.5] * 20, [1e-3] * 20, 1e-5) is None  # flat, but the LR is not low
    assert plateau_evidence([5.5 - 0.1 * i for i in range(20)], [1e-7] * 20, 1e-5) is None
    assert repeat_evidence(["a", "b", "a", "a"]).startswith("batch a seen 3 times")
    assert repeat_evidence(["a", "b", "a"]) is None
    rising = [[10, 2.6, 2.5], [20, 2.7, 2.4], [30, 2.8, 2.3]]
    assert overfit_evidence(rising, best_val=2.6) is not None
    assert overfit_evidence(rising, best_val=2.79) is None  # within 2% of the best: noise
    assert overfit_evidence([[10, 2.6, 2.5], [20, 2.7, 2.6], [30, 2.8, 2.7]], 2.6) is None
    evidence, cause = throughput_evidence([1000.0] * 10, [300.0] * 5, 0.5, 0.8)
    assert "80%" in evidence and "data loader" in cause
    assert "not the data loader" in throughput_evidence([1000.0] * 10, [300.0] * 5, 0.5, 0.05)[1]
    assert throughput_evidence([1000.0] * 10, [300.0, 600.0], 0.5, None) is None


def _feed(mon: HealthMonitor, steps, rng) -> list[str]:
    out = []
    for step in steps:
        loss = 3.0 + 2.0 / step + 0.05 * rng.standard_normal()
        if step == 33:
            loss *= 50  # a spike
        norm = 0.8 + 0.1 * rng.standard_normal()
        v = mon.check_step(step, loss, float("nan") if step == 41 else norm)
        record = {"step": step, "train_loss": loss, "lr": 1e-3, "grad_norm": norm,
                  "clipped": norm > 1.0, "tokens_per_sec": 1000 + rng.integers(0, 50)}  # fmt: skip
        if step % 10 == 0:
            record["val_loss"] = loss + 0.1
        out += [d["symptom"] for d in v.diagnoses + mon.observe(record, f"b{step}").diagnoses]
    return out


def test_monitor_state_dict_is_exact_and_json_safe():
    cfg = HealthConfig(window=20, grace_steps=5)
    a = HealthMonitor(cfg, grad_clip=1.0)
    seen = _feed(a, range(1, 51), np.random.default_rng(0))
    assert seen == ["loss_spike", "nonfinite"]
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint's state.json holds
    b = HealthMonitor(cfg, grad_clip=1.0)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert b.fired["loss_spike"]["count"] == 1 and b.counts["nonfinite"] == 1
    # both go on identically (the rate limits too: no second first-time note)
    rest_a = _feed(a, range(51, 90), np.random.default_rng(1))
    rest_b = _feed(b, range(51, 90), np.random.default_rng(1))
    assert rest_a == rest_b == []
    assert a.state_dict() == b.state_dict()


def _medic(cfg: HealthConfig) -> Recovery:
    log = type("Log", (), {"write": lambda self, r: None})()
    return Recovery(cfg, HealthMonitor(cfg), None, None, None, 0, log, print, lambda s: None)


def test_nan_guard_for_saves():
    cfg = HealthConfig()
    good = {"w": torch.ones(3, 3), "step": torch.tensor(3)}
    bad = {"w": torch.ones(3, 3), "b": torch.tensor([1.0, float("inf")])}
    medic = _medic(cfg)
    step_10 = [Path("step_00000010")]
    assert not nonfinite_tensors(good)
    medic.after_save(SaveResult(10, step_10, nonfinite_tensors(good)))  # a save went through
    assert medic.forced_verdict(11) is None
    assert nonfinite_tensors(bad) == ["b"]
    medic.after_save(SaveResult(10, step_10, nonfinite_tensors(bad)))  # refused: returned
    v = medic.forced_verdict(11)  # the refusal is reported, and the next step rolls back
    assert v.action == "rollback" and v.diagnoses[0]["symptom"] == "nonfinite_weights"
    assert "b" in v.diagnoses[0]["evidence"]
    assert v.since == 10 and v.diagnoses[0]["step"] == 10 and v.notes
    assert medic.forced_verdict(12) is None  # once
    assert medic.monitor.fired["nonfinite_weights"]["count"] == 1  # in the monitor's state


def test_a_refused_save_stops_the_run_when_nan_is_ignored_and_finish_reports_it():
    for cfg in (HealthConfig(on_nan="ignore"), HealthConfig(enabled=False)):
        medic = _medic(cfg)
        medic.after_save(SaveResult(30, [Path("step_00000030")], ["w"]))
        # the last step: no next step to act on it; the end of the run reports it and stops
        stop = medic.finish()
        assert stop["symptom"] == "nonfinite_weights" and stop["action"] == "stop"
        assert medic.forced_verdict(31) is None and medic.finish() is stop


def test_inspect_tokens_names_ids_and_embedding_rows():
    from stalwart.config import ModelConfig

    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), 64)
    x = torch.tensor([[1, 2, 3, 65]])
    assert "[65]" in inspect_tokens([(x, x)], model, 64)
    x = torch.tensor([[1, 2, 3, 7]])
    assert inspect_tokens([(x, x)], model, 64) is None
    with torch.no_grad():
        model.transformer.wte.weight[7, 0] = float("nan")
    assert "[7]" in inspect_tokens([(x, x)], model, 64)
    with torch.no_grad():
        model.transformer.wte.weight.fill_(float("nan"))  # everything bad: the weights, not tokens
    assert inspect_tokens([(x, x)], model, 64) is None


# ---- one real run per playbook row ---------------------------------------------------------


@pytest.mark.slow
def test_healthy_tiny_run_has_no_diagnoses(tmp_path, tiny_data):
    # the throughput detector is off here: on a shared machine a burst of load is a real drop
    # (test_throughput_drop_from_a_slow_loader checks that detector)
    result, records = _run(
        tmp_path / "ok", tiny_data, "--train.max_steps", 60, *QUICK, "--health.throughput_drop", 0
    )
    assert result.health_stop is None and result.step == 60
    assert _symptoms(records) == []
    assert not [r for r in records if r.get("event") == "rollback"]
    assert not any(r.get("skipped") for r in records)


def test_nan_at_once_skips_the_step_and_advises(tmp_path, tiny_data):
    result, records = _run(
        tmp_path / "r", tiny_data, "--train.max_steps", 12, "--debug.inject_nan_at_step", 3
    )
    assert _symptoms(records) == ["nonfinite_early"]
    d = next(r for r in records if r.get("event") == "diagnosis")
    assert d["severity"] == "critical" and d["action"] == "skip" and "10x" in d["fix"]
    assert _train_records(records)[3]["skipped"] is True
    assert result.step == 12 and result.health_stop is None
    assert not nonfinite_tensors(result.model.state_dict())


def test_lr_far_too_high_stops_the_run_at_once(tmp_path, tiny_data):
    """A real divergence: AdamW at LR 1000, no warmup, no clipping. The doctor stops the run
    after health.nan_patience non-finite steps instead of burning compute."""
    result, records = _run(
        tmp_path / "r", tiny_data, "--optim.lr", 1000, "--schedule.name", "constant",
        "--schedule.warmup_steps", 0, "--optim.grad_clip", 0,
    )  # fmt: skip
    assert result.health_stop["symptom"] == "nonfinite_early"
    assert result.health_stop["action"] == "stop" and result.step < 10
    assert set(_symptoms(records)) == {"nonfinite_early"}


@pytest.mark.slow
def test_injected_nan_rolls_back_and_the_run_recovers(tmp_path, tiny_data):
    common = ("--train.max_steps", 40, "--health.backoff_steps", 5)
    clean, _ = _run(tmp_path / "clean", tiny_data, *common)
    result, records = _run(tmp_path / "nan", tiny_data, *common, "--debug.inject_nan_at_step", 25)
    assert result.step == 40 and result.health_stop is None
    assert _symptoms(records) == ["nonfinite"]
    (rb,) = [r for r in records if r.get("event") == "rollback"]
    assert rb["step"] == 25 and rb["to_step"] == 20 and rb["skipped_batches"] == [20, 25]
    assert rb["checkpoint"].endswith("step_00000020")
    assert abs(result.val_loss - clean.val_loss) < 0.05, (result.val_loss, clean.val_loss)
    assert _all_checkpoint_tensors_finite(tmp_path / "nan") >= 6


def test_nan_weights_are_never_written(tmp_path, tiny_data):
    """--health.on_nan ignore applies a NaN update; the save at step 20 refuses to write the
    NaN weights and the run stops: every checkpoint on disk is finite."""
    result, records = _run(
        tmp_path / "r", tiny_data, "--train.max_steps", 30, "--health.on_nan", "ignore",
        "--debug.inject_nan_at_step", 15,
    )  # fmt: skip
    assert result.health_stop["symptom"] == "nonfinite_weights" and result.step == 20
    assert set(_symptoms(records)) == {"nonfinite", "nonfinite_weights"}
    assert sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir()) == [
        "best",
        "step_00000010",
    ]
    _all_checkpoint_tensors_finite(tmp_path / "r")


def test_constant_clipping_from_a_high_lr(tmp_path, tiny_data):
    """Plain SGD at LR 2 on the tiny model: the gradient norm stays above the clip threshold."""
    _, records = _run(
        tmp_path / "r", tiny_data, "--optim.name", "sgd", "--optim.lr", 2,
        "--schedule.name", "constant", "--train.max_steps", 35, *QUICK,
    )  # fmt: skip
    assert _symptoms(records) == ["clipping"]
    d = next(r for r in records if r.get("event") == "diagnosis")
    assert "LR too high" in d["cause"] and d["step"] == 31


def test_isolated_spike_is_skipped_and_noted(tmp_path, tiny_data):
    result, records = _run(
        tmp_path / "r", tiny_data, "--train.max_steps", 35, "--debug.inject_spike_at_step", 30
    )
    assert _symptoms(records) == ["loss_spike"]
    d = next(r for r in records if r.get("event") == "diagnosis")
    assert d["step"] == 30 and d["action"] == "skip" and d["severity"] == "info"
    assert _train_records(records)[30]["skipped"] is True
    assert result.step == 35 and math.isfinite(result.val_loss)


def test_plateau_with_the_lr_frozen_near_zero(tmp_path, tiny_data):
    _, records = _run(
        tmp_path / "r", tiny_data, "--optim.lr", 1e-7, "--schedule.name", "constant",
        "--schedule.warmup_steps", 0, "--train.max_steps", 35, *QUICK,
    )  # fmt: skip
    assert _symptoms(records) == ["plateau"]


def test_repeated_batches(tmp_path, tiny_data):
    _, records = _run(
        tmp_path / "r", tiny_data, "--debug.repeat_batches", "true", "--train.max_steps", 12
    )
    assert _symptoms(records) == ["repeated_batches"]
    assert next(r for r in records if r.get("event") == "diagnosis")["step"] == 3


@pytest.mark.slow
def test_overfitting_on_a_tiny_dataset(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    src = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    (text / "a.txt").write_text(src.read_text()[:1500])  # 1.5 KB: memorized in ~50 steps
    prepare([str(text)], "byte", tmp_path / "data")
    _, records = _run(
        tmp_path / "r", tmp_path / "data", "--model.n_embd", 128, "--model.n_head", 4,
        "--train.micro_batch", 16, "--optim.weight_decay", 0, "--schedule.name", "constant",
        "--ckpt.interval", 0, "--train.max_steps", 80,
    )  # fmt: skip
    assert _symptoms(records) == ["overfitting"]


@pytest.mark.slow
def test_divergence_after_a_restore_without_optimizer_state(tmp_path, tiny_data):
    """At a high constant LR Adam's moments hold the run together: resumed without them, the
    first updates are sign-steps of the full LR and the loss jumps."""
    common = ("--optim.lr", 0.1, "--schedule.name", "constant", "--ckpt.interval", 40,
              "--train.max_steps", 50)  # fmt: skip
    _, before = _run(tmp_path / "r", tiny_data, *common)
    assert _symptoms(before) == []
    shutil.copytree(tmp_path / "r", tmp_path / "ok")
    ckpt = "checkpoints/step_00000040"
    _, records = _run(
        tmp_path / "r", tiny_data, *common, "--run.resume", tmp_path / "r" / ckpt,
        "--debug.drop_optimizer_state_on_resume", "true",
    )  # fmt: skip
    assert _symptoms(records) == ["diverged_after_restore"]
    d = next(r for r in records if r.get("event") == "diagnosis")
    assert d["severity"] == "critical" and "optimizer" in d["cause"]
    _, records = _run(tmp_path / "ok", tiny_data, *common, "--run.resume", tmp_path / "ok" / ckpt)
    assert _symptoms(records) == []  # a full restore continues the curve


def test_out_of_range_token_ids_stop_cleanly(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = json.loads((data / "meta.json").read_text())["shards"]["train"][0]["file"]
    train_bin = np.memmap(data / shard, dtype=np.uint16, mode="r+")
    train_bin[::40] = 300  # ids a byte vocabulary (257) has no embedding row for
    train_bin.flush()
    del train_bin
    result, records = _run(tmp_path / "r", data, "--train.max_steps", 8)
    assert result.health_stop["symptom"] == "bad_tokens" and result.step == 0
    assert _symptoms(records) == ["bad_tokens"]
    assert "[300]" in result.health_stop["evidence"]


@pytest.mark.slow
def test_throughput_drop_from_a_slow_loader(tmp_path, tiny_data):
    """Resumed with a loader that sleeps 100 ms per batch: tokens/s falls far below the
    rolling median saved with the checkpoint, and the records say the step waits on data."""
    common = (*QUICK, "--ckpt.interval", 40)
    _run(tmp_path / "r", tiny_data, *common, "--train.max_steps", 40)
    _, records = _run(
        tmp_path / "r", tiny_data, *common, "--train.max_steps", 55,
        "--debug.slow_data_ms", 100, "--run.resume", "allow-changes",
    )  # fmt: skip
    assert _symptoms(records) == ["throughput_drop"]
    d = next(r for r in records if r.get("event") == "diagnosis")
    assert "waits on data" in d["evidence"] and "data loader falls behind" in d["cause"]


def test_nan_embedding_row_is_named(tmp_path, tiny_data):
    """Start from weights whose embedding row for ' ' (id 32, in every batch of Python source)
    is NaN: the doctor names the token rather than just 'NaN', and stops after 3 such steps."""
    from safetensors.torch import save_file

    from stalwart.checkpoint import format as ck

    _run(tmp_path / "src", tiny_data, "--train.max_steps", 6, "--ckpt.interval", 6)
    weights = ck.read_model_state(tmp_path / "src/checkpoints/step_00000006")
    weights["transformer.wte.weight"][32] = float("nan")
    save_file(weights, str(tmp_path / "poisoned.safetensors"))
    result, records = _run(
        tmp_path / "r", tiny_data, "--run.init_from", tmp_path / "poisoned.safetensors"
    )
    assert _symptoms(records) == ["bad_tokens"] * 3
    assert result.health_stop["action"] == "stop" and result.step == 2
    assert "embedding rows of token ids [32]" in result.health_stop["evidence"]
