"""stalwart against nanoGPT on nanoGPT's own model, alternated in one run (issue: "faster than
nanoGPT on its own model").

The shape is nanoGPT's small CPU recipe: 4 layers, 4 heads, 256 wide, 256 context, micro-batch
16, fp32, no compile, dropout 0, biases on (GPT-2's model, which is stalwart's default), on the
same bytes (a slice of the Python standard library's source). Each round runs nanoGPT's
unmodified `train.py` (iterations timed by its own `time Xms` lines) and `stalwart bench` with
stalwart's defaults (steps timed by the loop's records), one after the other; the ratio of the
median step times of each round is the figure, and the median over rounds is reported.

    .venv/bin/python benchmarks/vs_nanogpt.py --nanogpt DIR [--rounds 5] [--steps 20] [--json]

DIR is a checkout of karpathy/nanoGPT (its train.py, model.py, configurator.py). Nothing of
nanoGPT is copied into stalwart; it runs as its own process from DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}
MICRO = 16
CORPUS_BYTES = 8_000_000


def corpus(out: Path) -> Path:
    """The same text for both: stdlib sources in a fixed order, one file per document, up to
    CORPUS_BYTES (stalwart holds documents out whole; nanoGPT cuts the concatenation 90/10)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    d = out / "corpus"
    d.mkdir()
    n = 0
    for i, f in enumerate(sorted(stdlib.rglob("*.py"))):
        if "test" in f.parts or "site-packages" in f.parts:
            continue
        data = f.read_bytes()
        (d / f"{i:05d}.py.txt").write_bytes(data)
        n += len(data)
        if n >= CORPUS_BYTES:
            break
    return d


def nanogpt_data(text: Path, out: Path) -> Path:
    """nanoGPT's dataset layout: data/NAME/{train,val}.bin (uint16) + meta.pkl (vocab size)."""
    d = out / "data" / "bytes"
    d.mkdir(parents=True)
    raw = b"".join(f.read_bytes() for f in sorted(text.iterdir()))
    ids = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
    cut = int(0.9 * len(ids))
    ids[:cut].tofile(d / "train.bin")
    ids[cut:].tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 256}, f)
    return d


def run_nanogpt(nanogpt: Path, work: Path, steps: int, warmup: int) -> float:
    """Median seconds per iteration of nanoGPT's train.py after `warmup` iterations."""
    flags = {
        **SHAPE, "batch_size": MICRO, "gradient_accumulation_steps": 1, "dropout": 0.0,
        "bias": True, "device": "cpu", "dtype": "float32", "compile": False,
        "dataset": "bytes", "max_iters": steps + warmup, "lr_decay_iters": steps + warmup,
        "warmup_iters": 2, "eval_interval": 10**6, "eval_iters": 1, "log_interval": 1,
        "always_save_checkpoint": False, "out_dir": str(work / "out"),
    }  # fmt: skip
    args = [f"--{k}={v}" for k, v in flags.items()]
    for name in ("train.py", "model.py", "configurator.py"):  # it reads them from its cwd
        shutil.copy(nanogpt / name, work / name)
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=work, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{out.stderr[-2000:]}")
    ms = [float(t) for _, t in re.findall(r"^iter (\d+): .*time ([\d.]+)ms", out.stdout, re.M)]
    return statistics.median(ms[warmup:]) / 1000


def run_stalwart(data: Path, steps: int, warmup: int, extra: list[str]) -> float:
    """Median seconds per step of `stalwart bench` (stalwart's defaults on this shape)."""
    flags = [f"--model.{k} {v}" for k, v in SHAPE.items()]
    cmd = [sys.executable, "-m", "stalwart", "bench", *" ".join(flags).split(),
           "--train.micro_batch", str(MICRO), "--train.precision", "fp32",
           "--data.dir", str(data), "--steps", str(steps), "--warmup", str(warmup),
           "--json", *extra]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"stalwart bench failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["step_time_median_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a karpathy/nanoGPT checkout")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stalwart-flags", default="", help="extra flags for stalwart bench")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vs-nanogpt-") as tmp:
        work = Path(tmp)
        text = corpus(work)
        nanogpt_data(text, work)
        data = work / "stalwart-data"
        subprocess.run(
            [sys.executable, "-m", "stalwart", "prepare", str(text), "--tokenizer", "byte",
             "--out", str(data)], check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip
        rounds = []
        for r in range(args.rounds):
            n = run_nanogpt(args.nanogpt.resolve(), work, args.steps, args.warmup)
            s = run_stalwart(data, args.steps, args.warmup, args.stalwart_flags.split())
            rounds.append({"nanogpt_s": n, "stalwart_s": s, "speedup": n / s})
            print(f"round {r + 1}: nanoGPT {n * 1000:.1f} ms/step, stalwart {s * 1000:.1f} "
                  f"ms/step: stalwart {n / s:.3f}x", file=sys.stderr, flush=True)  # fmt: skip
    tokens = MICRO * SHAPE["block_size"]
    summary = {
        "speedup_median": statistics.median(r["speedup"] for r in rounds),
        "nanogpt_tokens_per_sec": tokens / statistics.median(r["nanogpt_s"] for r in rounds),
        "stalwart_tokens_per_sec": tokens / statistics.median(r["stalwart_s"] for r in rounds),
        "rounds": rounds,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(summary, indent=1) if args.json else
          f"stalwart / nanoGPT tokens/s: {summary['speedup_median']:.3f}x (median of "
          f"{len(rounds)} rounds; {summary['stalwart_tokens_per_sec']:.0f} vs "
          f"{summary['nanogpt_tokens_per_sec']:.0f} tokens/s)")  # fmt: skip


if __name__ == "__main__":
    main()
