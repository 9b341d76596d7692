import math

import pytest
import torch

from stalwart.logs.metrics import read_metrics
from stalwart.train import AfterStep, train
from tests.conftest import Crash, tiny_config

TRAIN_FIELDS = {
    "step",
    "train_loss",
    "lr",
    "grad_norm",
    "clipped",
    "tokens",
    "tokens_per_sec",
    "step_time_s",
    "mfu",
}


def test_smoke_run_learns_and_logs_every_field(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path / "run", tiny_data, "--train.max_steps", "30")
    result = train(cfg, progress=False)
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for r in steps:
        assert TRAIN_FIELDS <= r.keys()
        assert isinstance(r["clipped"], bool)
        assert r["tokens"] == r["step"] * 8 * 32
    first, last = steps[0]["train_loss"], sum(r["train_loss"] for r in steps[-5:]) / 5
    assert last < first - 1.0  # from ~5.5 (uniform over 256) well down
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert result.val_loss == vals[-1] and math.isfinite(result.best_val)
    assert (tmp_path / "run/config.toml").is_file()
    assert (tmp_path / "run/checkpoints/step_00000030/model.safetensors").is_file()
    assert (tmp_path / "run/checkpoints/best/manifest.json").is_file()
    assert any(r.get("event") == "checkpoint" for r in records)


def _losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


def test_accumulation_equals_one_big_batch(tmp_path, tiny_data):
    """micro 8 x accum 4 == micro 32 x accum 1: same sequences, same mean gradient."""
    common = ("--train.max_steps", "8", "--train.eval_interval", "0", "--ckpt.interval", "0")
    a = train(
        tiny_config(
            tmp_path / "a",
            tiny_data,
            *common,
            "--train.micro_batch",
            "8",
            "--train.grad_accum",
            "4",
        ),
        progress=False,
    )
    b = train(
        tiny_config(
            tmp_path / "b",
            tiny_data,
            *common,
            "--train.micro_batch",
            "32",
            "--train.grad_accum",
            "1",
        ),
        progress=False,
    )
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(la) == 8
    assert la == pytest.approx(lb, abs=1e-5, rel=0)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=n)


def test_forgetting_the_division_changes_training(tmp_path, tiny_data):
    """The check above can fail: without `/ grad_accum` the gradient is 4x too large."""
    common = (
        "--train.max_steps",
        "3",
        "--schedule.warmup_steps",
        "1",
        "--train.eval_interval",
        "0",
        "--ckpt.interval",
        "0",
        "--optim.grad_clip",
        "0",
    )
    ref = train(
        tiny_config(
            tmp_path / "a",
            tiny_data,
            *common,
            "--train.micro_batch",
            "8",
            "--train.grad_accum",
            "4",
            "--optim.name",
            "sgd",
        ),
        progress=False,
    )
    bug = train(
        tiny_config(
            tmp_path / "b",
            tiny_data,
            *common,
            "--train.micro_batch",
            "8",
            "--train.grad_accum",
            "4",
            "--optim.name",
            "sgd",
            "--debug.forget_accum_division",
            "true",
        ),
        progress=False,
    )
    diff = max(
        (p - q).abs().max().item() for p, q in zip(ref.model.parameters(), bug.model.parameters())
    )
    assert diff > 1e-4


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_paths_run(tmp_path, tiny_data, precision):
    cfg = tiny_config(
        tmp_path / "run",
        tiny_data,
        "--train.precision",
        precision,
        "--train.max_steps",
        "6",
        "--train.eval_interval",
        "3",
    )
    result = train(cfg, progress=False)
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.val_loss)
    for p in result.model.parameters():  # master weights stay fp32
        assert p.dtype == torch.float32
    if precision == "fp16":
        from stalwart.checkpoint.format import read_checkpoint

        _, state = read_checkpoint(tmp_path / "run/checkpoints/step_00000006")
        assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the checkpoint
    else:
        assert mfu_is_null(records)  # no calibrated bf16 peak on this CPU: no guessed MFU


def mfu_is_null(records):
    return all(r["mfu"] is None for r in records if "mfu" in r)


def test_resume_continues_exactly(tmp_path, tiny_data):
    """Crash after step 13 (checkpoint at 10), resume: bit-identical to one uninterrupted run."""
    full = train(tiny_config(tmp_path / "full", tiny_data), progress=False)

    def crash(step, record):
        if step == 13:
            raise Crash

    with pytest.raises(Crash):
        train(
            tiny_config(tmp_path / "part", tiny_data), progress=False, callbacks=[AfterStep(crash)]
        )
    resumed = train(
        tiny_config(
            tmp_path / "part",
            tiny_data,
            "--train.eval_batches",
            "3",
            "--run.resume",
            "allow-changes",
        ),
        progress=False,
    )
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")  # steps 11-13 replayed once
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    events = [
        r for r in read_metrics(tmp_path / "part/metrics.jsonl") if r.get("event") == "resume"
    ]
    assert events[0]["step"] == 10 and events[0]["changes"] == ["train.eval_batches: 2 -> 3"]


def test_nonfinite_step_never_reaches_the_weights(tmp_path, tiny_data):
    cfg = tiny_config(
        tmp_path / "run", tiny_data, "--debug.inject_nan_at_step", "5", "--health.on_nan", "skip"
    )
    result = train(cfg, progress=False)
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert any(r.get("event") == "diagnosis" and r["step"] == 5 for r in records)
    assert [r for r in records if r.get("step") == 5 and "train_loss" in r][0]["skipped"]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.slow
def test_gpt2_124m_recipe_plans_and_runs_at_reduced_batch(tmp_path, tiny_data):
    """The GPT-2 small recipe at full shape (124M parameters), a reduced batch of 1 x 128
    tokens, 3 steps on the CPU: it loads, plans, trains and checkpoints."""
    from stalwart.config import load_config
    from stalwart.memory.planner import plan_training

    args = [
        "--run.dir",
        str(tmp_path / "run"),
        "--data.dir",
        str(tiny_data),
        "--model.block_size",
        "128",
        "--train.micro_batch",
        "1",
        "--train.grad_accum",
        "1",
        "--train.max_steps",
        "3",
        "--schedule.warmup_steps",
        "1",
        "--train.compile",
        "false",
        "--train.eval_interval",
        "0",
        "--train.eval_batches",
        "1",
        "--ckpt.interval",
        "0",
        "--train.sample_tokens",
        "0",
        "--train.dashboard",
        "false",
        "--train.precision",
        "fp32",
        "--train.log_interval",
        "1",
    ]
    cfg = load_config("configs/gpt2-124m.toml", args)
    plan = plan_training(cfg)
    assert plan.components["weights"] >= 120e6 * 4  # fp32 weights (wpe cut to 128 positions)
    result = train(cfg, progress=False)
    assert result.step == 3
    assert sum(p.numel() for p in result.model.parameters()) > 120e6
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
