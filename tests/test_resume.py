"""Real `python -m stalwart train` processes, killed for real (SIGKILL, SIGTERM, a full disk),
then resumed with the same command: the run must continue bit for bit.

The reference runs are in-process `train()` calls with the same config: one thread, the same
ops, so the same bits (checked: a subprocess run and an in-process run write identical tensors).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.resume import latest_valid_checkpoint
from stalwart.cli import main as cli_main
from stalwart.logs.metrics import read_metrics
from stalwart.train import train
from tests.conftest import ROOT, TINY, tiny_config

pytestmark = pytest.mark.slow


class Trainer:
    """A `stalwart train` subprocess whose stderr lines we can wait for."""

    def __init__(self, args: list[str], preexec_fn=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stalwart", "train", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for_line(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self._new:
            while not any(text in line for line in self.lines):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"never printed {text!r}:\n{''.join(self.lines)}")
                self._new.wait(0.05)

    def kill(self, sig=signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def finish(self, timeout: float = 240) -> int:
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.05)  # let the reader thread take the last lines
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def wait_for_record(run_dir: Path, step: int, proc: Trainer, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("step", 0) >= step for r in read_metrics(run_dir / "metrics.jsonl")):
        assert proc.proc.poll() is None, proc.stderr
        assert time.monotonic() < deadline, f"step {step} never logged"
        time.sleep(0.01)


def cli_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY, "--run.dir", run_dir, "--data.dir", data, *extra]


def curves(run_dir: Path) -> tuple[list, list]:
    records = read_metrics(run_dir / "metrics.jsonl")
    train_losses = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val_losses = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return train_losses, val_losses


def assert_same_run(run: Path, ref: Path, step: int) -> None:
    """Same losses at every step (each step logged once) and the same final tensors: weights,
    optimizer moments, RNG states, bit for bit."""
    assert curves(run) == curves(ref)
    steps = [s for s, _ in curves(run)[0]]
    assert steps == list(range(1, step + 1))
    for name in ("model.safetensors", "state.safetensors"):
        a = load_file(ck.step_dir(run / "checkpoints", step) / name)
        b = load_file(ck.step_dir(ref / "checkpoints", step) / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def newest_valid(run_dir: Path) -> str:
    return latest_valid_checkpoint(run_dir).name


def test_sigkill_between_steps_in_eval_and_mid_save_then_resume_is_bit_exact(
    tmp_path, tiny_data, capsys
):
    extra = ("--train.max_steps", "30", "--ckpt.keep_last", "2")
    ref = tmp_path / "ref"
    train(tiny_config(ref, tiny_data, *extra), progress=False)
    run = tmp_path / "run"
    # the same command every time; the debug pauses only open a window to kill in
    args = cli_args(run, tiny_data, *extra, "--debug.pause_in_eval_s", "0.5")
    args += ["--debug.pause_in_save_s", "0.5"]

    # 1. between steps: after step 13 was logged (checkpoint at 10)
    p = Trainer(args)
    wait_for_record(run, 13, p)
    assert p.kill() == -signal.SIGKILL
    assert newest_valid(run) == "step_00000010"
    assert max(s for s, _ in curves(run)[0]) < 20

    # 2. during the evaluation of step 20 (before its record and its checkpoint)
    p = Trainer(args)
    p.wait_for_line("in evaluation at step 20")
    p.kill()
    assert newest_valid(run) == "step_00000010"
    assert "resumed from" in p.stderr and "at step 10" in p.stderr
    assert max(s for s, _ in curves(run)[0]) == 19

    # 3. in the middle of writing step 20's checkpoint (files written, no manifest yet)
    p = Trainer(args)
    p.wait_for_line("in the save of .tmp-step_00000020")
    p.kill()
    (stray,) = ck.temp_dirs(run / "checkpoints")
    assert (stray / "model.safetensors").exists() and not (stray / ck.MANIFEST).exists()
    assert not ck.step_dir(run / "checkpoints", 20).exists()
    assert newest_valid(run) == "step_00000010"
    assert cli_main(["ckpt", "verify", str(run)]) == 1  # names the interrupted save
    out = capsys.readouterr().out
    assert f"stray temporary directory {stray}" in out and "writer is gone" in out

    # 4. the same config runs to the end (in-process: one interpreter start less); the stray
    # directory of the dead writer is reported, then removed by the first successful save
    train(tiny_config(run, tiny_data, *args[len(TINY) :]), progress=False)
    assert ck.temp_dirs(run / "checkpoints") == []
    assert_same_run(run, ref, 30)
    records = read_metrics(run / "metrics.jsonl")
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [10, 10, 10]
    assert resumes[-1]["stray_temp_dirs"] == [stray.name]
    checks = [r for r in records if r.get("event") == "resume_check"]
    assert [r["status"] for r in checks] == ["exact"] * 3
    assert [d.name for d in ck.step_dirs(run / "checkpoints")] == ["step_00000020", "step_00000030"]


FP16 = (
    "--train.precision fp16 --model.n_layer 1 --model.n_embd 32 --model.block_size 16 "
    "--train.micro_batch 4 --train.max_steps 6 --schedule.warmup_steps 2 --train.eval_interval 2 "
    "--train.eval_batches 1 --ckpt.interval 2"
).split()


def test_fp16_gradscaler_run_killed_mid_save_resumes_bit_exact(tmp_path, tiny_data):
    ref = tmp_path / "ref"
    train(tiny_config(ref, tiny_data, *FP16), progress=False)
    run = tmp_path / "run"
    args = cli_args(run, tiny_data, *FP16, "--debug.pause_in_save_s", "0.5")
    p = Trainer(args)
    p.wait_for_line("in the save of .tmp-step_00000006")
    p.kill()
    assert newest_valid(run) == "step_00000004"
    train(tiny_config(run, tiny_data, *args[len(TINY) :]), progress=False)  # the same config
    assert_same_run(run, ref, 6)
    # the GradScaler's state came back too: the state resumed from is never a fresh scaler's
    # (scale 65536, growth tracker 0: 4 clean steps count 4, an overflow halves the scale),
    # and two steps after it the resumed run's scaler is the uninterrupted run's
    _, at_resume = ck.read_checkpoint(ck.step_dir(run / "checkpoints", 4))
    assert (at_resume["scaler"]["scale"], at_resume["scaler"]["_growth_tracker"]) != (65536.0, 0)
    _, state = ck.read_checkpoint(ck.step_dir(run / "checkpoints", 6))
    _, ref_state = ck.read_checkpoint(ck.step_dir(ref / "checkpoints", 6))
    assert state["scaler"] == ref_state["scaler"]


def test_sigterm_saves_exits_143_and_the_run_resumes_exactly(tmp_path, tiny_data):
    extra = ("--train.max_steps", "40", "--ckpt.interval", "0", "--debug.slow_data_ms", "20")
    run = tmp_path / "run"
    p = Trainer(cli_args(run, tiny_data, *extra))
    wait_for_record(run, 5, p)
    rc = p.kill(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, p.stderr
    records = read_metrics(run / "metrics.jsonl")
    (stopped,) = [r for r in records if r.get("event") == "stopped"]
    step = stopped["step"]
    assert 5 <= step < 40
    assert newest_valid(run) == f"step_{step:08d}"  # it finished the step and saved it
    assert max(s for s, _ in curves(run)[0]) == step
    # the same command (here: in-process) continues from there, bit for bit
    train(tiny_config(run, tiny_data, *extra), progress=False)
    ref = tmp_path / "ref"
    train(tiny_config(ref, tiny_data, *extra), progress=False)
    assert_same_run(run, ref, 40)


def _limit_file_size(limit: int):
    def preexec():
        # a "full disk" for real: any write past `limit` bytes in one file fails with EFBIG
        # (SIGXFSZ ignored, so the write returns an error instead of killing the process)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_write_error_during_a_save_keeps_every_earlier_checkpoint(tmp_path, tiny_data):
    run = tmp_path / "run"
    extra = ("--train.max_steps", "20", "--ckpt.keep_last", "1")
    train(tiny_config(run, tiny_data, *extra, "--train.max_steps", "10"), progress=False)
    before = {p.name: ck.verify(p).manifest["files"] for p in ck.step_dirs(run / "checkpoints")}
    model_bytes = before["step_00000010"]["model.safetensors"]["bytes"]
    # model.safetensors still fits, state.safetensors (2 Adam moments) does not
    extra = (*extra, "--run.resume", "allow-changes")  # 10 -> 20 steps, on purpose
    p = Trainer(cli_args(run, tiny_data, *extra), preexec_fn=_limit_file_size(model_bytes + 4096))
    assert p.finish() == 2, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error: could not write checkpoint step_00000020")
    assert "File too large" in err and "newest valid: step_00000010" in err
    # nothing earlier was touched (keep_last 1 rotates only after a successful save) ...
    root = run / "checkpoints"
    assert {p.name: ck.verify(p).manifest["files"] for p in ck.step_dirs(root)} == before
    assert ck.verify(root / "best").ok and ck.temp_dirs(root) == []
    # ... and the run resumes from it once the disk has room again
    result = train(tiny_config(run, tiny_data, *extra), progress=False)
    assert result.step == 20 and newest_valid(run) == "step_00000020"
