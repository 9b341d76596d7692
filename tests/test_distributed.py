"""Data parallelism with real processes: torchrun, gloo, CPU, a 2-layer 64-wide model.

Every run here trains the same 10 steps of the same global batch (16 sequences) and has a NaN
injected into step 3 on one rank only (rank 1; the single process: its only rank), so the
equality checks also prove that every rank skipped that step together: a rank that applied it
would carry different weights from then on, and its losses would leave float rounding behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stalwart.checkpoint import format as ck
from stalwart.logs.metrics import read_metrics
from stalwart.train import train
from tests.conftest import ROOT, TINY, tiny_config

pytestmark = pytest.mark.dist

STEPS = 10
COMMON = [
    *TINY,
    "--train.micro_batch", "4",
    "--train.max_steps", str(STEPS),
    "--schedule.warmup_steps", "2",
    "--train.eval_interval", "5",
    "--ckpt.interval", "5",
    "--debug.inject_nan_at_step", "3",
    "--train.dashboard", "false",
]  # fmt: skip
TWO_RANKS = ["--train.grad_accum", "2", "--debug.inject_rank", "1"]  # 2 x 4 x 2 = 16 sequences
ONE_RANK = ["--train.grad_accum", "4"]  # 1 x 4 x 4 = 16 sequences


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(run_dir, data, *extra, nproc=2, launcher=("--standalone",)) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", *launcher,
        f"--nproc-per-node={nproc}",
        "-m", "stalwart", "train", "--quiet",
        *COMMON, "--run.dir", str(run_dir), "--data.dir", str(data), *extra,
    ]  # fmt: skip


@contextmanager
def launched(cmd: list[str], log: Path):
    """A process group of its own, killed whole on the way out: no test leaves workers behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            try:  # workers that outlived their agent
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_torchrun(cmd: list[str], log: Path, timeout: float = 240) -> None:
    with launched(cmd, log) as proc:
        rc = proc.wait(timeout=timeout)
    assert rc == 0, f"torchrun exited {rc}:\n{log.read_text()[-4000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step (metrics.jsonl writes NaN as "nan")."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: float(r["train_loss"]) for r in records if "train_loss" in r}


def assert_same(a: dict, b: dict) -> None:
    """Bit for bit (NaN equal to NaN)."""
    assert {k: repr(v) for k, v in a.items()} == {k: repr(v) for k, v in b.items()}


def assert_close(a: dict, b: dict, tol: float = 2e-6) -> None:
    assert list(a) == list(b)
    assert list(a.values()) == pytest.approx(list(b.values()), abs=tol, rel=0, nan_ok=True)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def assert_weights_close(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def final(run_dir: Path) -> Path:
    return ck.step_dir(run_dir / "checkpoints", STEPS)


def launches(root: Path, data: Path) -> dict[str, list[list[str]]]:
    """The 2-rank jobs: one per mode on one node, and a DDP job across two loopback "nodes"
    (two torchrun agents with one worker each, meeting at a c10d rendezvous)."""
    jobs = {
        mode: [torchrun_cmd(root / mode, data, *TWO_RANKS, "--parallel.mode", mode)]
        for mode in ("ddp", "fsdp", "zero1")
    }
    port = free_port()
    launcher = (
        "--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=stalwart-{port}",
    )  # fmt: skip
    node = torchrun_cmd(
        root / "nodes", data, *TWO_RANKS, "--parallel.mode", "ddp", nproc=1, launcher=launcher
    )
    jobs["nodes"] = [node, node]
    # stopped by a SIGTERM that reaches rank 1 alone (see `runs`); slow steps leave time for it
    slow = ["--debug.slow_data_ms", "300", "--ckpt.interval", "0"]
    jobs["term"] = [torchrun_cmd(root / "term", data, *TWO_RANKS, "--parallel.mode", "fsdp", *slow)]
    return jobs


def _terminate_rank1_after(step: int, run_dir: Path, agent, deadline: float) -> None:
    """SIGTERM to rank 1's worker (not to torchrun) once `run_dir` has logged `step`."""
    while agent.poll() is None and time.monotonic() < deadline:
        if max(losses(run_dir), default=0) >= step:
            workers = _workers(agent.pid)
            if 1 in workers:
                os.kill(workers[1], signal.SIGTERM)
                return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} never reached step {step}")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """One 1-process run (in this process) and the 2-rank jobs, launched side by side (much
    of a launch is waiting, not computing)."""
    root = tmp_path_factory.mktemp("dist")
    cfg = tiny_config(root / "one", tiny_data, *COMMON, *ONE_RANK)
    train(cfg, progress=False)
    out = {"one": root / "one", "data": tiny_data, "root": root}
    jobs = launches(root, tiny_data)
    with ExitStack() as stack:
        procs = {
            (name, i): stack.enter_context(launched(cmd, root / f"{name}{i}.log"))
            for name, cmds in jobs.items()
            for i, cmd in enumerate(cmds)
        }
        _terminate_rank1_after(3, root / "term", procs[("term", 0)], time.monotonic() + 240)
        rcs = {key: p.wait(timeout=300) for key, p in procs.items()}
    for (name, i), rc in rcs.items():
        log = (root / f"{name}{i}.log").read_text()
        # the stopped job's rank 1 exits 143 (128 + SIGTERM), and so torchrun fails
        assert rc == (1 if name == "term" else 0), f"{name}: torchrun exited {rc}:\n{log[-4000:]}"
        out[name] = root / name
    return out


def _steps_once(run_dir: Path) -> None:
    """One metrics.jsonl, written by rank 0 alone: every step exactly once, step 3 skipped."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    assert [r["step"] for r in records if r["train_loss"] == "nan"] == [3]  # agreed on all ranks


def test_ddp_equals_one_process(runs):
    one, ddp = losses(runs["one"]), losses(runs["ddp"])
    _steps_once(runs["one"])
    _steps_once(runs["ddp"])
    assert_close(ddp, one)
    assert_weights_close(final(runs["ddp"]), final(runs["one"]), atol=1e-5)


@pytest.mark.parametrize("mode", ["fsdp", "zero1"])
def test_sharded_modes_equal_ddp(runs, mode):
    _steps_once(runs[mode])
    ddp, other = losses(runs["ddp"]), losses(runs[mode])
    if mode == "zero1":  # same all-reduced gradients, same per-element AdamW: the same bits
        assert_same(other, ddp)
    assert_close(other, ddp)
    assert_weights_close(final(runs[mode]), final(runs["ddp"]), atol=1e-5)
    vals = [r["val_loss"] for r in read_metrics(runs[mode] / "metrics.jsonl") if "val_loss" in r]
    ref = [r["val_loss"] for r in read_metrics(runs["ddp"] / "metrics.jsonl") if "val_loss" in r]
    assert vals == pytest.approx(ref, abs=2e-6, rel=0)


def test_fsdp_checkpoint_is_sharded_verified_and_usable(runs, tmp_path):
    path = final(runs["fsdp"])
    info = ck.verify(path)
    assert info.ok, info.problem
    shards = sorted(n for n in info.manifest["files"] if n.startswith("dcp/"))
    assert shards == ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"]
    _, state = ck.read_checkpoint(path)
    assert state["dist"] == {"mode": "fsdp", "world_size": 2, "global_batch": 16}
    assert {"rng_rank0", "rng_rank1"} <= state.keys()  # every rank's RNG state
    assert state["optimizer"]["sharded"]  # the moments live in dcp/, not in state.safetensors
    # the full weights are there for sample/export, loadable by safetensors alone
    assert "transformer.wte.weight" in weights(path)
    # a flipped byte in one rank's shard is caught by verify
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    blob = bytearray((bad / "dcp/__1_0.distcp").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "dcp/__1_0.distcp").write_bytes(bytes(blob))
    assert not ck.verify(bad).ok and "__1_0.distcp" in ck.verify(bad).problem


def _resume_copy(src: Path, dst: Path, step: int) -> Path:
    """A run dir holding only `src`'s checkpoint of `step` and its records up to it."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck.step_dir(src / "checkpoints", step), ck.step_dir(dst / "checkpoints", step))
    keep = [r for r in read_metrics(src / "metrics.jsonl") if r.get("step", 0) <= step]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return dst


def test_fsdp_save_on_2_resume_on_1(runs, tmp_path):
    """Saved by 2 FSDP ranks, resumed by one ordinary process: resharded, same global batch."""
    run = _resume_copy(runs["fsdp"], tmp_path / "r1", 5)
    train(tiny_config(run, runs["data"], *COMMON, *ONE_RANK), progress=False)
    resumed, ref = losses(run), losses(runs["fsdp"])
    assert_close(resumed, ref)
    assert_weights_close(final(run), final(runs["fsdp"]), atol=1e-5)
    event = next(r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "resume")
    notes = " | ".join(event["changes"])
    assert "fsdp on 2 rank(s) -> none on 1" in notes
    assert "data order: unchanged" in notes and "RNG:" in notes


def _workers(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid:
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(p.name)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")
def test_killed_worker_restarts_from_checkpoint_and_matches(runs, tmp_path):
    """SIGKILL rank 1 of a 2-rank FSDP run after its step-5 checkpoint: torchrun restarts the
    group, which resumes from that sharded checkpoint on 2 ranks: the same losses, bit for bit."""
    run = tmp_path / "killed"
    cmd = torchrun_cmd(
        run, runs["data"], *TWO_RANKS, "--parallel.mode", "fsdp",
        "--debug.slow_data_ms", "300", launcher=("--standalone", "--max-restarts=1"),
    )  # fmt: skip
    with launched(cmd, tmp_path / "killed.log") as proc:
        deadline = time.monotonic() + 180
        killed = False
        while proc.poll() is None and time.monotonic() < deadline:
            if not killed and max(losses(run), default=0) >= 6:
                workers = _workers(proc.pid)
                if 1 in workers:
                    os.kill(workers[1], signal.SIGKILL)
                    killed = True
            time.sleep(0.05)
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    log = (tmp_path / "killed.log").read_text()
    assert killed and rc == 0, log[-4000:]
    records = read_metrics(run / "metrics.jsonl")
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [Path(r["from"]).name for r in resumes] == ["step_00000005"]
    assert_same(losses(run), losses(runs["fsdp"]))  # same world size: bit-exact
    assert_weights_close(final(run), final(runs["fsdp"]), atol=0)


def test_two_nodes_on_loopback_train_together(runs):
    """Two torchrun agents (one worker each) met at a c10d rendezvous on 127.0.0.1 and trained
    one 2-rank job: one metrics.jsonl, and the very losses of the 2-rank job on one node."""
    _steps_once(runs["nodes"])
    assert_same(losses(runs["nodes"]), losses(runs["ddp"]))


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(runs):
    """Only rank 1 got the signal; rank 0 learnt of it at the step's all-reduce: both stopped
    after the same step, which was saved (one checkpoint, verified) and recorded by rank 0."""
    records = read_metrics(runs["term"] / "metrics.jsonl")
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert len(stopped) == 1
    step = stopped[0]["step"]
    assert 3 <= step < STEPS and max(losses(runs["term"])) == step
    saved = ck.step_dir(runs["term"] / "checkpoints", step)
    assert ck.verify(saved).ok
    assert [p.name for p in ck.step_dirs(runs["term"] / "checkpoints")] == [saved.name]


COLLECTIVES = """
from stalwart import parallel
from stalwart.config import ParallelConfig

ctx = parallel.init(ParallelConfig(mode="ddp"), "cpu")
late = parallel.any_rank(ctx.rank == 1, ctx)  # only rank 1's clock says a save is due
never = parallel.any_rank(False, ctx)
parallel.barrier(ctx)
print(f"rank {ctx.rank}: {late} {never}", flush=True)
parallel.shutdown(ctx)
"""


def test_every_rank_agrees_when_any_rank_says_a_timed_save_is_due(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script)]  # fmt: skip
    run_torchrun(cmd, tmp_path / "collectives.log", timeout=120)
    out = (tmp_path / "collectives.log").read_text()
    assert "rank 0: True False" in out and "rank 1: True False" in out, out[-2000:]
