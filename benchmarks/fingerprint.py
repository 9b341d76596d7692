"""Numbers that a refactor must not move: run a fixed set of real training commands and record
every loss, grad norm, val loss and event they write, so that two source trees can be compared
bit for bit (STYLE.md: "a refactor changes no numbers").

    python benchmarks/fingerprint.py --out before.json [--main]   # at the old commit
    python benchmarks/fingerprint.py --out after.json  [--main]   # at the new one
    python benchmarks/fingerprint.py --compare before.json after.json

The runs use whatever `stalwart` the interpreter imports (PYTHONPATH=OTHER/src runs another
checkout's source with this venv). Each run is a real CLI subprocess with one thread; the
SIGKILL run kills a real process mid-run and resumes it with the same command. `--main` adds the
main job (`configs/tiny-cpu.toml` on the byte-level stdlib corpus, ~5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["textwrap.py", "json", "string.py", "bisect.py", "heapq.py", "shlex.py"]
TINY = (
    "--model.n_layer 2 --model.n_head 2 --model.n_embd 64 --model.block_size 32 "
    "--train.micro_batch 8 --train.max_steps 30 --schedule.warmup_steps 5 "
    "--train.eval_interval 10 --train.eval_batches 2 --optim.lr 3e-3 --ckpt.interval 10 "
    "--train.sample_tokens 0 --run.threads 1 --train.dashboard false"
).split()

# name -> extra flags on top of TINY
RUNS = {
    "plain": [],
    "accum": ["--train.micro_batch", "2", "--train.grad_accum", "4"],
    "fp16": ["--train.precision", "fp16", "--train.max_steps", "12"],
    "bf16": ["--train.precision", "bf16", "--train.max_steps", "12"],
    "ckpt-full": ["--model.activation_checkpointing", "full"],
    "muon": ["--optim.name", "muon"],
    "reference-adamw": ["--optim.impl", "reference"],
    "sgd-momentum": ["--optim.name", "momentum", "--optim.lr", "0.1"],
    "nan-rollback": ["--debug.inject_nan_at_step", "15"],
    "spike-skip": ["--debug.inject_spike_at_step", "17"],
    "async-ckpt": ["--ckpt.async_save", "true"],
    "fused-gelu": ["--train.fused_gelu", "true", "--train.max_steps", "12"],
}
DIST = {"ddp": "ddp", "fsdp": "fsdp", "zero1": "zero1"}


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stalwart(*args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stalwart", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), **kw)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out


def records(run_dir: Path) -> dict:
    """Everything numeric that the loop decides (not timings)."""
    steps, events = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" in r:
            events.append([r["event"], r.get("step")])
        else:
            keep = ("step", "train_loss", "grad_norm", "lr", "clipped", "tokens", "val_loss")
            steps.append(
                {k: r[k] for k in keep if k in r} | ({"skipped": 1} if "skipped" in r else {})
            )
    return {"steps": steps, "events": events}


def tiny_data(root: Path) -> Path:
    text = root / "text"
    text.mkdir()
    for name in SOURCES:
        src = STDLIB / name
        for f in sorted(src.rglob("*.py")) if src.is_dir() else [src]:
            (text / f"{name}_{f.name}.txt").write_text(f.read_text())
    out = root / "data"
    stalwart("prepare", text, "--tokenizer", "byte", "--out", out)
    return out


def kill_and_resume(root: Path, data: Path) -> dict:
    """SIGKILL a real run after step 14 is on disk, then rerun the same command to the end."""
    run = root / "killed"
    args = ["train", *TINY, "--data.dir", data, "--run.dir", run]
    args += ["--debug.pause_in_eval_s", "0.5"]  # a window after step 20's checkpoint
    proc = subprocess.Popen(
        [sys.executable, "-m", "stalwart", *map(str, args)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and '"step": 24' in metrics.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stalwart(*args)
    return records(run)


def torchrun(root: Path, data: Path, name: str, mode: str) -> dict:
    run = root / name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={port}", "--master-addr=127.0.0.1", "-m", "stalwart", "train",
           *TINY, "--train.micro_batch", "4", "--data.dir", str(data), "--run.dir", str(run),
           "--parallel.mode", mode]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if out.returncode != 0:
        raise SystemExit(f"torchrun {mode} failed:\n{out.stderr[-3000:]}")
    return records(run)


def main_job(root: Path) -> dict:
    data = root / "stdlib-byte"
    stalwart("prepare", "--tokenizer", "byte", "--out", data)
    run = root / "main"
    stalwart("train", "--config", ROOT / "configs/tiny-cpu.toml", "--data.dir", data,
             "--run.dir", run, "--train.dashboard", "false")  # fmt: skip
    meta = json.loads((data / "meta.json").read_text())
    return {**records(run), "data": {k: meta[k] for k in ("train_tokens", "val_tokens")}}


def fingerprint(include_main: bool) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = tiny_data(root)
        meta = json.loads((data / "meta.json").read_text())
        out["tiny-data"] = {k: meta[k] for k in ("train_tokens", "val_tokens", "vocab_size")}
        for name, extra in RUNS.items():
            run = root / name
            stalwart("train", *TINY, *extra, "--data.dir", data, "--run.dir", run)
            out[name] = records(run)
            print(f"  {name}: done", flush=True)
        out["sigkill-resume"] = kill_and_resume(root, data)
        for name, mode in DIST.items():
            out[f"2proc-{name}"] = torchrun(root, data, name, mode)
            print(f"  2proc-{name}: done", flush=True)
        if include_main:
            out["main-job"] = main_job(root)
    return out


def compare(a: dict, b: dict) -> int:
    bad = 0
    for name in sorted(set(a) | set(b)):
        if a.get(name) == b.get(name):
            print(f"identical  {name}")
        else:
            bad += 1
            print(f"DIFFERENT  {name}")
    print(f"{len(set(a) | set(b)) - bad} identical, {bad} different")
    return 1 if bad else 0


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--main", action="store_true", help="also the main job (~5 minutes)")
    p.add_argument("--compare", nargs=2, type=Path)
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(f.read_text()) for f in args.compare)
        raise SystemExit(compare(a, b))
    result = fingerprint(args.main)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli()
