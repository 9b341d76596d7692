"""Checkpoints in-process: the format, verification and corruption, safety against pickles,
retention, the resume rules and the continuity self-check, async saves, the doctor's API."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stalwart.checkpoint import format as ck
from stalwart.checkpoint import state as trainstate
from stalwart.checkpoint.backend import LocalBackend, pick_backend
from stalwart.checkpoint.resume import (
    compare_probe,
    latest_valid_checkpoint,
    probe_tolerance,
    select_checkpoint,
)
from stalwart.checkpoint.retention import retention_plan
from stalwart.checkpoint.saver import CheckpointSaver
from stalwart.cli import main as cli_main
from stalwart.config import to_dict
from stalwart.data.loader import BatchLoader, open_dataset
from stalwart.errors import UserError
from stalwart.health.monitor import build_monitor
from stalwart.logs.metrics import read_metrics
from stalwart.model.gpt import build_model
from stalwart.optim.build import build_optimizer
from stalwart.precision import build_precision
from stalwart.train import AfterStep, train
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ALLOW = ("--run.resume", "allow-changes")  # a resume with other settings, on purpose


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    """A finished 30-step run: step_10, step_20, step_30 and best/ (= step 30)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(run, tiny_data, "--train.max_steps", "30"), progress=False)
    return run


def copy_run(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def ckpt_cli(capsys, action: str, path: Path) -> tuple[int, str]:
    rc = cli_main(["ckpt", action, str(path)])
    return rc, capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Format


def test_state_tree_roundtrip_keeps_types_and_copies_on_request():
    t = torch.arange(4.0)
    state = {
        0: {"exp_avg": t, "step": torch.tensor(3.0)},
        "rng": (3, tuple(range(5)), None),
        "np": np.random.get_state(),
        "floats": [math.inf, -math.inf, 1.5],
        "nan": math.nan,
    }
    tensors: dict = {}
    tree = ck.flatten(state, tensors, copy=True)
    json.dumps(tree)  # plain JSON
    t.add_(1)  # the snapshot must not see later in-place updates
    back = ck.unflatten(json.loads(json.dumps(tree)), tensors)
    assert torch.equal(back[0]["exp_avg"], torch.arange(4.0)) and 0 in back
    assert back["rng"] == (3, (0, 1, 2, 3, 4), None)
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], state["np"][1])
    assert back["floats"] == [math.inf, -math.inf, 1.5] and math.isnan(back["nan"])


def test_checkpoint_holds_the_complete_state_and_the_tokenizer(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "tokenizer.json").write_text('{"model": "stand-in"}')
    run = tmp_path / "run"
    over = ("--train.max_steps", "4", "--ckpt.interval", "2", "--schedule.warmup_steps", "1")
    train(tiny_config(run, data, *over), progress=False)
    path = ck.step_dir(run / "checkpoints", 4)
    info = ck.verify(path)
    assert info.ok and set(info.manifest["files"]) == {
        "model.safetensors",
        "state.safetensors",
        "state.json",
        "tokenizer.json",
    }
    assert (path / "tokenizer.json").read_text() == '{"model": "stand-in"}'
    _, state = ck.read_checkpoint(path)
    assert state["loop"]["step"] == 4 and state["loop"]["tokens"] == 4 * 8 * 32
    assert math.isfinite(state["loop"]["best_val"])
    assert state["loader"] == {"position": 4} and state["threads"] == 1
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert state["optimizer"]["state"] and "health" in state and "scaler" in state
    assert state["config"]["model"]["n_embd"] == 64 and state["data_meta"]["vocab_size"] == 257
    assert state["probe"]["precision"] == "fp32" and math.isfinite(state["probe"]["loss"])
    for key in ("step", "tokens", "best_val", "val_loss", "kind"):
        assert key in info.manifest


# ----------------------------------------------------------------------------------------------
# Verification, corruption, fallback


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped byte": (lambda d: _flip_byte(d / "state.safetensors"), "fails its sha256"),
    "truncated": (lambda d: os.truncate(d / "model.safetensors", 1000), "wrong size"),
    "missing file": (lambda d: (d / "state.json").unlink(), "state.json is missing"),
    "no manifest": (lambda d: (d / ck.MANIFEST).unlink(), "no manifest"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_is_named_by_verify_and_resume_falls_back(kind, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints/best")  # (best/ is step 30 too: a valid fallback itself)
    damage, problem = CORRUPTIONS[kind]
    damage(ck.step_dir(run / "checkpoints", 30))
    info = ck.verify(ck.step_dir(run / "checkpoints", 30))
    assert not info.ok and problem in info.problem
    rc, out = ckpt_cli(capsys, "verify", run)
    assert rc == 1 and "CORRUPT" in out and "step_00000030" in out and problem in out
    said = []
    found = select_checkpoint(run, "auto", said.append).path
    assert found.name == "step_00000020"
    assert "step_00000030 is not usable" in said[0]


def test_resume_over_a_corrupt_newest_replays_exactly_and_sets_it_aside(
    trained, tmp_path, tiny_data
):
    run = copy_run(trained, tmp_path)
    _flip_byte(run / "checkpoints/step_00000030/model.safetensors")
    _flip_byte(run / "checkpoints/best/model.safetensors")
    result = train(tiny_config(run, tiny_data, "--train.max_steps", "30"), progress=False)
    assert result.step == 30
    records = read_metrics(run / "metrics.jsonl")
    resume = [r for r in records if r.get("event") == "resume"][-1]
    assert resume["from"].endswith("step_00000020")
    aside = sorted(p.name for p in (run / "checkpoints").glob("abandoned-*"))
    assert [a.split("-")[1] for a in aside] == ["best", "step_00000030"]
    for name in ("model.safetensors", "state.safetensors"):
        a = load_file(run / "checkpoints/step_00000030" / name)
        b = load_file(trained / "checkpoints/step_00000030" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stray_temp_dir_is_reported_and_never_loaded(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    stray = run / "checkpoints" / ".tmp-step_00000040-999999999-otherhost"
    shutil.copytree(run / "checkpoints/step_00000030", stray)
    rc, out = ckpt_cli(capsys, "verify", run)
    assert rc == 1 and f"stray temporary directory {stray}" in out and "another host" in out
    assert "4/4 checkpoints ok, 1 interrupted save(s)" in out
    assert select_checkpoint(run, "auto", print).path.name == "step_00000030"


def test_ckpt_list_shows_step_time_val_size_status(trained, capsys):
    rc, out = ckpt_cli(capsys, "list", trained)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:5] == ["name", "step", "saved", "val_loss", "size"]
    row = next(line for line in lines if line.startswith("step_00000030"))
    assert row.split()[1] == "30" and row.endswith("ok") and "MB" in row
    assert any(line.startswith("best") for line in lines)


def test_no_valid_checkpoint_is_refused_not_silently_restarted(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    for d in [*ck.step_dirs(run / "checkpoints"), run / "checkpoints/best"]:
        (d / ck.MANIFEST).unlink()
    with pytest.raises(UserError, match="none is usable"):
        select_checkpoint(run, "auto", print)


def test_resume_never_and_path(trained, tmp_path):
    with pytest.raises(UserError, match="resume is never"):
        select_checkpoint(trained, "never", print)
    assert select_checkpoint(tmp_path / "fresh", "never", print) is None
    older = ck.step_dir(trained / "checkpoints", 10)
    assert select_checkpoint(tmp_path, str(older), print).path == older
    found = select_checkpoint(tmp_path, str(trained), print).path
    assert found.name == "step_00000030"
    with pytest.raises(UserError, match="no manifest"):
        select_checkpoint(tmp_path, str(tmp_path), print)


def test_incompatible_resume_is_refused(trained, tmp_path, tiny_data):
    run = copy_run(trained, tmp_path)
    with pytest.raises(UserError, match="model.n_embd = 64"):
        train(tiny_config(run, tiny_data, "--model.n_embd", "32"), progress=False)
    with pytest.raises(UserError, match="model.vocab_size"):
        train(tiny_config(run, tiny_data, "--model.vocab_size", "512"), progress=False)
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["source"]["sha256"] = "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="different dataset"):
        train(tiny_config(run, other), progress=False)


# ----------------------------------------------------------------------------------------------
# A checkpoint from a stranger cannot run code


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this object creates the marker file
        return (open, (str(self.marker), "w"))


def test_planted_pickles_never_execute(trained, tmp_path, tiny_data, capsys):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()
    newest = ck.step_dir(run / "checkpoints", 30)
    for name in ("evil.pkl", "optimizer.pt", "rng_state.pth"):
        (newest / name).write_bytes(payload)
    # a forged checkpoint: state.safetensors replaced by the pickle, manifest updated to match
    forged = ck.step_dir(run / "checkpoints", 20)
    (forged / "state.safetensors").write_bytes(payload)
    manifest = json.loads((forged / ck.MANIFEST).read_text())
    manifest["files"]["state.safetensors"] = ck._file_record(forged / "state.safetensors")
    (forged / ck.MANIFEST).write_text(json.dumps(manifest))

    rc, out = ckpt_cli(capsys, "verify", run)
    assert rc == 0 and "never loaded: evil.pkl, optimizer.pt, rng_state.pth" in out
    with pytest.raises(ck.CheckpointUnreadable, match="cannot be read"):
        ck.read_checkpoint(forged)
    from stalwart.eval.sample import load_model

    load_model(newest)
    result = train(tiny_config(run, tiny_data, "--train.max_steps", "30"), progress=False)
    assert result.step == 30
    shutil.rmtree(newest)
    shutil.rmtree(run / "checkpoints/best")  # now the forged one is the newest
    train(tiny_config(run, tiny_data, "--train.max_steps", "30"), progress=False)
    resume = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "resume"]
    assert resume[-1]["from"].endswith("step_00000010")  # the forged step 20 was skipped
    assert not marker.exists()


def test_checkpoint_code_never_unpickles():
    # safe_dcp.py reads DCP's metadata pickle through an allow-list unpickler (its own tests)
    files = sorted(
        set((ROOT / "src/stalwart/checkpoint").glob("*.py"))
        - {ROOT / "src/stalwart/checkpoint/safe_dcp.py"}
    )
    assert len(files) >= 5  # the rest of the checkpoint package
    for path in files:
        src = path.read_text()
        assert not re.search(r"import pickle|from pickle|pickle\.load|Unpickler|torch\.load", src)


# ----------------------------------------------------------------------------------------------
# Retention and when to save


def test_retention_plan():
    assert retention_plan([10, 20, 30, 40], 2) == [10, 20]
    assert retention_plan([10, 20, 30, 40], 2, milestone_interval=20) == [10]
    assert retention_plan([10], 1) == [] and retention_plan([10, 20], 0) == [10]


def test_rotation_keeps_ring_milestones_and_best(tmp_path, tiny_data):
    run = tmp_path / "run"
    over = ("--train.max_steps", "25", "--ckpt.interval", "5", "--ckpt.keep_last", "2")
    train(tiny_config(run, tiny_data, *over, "--ckpt.milestone_interval", "10"), False)
    names = [d.name for d in ck.step_dirs(run / "checkpoints")]
    assert names == ["step_00000010", "step_00000020", "step_00000025"]
    assert ck.verify(run / "checkpoints/best").ok and ck.temp_dirs(run / "checkpoints") == []


def test_interval_minutes_saves_on_time(tmp_path, tiny_data):
    run = tmp_path / "run"
    over = ("--train.max_steps", "4", "--ckpt.interval", "0", "--ckpt.keep_last", "10")
    over += ("--schedule.warmup_steps", "1")
    train(tiny_config(run, tiny_data, *over, "--ckpt.interval_minutes", "1e-9"), False)
    assert len(ck.step_dirs(run / "checkpoints")) == 4


def test_sigint_finishes_the_step_saves_and_reports_the_signal(tmp_path, tiny_data):
    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_data, "--ckpt.interval", "0")
    result = train(cfg, progress=False, callbacks=[AfterStep(interrupt)])
    assert result.stop_signal == signal.SIGINT and 3 <= result.step < 20
    assert ck.verify(ck.step_dir(run / "checkpoints", result.step)).ok


# ----------------------------------------------------------------------------------------------
# Continuity self-check


def test_probe_policy():
    assert compare_probe(2.5, 2.5, 1e-4) == "exact"
    assert compare_probe(2.5, 2.5 + 1e-6, probe_tolerance("fp32", "fp32", 2.5)) == "close"
    assert compare_probe(2.5, 2.51, probe_tolerance("fp32", "fp32", 2.5)) == "mismatch"
    assert probe_tolerance("fp32", "bf16", 2.5) > probe_tolerance("fp32", "fp32", 2.5)


def _tamper_weights(path: Path) -> None:
    """Rewrite a checkpoint with other weights but the state (and probe loss) it had: what a
    broken restore or changed model code would look like from the loop's side."""
    model_state, state = ck.read_checkpoint(path)
    info = {k: v for k, v in ck.verify(path).manifest.items() if k not in ("files", "created")}
    ck.write_checkpoint(path, {k: v * 1.05 for k, v in model_state.items()}, state, info)


def test_resume_check_refuses_a_mismatch_or_warns(trained, tmp_path, tiny_data):
    run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints/best")
    _tamper_weights(ck.step_dir(run / "checkpoints", 30))
    with pytest.raises(UserError, match="resume check failed: probe-batch loss"):
        train(tiny_config(run, tiny_data, "--train.max_steps", "30"), progress=False)
    checks = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "resume_check"]
    assert checks[-1]["status"] == "mismatch" and checks[-1]["action"] == "refused"
    cfg = tiny_config(run, tiny_data, "--train.max_steps", "30", "--ckpt.resume_check", "warn")
    train(cfg, progress=False)
    records = read_metrics(run / "metrics.jsonl")
    (diag,) = [r for r in records if r.get("symptom") == "restore_mismatch"]
    assert diag["event"] == "diagnosis" and diag["step"] == 30
    assert [r for r in records if r.get("event") == "resume_check"][-1]["action"] == "warned"


# ----------------------------------------------------------------------------------------------
# Asynchronous saves


def test_async_save_is_bit_identical_to_sync(tmp_path, tiny_data, trained):
    run = tmp_path / "run"
    train(
        tiny_config(run, tiny_data, "--train.max_steps", "30", "--ckpt.async_save", "true"), False
    )
    for step in (10, 20, 30):  # written while the next steps trained: no torn snapshot
        for name in ("model.safetensors", "state.safetensors"):
            a = load_file(ck.step_dir(run / "checkpoints", step) / name)
            b = load_file(ck.step_dir(trained / "checkpoints", step) / name)
            assert all(torch.equal(a[k], b[k]) for k in a), (step, name)
    saves = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert [r["step"] for r in saves] == [10, 20, 30] and all(r["async"] for r in saves)


def test_async_save_error_surfaces_in_the_training_thread(tmp_path, tiny_data):
    run = tmp_path / "run"
    over = ("--train.max_steps", "20", "--ckpt.async_save", "true")
    train(tiny_config(run, tiny_data, *over, "--train.max_steps", "10"), progress=False)
    limit = ck.verify(run / "checkpoints/step_00000010").manifest["files"]
    limit = limit["model.safetensors"]["bytes"] + 4096
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        with pytest.raises(UserError, match="could not write checkpoint step_00000020"):
            train(tiny_config(run, tiny_data, *over, *ALLOW), progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert latest_valid_checkpoint(run).name == "step_00000010"
    assert ck.temp_dirs(run / "checkpoints") == []


# ----------------------------------------------------------------------------------------------
# The doctor's API: newest valid checkpoint, restore everything into live objects; the
# save's NaN guard


def _live_parts(tmp_path, tiny_data):
    """(config, fresh live objects of the tiny model) as a process builds them for a run."""
    cfg = tiny_config(tmp_path, tiny_data)
    model = build_model(cfg.model, 257)
    opt = build_optimizer(cfg.optim, model)
    scaler = build_precision("fp32", torch.device("cpu")).scaler
    loader = BatchLoader(open_dataset(tiny_data).train, 32, 8, 1, cfg.run.seed)
    monitor = build_monitor(cfg.health)
    return cfg, trainstate.TrainParts(model, opt, scaler, loader, monitor, trainstate.LoopState())


def test_latest_valid_and_restore_checkpoint_for_rollback(trained, tmp_path, tiny_data):
    path = latest_valid_checkpoint(trained)
    assert path.name == "step_00000030"
    _, p = _live_parts(tmp_path, tiny_data)
    model, loader, loop = p.model, p.loader, p.loop
    state = trainstate.restore_checkpoint(
        path, model, p.optimizer, p.scaler, loader, p.monitor, loop
    )
    assert loop.step == 30 and loader.position == 30 and state["threads"] == 1
    saved = load_file(path / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])


def test_a_save_of_nan_weights_is_refused_and_returns_why(tmp_path, tiny_data):
    """No NaN weight reaches a disk: the saver writes nothing and says so in its result (the
    doctor's Recovery acts on it); a good save goes through the same saver afterwards."""
    cfg, parts = _live_parts(tmp_path, tiny_data)
    backend = pick_backend(None, optim=cfg.optim, train=cfg.train, seed=cfg.run.seed)
    assert isinstance(backend, LocalBackend)
    run = tmp_path / "run"
    saver = CheckpointSaver(cfg.ckpt, run, parts, backend, config=to_dict(cfg), say=print)
    records = []
    saver.attach_log(type("Log", (), {"write": lambda self, r: records.append(r)})())
    good = parts.model.transformer.wpe.weight[0, 0].item()
    with torch.no_grad():
        parts.model.transformer.wpe.weight[0, 0] = float("nan")
    parts.loop.step = 10
    outcome = saver.maybe_save(10, force=True)
    assert outcome.due and outcome.refused and outcome.step == 10
    assert outcome.nonfinite == ["transformer.wpe.weight"]
    assert "1 weight tensors hold NaN/Inf (transformer.wpe.weight); not saved" == outcome.evidence
    assert ck.step_dirs(run / "checkpoints") == [] and records == []
    assert not saver.maybe_save(11).due  # nothing due: nothing done
    with torch.no_grad():
        parts.model.transformer.wpe.weight[0, 0] = good
    outcome = saver.maybe_save(10, force=True)
    assert outcome.due and not outcome.refused
    assert ck.verify(ck.step_dir(run / "checkpoints", 10)).ok
    assert [r["event"] for r in records] == ["checkpoint"] and saver.last_good.name.endswith("10")
