"""What the production features cost in tokens/s: health checks, metrics, checkpoints.

    .venv/bin/python benchmarks/production_overhead.py [--repeats 3] [--config F] [--window N]

Real `train()` runs of the config, two kinds, interleaved (on, off, on, off, ...) so that load
from other processes hits both alike:

  on:  the config as it is: health checks on, a metrics record and progress line every
       `train.log_interval` steps, a checkpoint every `ckpt.interval` steps (tiny-cpu: 200)
  off: health checks off, one metrics record per window, no checkpoint inside the window

Both run `warmup + window + 1` steps with evaluation off; the window is `ckpt.interval` steps
(so an "on" window holds exactly one checkpoint, at its default frequency) and is timed from
the `after_step` hook of step `warmup` to that of step `warmup + window`: everything the loop
does in between, checkpoint writes included, is in it. Reported: the median over repeats of
tokens/s per kind and the on/off ratio, by wall clock and by process CPU time (the latter is
robust to being descheduled by a busy neighbour, but blind to waiting on the disk).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from stalwart.config import load_config
from stalwart.hardware import device_name
from stalwart.train import train

ROOT = Path(__file__).resolve().parents[1]


def timed_run(cfg_file, overrides, warmup, window, on: bool) -> dict:
    marks = {}

    def after_step(step, record):
        if step in (warmup, warmup + window):
            marks[step] = (time.perf_counter(), time.process_time())

    with tempfile.TemporaryDirectory(prefix="stalwart-overhead-") as d:
        flags = [
            *overrides,
            *("--run.dir", d, "--train.max_steps", str(warmup + window + 1)),
            *("--train.eval_interval", "0", "--train.eval_batches", "1"),
            *("--train.sample_tokens", "0", "--schedule.warmup_steps", "1"),
        ]
        if not on:
            flags += ["--health.enabled", "false", "--train.log_interval", str(window)]
            flags += ["--ckpt.interval", "0", "--ckpt.interval_minutes", "0"]
        cfg = load_config(cfg_file, flags)
        tokens_per_step = cfg.model.block_size * int(cfg.train.micro_batch) * cfg.train.grad_accum
        with contextlib.redirect_stderr(io.StringIO()):  # the progress lines, as a run prints
            train(cfg, progress=True, hooks={"after_step": after_step})
        saves = sorted(p.name for p in Path(d, "checkpoints").glob("step_*"))
    (w0, c0), (w1, c1) = marks[warmup], marks[warmup + window]
    tokens = window * tokens_per_step
    return {"wall_tps": tokens / (w1 - w0), "cpu_tps": tokens / (c1 - c0), "saves": saves}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tiny-cpu.toml"))
    ap.add_argument("--data", default=str(ROOT / "data/stdlib-byte"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--window", type=int, default=0, help="timed steps (0 = ckpt.interval)")
    args, extra = ap.parse_known_args()  # the rest: --section.field VALUE, for both kinds
    overrides = ["--data.dir", args.data, *extra]
    cfg = load_config(args.config, overrides)
    window = args.window or cfg.ckpt.interval
    if not cfg.ckpt.interval or window < cfg.ckpt.interval:
        sys.exit("error: the window must hold a checkpoint: --window >= ckpt.interval > 0")
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(args.repeats):
        for kind in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            r = timed_run(args.config, overrides, args.warmup, window, on=kind == "on")
            runs[kind].append(r)
            print(
                f"[{rep + 1}/{args.repeats}] {kind:>3}: {r['wall_tps']:,.0f} tok/s wall, "
                f"{r['cpu_tps']:,.0f} tok/s per CPU-second, checkpoints {r['saves']}, "
                f"load {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
            )
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall_tps", "cpu_tps")}
        for k, v in runs.items()
    }
    print(
        f"\nmachine: {device_name(torch.device('cpu'))}; {args.config} "
        f"{' '.join(extra)}; window {window} steps after {args.warmup} warm-up, "
        f"checkpoint every {cfg.ckpt.interval} steps (on); {args.repeats} repeats interleaved; "
        f"load average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print("| measure | features off (tok/s) | features on (tok/s) | on / off | cost |")
    print("|---|---|---|---|---|")
    for m, label in (("wall_tps", "wall clock"), ("cpu_tps", "process CPU time")):
        ratio = med["on"][m] / med["off"][m]
        print(
            f"| {label} (median) | {med['off'][m]:,.0f} | {med['on'][m]:,.0f} "
            f"| {ratio:.4f} | {100 * (1 - ratio):+.2f}% |"
        )


if __name__ == "__main__":
    main()
