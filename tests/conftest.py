"""Shared fixtures: a tiny prepared dataset and tiny configs (2 layers, 64 wide, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from stalwart.config import Config, load_config
from stalwart.data.prepare import prepare

# One thread: CPU results are bit-reproducible for a fixed thread count, and tests that start
# subprocesses must not fight over the 2 cores.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY_SOURCES = ["textwrap.py", "json", "string.py", "bisect.py", "heapq.py", "shlex.py"]


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """About 250 KB of real Python source in a directory of its own."""
    d = tmp_path_factory.mktemp("text")
    for name in TINY_SOURCES:
        src = STDLIB / name
        files = sorted(src.rglob("*.py")) if src.is_dir() else [src]
        for f in files:
            (d / f"{name.replace('/', '_')}_{f.name}.txt").write_text(f.read_text())
    return d


@pytest.fixture(scope="session")
def tiny_data(tiny_text_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "byte"
    prepare([str(tiny_text_dir)], "byte", out)
    return out


TINY = [
    "--model.n_layer",
    "2",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "64",
    "--model.block_size",
    "32",
    "--train.micro_batch",
    "8",
    "--train.max_steps",
    "20",
    "--schedule.warmup_steps",
    "5",
    "--train.eval_interval",
    "10",
    "--train.eval_batches",
    "2",
    "--optim.lr",
    "3e-3",
    "--ckpt.interval",
    "10",
    "--train.sample_tokens",
    "0",
    "--run.threads",
    "1",
]


def tiny_config(run_dir: Path, data_dir: Path, *overrides: str) -> Config:
    """A 2-layer, 64-wide model that trains 20 steps in about a second."""
    args = [*TINY, "--run.dir", str(run_dir), "--data.dir", str(data_dir), *overrides]
    return load_config(None, [str(a) for a in args])


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path | None = None):
    """`python -m stalwart ARGS` in a real subprocess (one thread)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stalwart", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or ROOT,
    )


class Crash(Exception):
    """Raised from an `after_step` hook: a run that dies between two steps."""


def crash_and_resume(tmp_path: Path, data_dir: Path, *overrides: str, crash_after: int = 13):
    """Train the tiny config uninterrupted (`full/`), then again (`part/`) crashing after step
    `crash_after` and resuming from its last checkpoint. Returns both runs' results."""
    from stalwart.train import AfterStep, train

    full = train(tiny_config(tmp_path / "full", data_dir, *overrides), progress=False)

    def crash(step, record):
        if step == crash_after:
            raise Crash

    with pytest.raises(Crash):
        train(
            tiny_config(tmp_path / "part", data_dir, *overrides),
            progress=False,
            callbacks=[AfterStep(crash)],
        )
    resumed = train(tiny_config(tmp_path / "part", data_dir, *overrides), progress=False)
    return full, resumed
