"""The details users hit first: --help that lists the config, boolean flags, a refused re-run
with changed settings, a locked run directory, loggers that continue a resumed run, the extras,
other Pythons, and torchrun without --parallel.mode."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from stalwart import parallel
from stalwart.checkpoint import format as ck
from stalwart.cli import main
from stalwart.config import Config, load_config
from stalwart.errors import UserError
from stalwart.logs.metrics import read_metrics
from stalwart.train import AfterStep, train
from tests.conftest import ROOT, TINY, run_cli, tiny_config

# ---- 1. --help lists every section's fields ------------------------------------------------


@pytest.mark.parametrize("command", ["train", "plan", "bench", "config"])
def test_help_lists_the_fields_of_every_section(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in out
    assert "--optim.lr FLOAT  (default: 0.0006)" in out
    assert "--train.compile BOOL  (default: False)" in out
    assert "--optim.name sgd|momentum|adam|adamw|muon" in out
    assert "torch.compile the model" in out  # the field's help


# ---- 2. booleans are flags -----------------------------------------------------------------


def test_bare_and_negated_boolean_flags():
    cfg = load_config(
        None,
        ["--train.compile", "--optim.lr", "1e-3", "--no-train.dashboard", "--health.enabled"],
    )
    assert cfg.train.compile is True and cfg.optim.lr == 1e-3
    assert cfg.train.dashboard is False and cfg.health.enabled is True
    cfg = load_config(None, ["--train.compile", "false", "--ckpt.async_save=true"])
    assert cfg.train.compile is False and cfg.ckpt.async_save is True
    with pytest.raises(UserError, match="--optim.lr needs a value"):
        load_config(None, ["--optim.lr"])
    with pytest.raises(UserError, match="--train.compile expects bool, got 'maybe'"):
        load_config(None, ["--train.compile", "maybe"])
    with pytest.raises(UserError, match="unknown option --no-optim.lr"):
        load_config(None, ["--no-optim.lr"])  # only booleans have a --no- form


def test_the_issue_command_line_parses(tmp_path, tiny_data):
    r = run_cli(
        "config", "--train.compile", "--optim.lr", "1e-3", "--no-train.fused_gelu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    tree = tomllib.loads(r.stdout)
    assert tree["train"]["compile"] is True and tree["optim"]["lr"] == 1e-3


# ---- 3. a re-run with other settings is refused --------------------------------------------


def _ten_steps(run: Path, data: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--train.max_steps", "10", "--train.dashboard", "false",
            "--run.dir", str(run), "--data.dir", str(data), *extra]  # fmt: skip


def test_rerun_with_changed_settings_is_refused_and_can_be_allowed(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert run_cli(*_ten_steps(run, tiny_data)).returncode == 0
    before = (run / "metrics.jsonl").read_bytes()
    r = run_cli(*_ten_steps(run, tiny_data, "--optim.lr", "1e-3", "--train.max_steps", "12"))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert line.startswith("error:") and "\n" not in line
    assert "optim.lr 0.003 -> 0.001" in line and "train.max_steps 10 -> 12" in line
    assert "new --run.dir" in line and "--run.resume allow-changes" in line
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing touched
    # logging-only fields may change freely
    r = run_cli(*_ten_steps(run, tiny_data, "--train.log_interval", "5"))
    assert r.returncode == 0, r.stderr
    # asked for: the run continues with the new values, and says what changed
    r = run_cli(
        *_ten_steps(run, tiny_data, "--train.max_steps", "12", "--run.resume", "allow-changes")
    )
    assert r.returncode == 0, r.stderr
    records = read_metrics(run / "metrics.jsonl")
    resume = [x for x in records if x.get("event") == "resume"][-1]
    assert any(c.startswith("train.max_steps: 10 -> 12") for c in resume["changes"])
    assert max(x["step"] for x in records if "train_loss" in x) == 12


# ---- 4. one live run per run dir -----------------------------------------------------------


def _popen_train(run: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "stalwart", *_ten_steps(run, data, *extra)]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(cond, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_train_on_a_live_run_dir_is_refused(tmp_path, tiny_data):
    run = tmp_path / "run"
    first = _popen_train(run, tiny_data, "--debug.pause_in_eval_s", "3")
    try:
        _wait_for(lambda: (run / ".lock").is_file() and (run / ".lock").read_text().strip())
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == first.pid
        second = run_cli(*_ten_steps(run, tiny_data))
        assert second.returncode == 2
        assert second.stderr.startswith("error:")
        assert f"pid {first.pid} on host {holder['host']}" in second.stderr
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err  # the first run was not disturbed
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 11))
    assert (run / ".lock").read_text() == ""  # released


@pytest.mark.slow
def test_a_lock_left_by_sigkill_is_taken_over(tmp_path, tiny_data):
    run = tmp_path / "run"
    first = _popen_train(run, tiny_data, "--debug.pause_in_eval_s", "30")
    _wait_for(lambda: (run / ".lock").is_file() and (run / ".lock").read_text().strip())
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert str(first.pid) in (run / ".lock").read_text()  # the record stays behind
    r = run_cli(*_ten_steps(run, tiny_data))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"took over the lock of .*pid {first.pid} on host .* is gone", r.stderr)


def test_the_lock_is_released_when_a_run_fails_in_process(tmp_path, tiny_data):
    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 3:
            raise Crash

    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(tiny_config(run, tiny_data), progress=False, callbacks=[AfterStep(crash)])
    assert train(tiny_config(run, tiny_data), progress=False).step == 20  # not locked out


# ---- 5. loggers continue a resumed run ------------------------------------------------------


def _crash_then_resume(run: Path, data: Path, *extra: str) -> None:
    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 15:
            raise Crash

    with pytest.raises(Crash):
        train(tiny_config(run, data, *extra), progress=False, callbacks=[AfterStep(crash)])
    train(tiny_config(run, data, *extra), progress=False)  # resumes from step 10


def test_tensorboard_purges_the_replayed_steps(tmp_path, tiny_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _crash_then_resume(run, tiny_data, "--train.loggers", "tensorboard")
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("train/train_loss")]
    assert steps == list(range(1, 21))  # 11..15 were logged twice, the first time purged


def test_wandb_resumes_the_same_run_offline(tmp_path, tiny_data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "stalwart-tests")
    run = tmp_path / "run"
    _crash_then_resume(run, tiny_data, "--train.loggers", "wandb")
    run_id = (run / "wandb_run_id").read_text().strip()
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2  # the crashed attempt and the resumed one
    # offline-run-DATE_TIME-ID, plus "-1" when both attempts start within the same second
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", p.name)[1] for p in attempts}
    assert ids == {run_id}
    assert {p.name for p in (run / "wandb").glob("offline-run-*/run-*.wandb")} == {
        f"run-{run_id}.wandb"
    }


# ---- 6. other Pythons ------------------------------------------------------------------------

PYENV = Path.home() / ".pyenv" / "versions"
CHECK = """
import compileall, pathlib, sys
sys.path.insert(0, "src")
assert compileall.compile_dir("src", quiet=1, force=True, legacy=False)
import stalwart.config, stalwart.config_base, stalwart.errors
for f in sorted(pathlib.Path("configs").glob("*.toml")):
    stalwart.config.load_config(str(f))
print(sys.version_info[:2], "ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_other_pythons_compile_and_read_the_config(version, tmp_path):
    found = sorted(PYENV.glob(f"{version}.*/bin/python3"))
    if not found:
        pytest.skip(f"no Python {version} under {PYENV}")
    venv = tmp_path / "venv"
    subprocess.run([str(found[-1]), "-m", "venv", str(venv)], check=True)
    if version == "3.10":  # tomllib arrived in 3.11: stalwart depends on tomli there
        pip = subprocess.run(
            [str(venv / "bin/pip"), "install", "-q", "tomli>=1.1"], capture_output=True, text=True
        )
        if pip.returncode != 0:
            pytest.skip(f"cannot install tomli for {version}: {pip.stderr.strip()[-200:]}")
    r = subprocess.run(
        [str(venv / "bin/python"), "-c", CHECK], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


# ---- 7. the extras hold what the package imports ---------------------------------------------

# optional dependencies (imported inside functions): module -> (distribution, extra)
OPTIONAL = {
    "tiktoken": ("tiktoken", "gpt2"),
    "torch.utils.tensorboard": ("tensorboard", "tb"),
    "wandb": ("wandb", "wandb"),
}


def test_every_extra_is_used_and_every_optional_import_has_an_extra():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    source = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    modules = {dist: module for module, (dist, _) in OPTIONAL.items()}
    for module, (dist, extra) in OPTIONAL.items():
        assert re.search(rf"^\s+(import|from) {re.escape(module)}\b", source, re.M), module
        assert any(req.startswith(dist) for req in extras[extra]), (dist, extra)
    for extra, reqs in extras.items():
        if extra in ("dev", "lmeval"):  # the tests' and benchmarks/lm_eval_equality.py's sets
            continue
        for req in reqs:
            dist = re.split(r"[<>=;\[ ]", req)[0]
            module = re.escape(modules.get(dist, dist))
            assert re.search(rf"(import|from) {module}\b", source), f"[{extra}] {dist} unused"


# ---- 8. torchrun without --parallel.mode -----------------------------------------------------


@pytest.mark.dist
def test_torchrun_without_a_mode_trains_data_parallel(tmp_path, tiny_data):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "stalwart", *_ten_steps(run, tiny_data, "--train.micro_batch", "4"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WORLD_SIZE=2, so --parallel.mode auto trains data parallel with DDP" in r.stderr
    assert r.stderr.count("--parallel.mode auto trains") == 1  # said once, by rank 0
    dist = ck.read_json_state(run / "checkpoints/step_00000010", ("dist",))["dist"]
    assert dist["mode"] == "ddp" and dist["world_size"] == 2


def test_auto_is_one_process_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = parallel.init(Config().parallel, "cpu")
    assert ctx.mode == "none" and ctx.world_size == 1
