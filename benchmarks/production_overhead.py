"""What the production features cost in tokens/s: health checks, metrics, checkpoints.

    .venv/bin/python benchmarks/production_overhead.py [--repeats 3] [--window N]
        [--config configs/tiny-cpu.toml] [--section.field VALUE ...] [--replay LOG]

Real `train()` runs of the config, three kinds, interleaved (the order rotates every repeat) so
that load from other processes hits all kinds alike:

  off      health checks off, one metrics record per window, no checkpoint in the window
  monitor  health checks on, a metrics record + progress line every `train.log_interval` steps
  all      as `monitor`, plus one checkpoint in the window (full state, fsync'd, rotated)

Every run does `warmup + window + 1` steps with evaluation off, and the window is timed from the
`AfterStep` callback of step `warmup` to that of step `warmup + window`: everything the loop does
in between, the checkpoint write included, is in it.

The default window is the config's `ckpt.interval` (tiny-cpu: 100 steps), so `all` is exactly
the production setting and `all / off` is the answer, measured directly. A shorter `--window N`
(cheaper on a busy machine) checkpoints once per N steps instead; the checkpoint's cost per save
(`all` - `monitor`) is then charged at the config's interval: tokens/s lost = 1 - off step time
/ (monitor step time + save seconds / interval). Reported: medians over repeats and the best run of
each kind (noise from other processes only adds time), by wall clock and by process CPU time
(robust to being descheduled by a busy neighbour, but blind to waiting on the disk).
`--replay LOG` reports again from the per-run lines an earlier invocation printed on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from stalwart.config import load_config
from stalwart.hardware import device_name
from stalwart.train import AfterStep, train

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("off", "monitor", "all")


def kind_flags(kind: str, window: int) -> list[str]:
    if kind == "off":
        return ["--health.enabled", "false", "--train.log_interval", str(window)]
    return ["--ckpt.interval", str(window) if kind == "all" else "0"]


def timed_run(cfg_file: str, overrides: list[str], warmup: int, window: int, kind: str) -> dict:
    marks, records = {}, []

    def after_step(step, record):
        if step in (warmup, warmup + window):
            marks[step] = (time.perf_counter(), time.process_time())
        if warmup < step <= warmup + window and "step_time_s" in record:
            records.append(record)

    with tempfile.TemporaryDirectory(prefix="stalwart-overhead-") as d:
        flags = [
            *overrides,
            *("--run.dir", d, "--train.max_steps", str(warmup + window + 1)),
            *("--train.eval_interval", "0", "--train.eval_batches", "1"),
            *("--train.sample_tokens", "0", "--schedule.warmup_steps", "1"),
            *("--ckpt.interval", "0", "--ckpt.interval_minutes", "0"),
            *kind_flags(kind, window),
        ]
        cfg = load_config(cfg_file, flags)
        with contextlib.redirect_stderr(io.StringIO()):  # the progress lines, as a run prints
            train(cfg, progress=True, callbacks=[AfterStep(after_step)])
        saves = len(list(Path(d, "checkpoints").glob("step_*")))
    (w0, c0), (w1, c1) = marks[warmup], marks[warmup + window]
    out = {"wall": w1 - w0, "cpu": c1 - c0, "saves": saves}
    if kind != "off":  # a record per step: the loop's own account of where the time went
        out["overhead_s"] = statistics.median(r["overhead_s"] for r in records)
        out["step_s"] = statistics.median(r["step_time_s"] for r in records)
        # wall time the step timer left out as not training: the checkpoint write
        out["skipped_s"] = (w1 - w0) - sum(r["step_time_s"] for r in records)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tiny-cpu.toml"))
    ap.add_argument("--data", default=str(ROOT / "data/stdlib-byte"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--window", type=int, default=0, help="timed steps (0 = ckpt.interval)")
    ap.add_argument(
        "--replay", metavar="LOG", help="report the runs of an earlier invocation's stderr log"
    )
    args, extra = ap.parse_known_args()  # the rest: --section.field VALUE, for every kind
    overrides = ["--data.dir", args.data, *extra]
    cfg = load_config(args.config, overrides)
    interval = cfg.ckpt.interval
    window = args.window or interval
    if not interval:
        sys.exit("error: the config checkpoints only at the end (ckpt.interval 0): nothing to cost")
    load0 = os.getloadavg()
    if args.replay:
        runs = replay(args.replay)
        args.repeats = len(runs["off"])
        report(args, extra, cfg, window, interval, runs, load0)
        return
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for rep in range(args.repeats):
        for kind in KINDS[rep % 3 :] + KINDS[: rep % 3]:
            r = timed_run(args.config, overrides, args.warmup, window, kind)
            runs[kind].append(r)
            print(
                f"[{rep + 1}/{args.repeats}] {kind:>7}: {r['wall']:.2f} s wall, {r['cpu']:.2f} s "
                f"CPU for {window} steps, {r['saves']} step_* dirs at the end, "
                f"load {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
            )
    report(args, extra, cfg, window, interval, runs, load0)


def replay(path: str) -> dict[str, list[dict]]:
    """The runs of an earlier invocation, from the "[i/n] kind: W s wall, C s CPU" lines it
    printed on stderr (saved with 2> FILE)."""
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for m in re.finditer(r"\] +(\w+): ([\d.]+) s wall, ([\d.]+) s CPU", Path(path).read_text()):
        runs[m[1]].append({"wall": float(m[2]), "cpu": float(m[3])})
    return runs


def report(args, extra, cfg, window, interval, runs, load0) -> None:
    tokens = window * cfg.model.block_size * int(cfg.train.micro_batch) * cfg.train.grad_accum
    print(
        f"\nmachine: {device_name(torch.device('cpu'))}; config {args.config} {' '.join(extra)}; "
        f"window {window} steps after {args.warmup} warm-up; checkpoint interval {interval}; "
        f"{args.repeats} repeats, interleaved; load average {load0[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print(
        "| clock | off: tok/s | monitor: tok/s | all: tok/s | tokens/s lost to health + metrics "
        f"| one checkpoint | **tokens/s lost, all features, a checkpoint every {interval} steps** |"
    )
    print("|---|---|---|---|---|---|---|")
    # the median, and the best of the repeats: noise from other processes only ever adds time,
    # so the fastest run of each kind is the least disturbed estimate of what it costs
    for clock, label, stat in (
        ("wall", "wall, median", statistics.median),
        ("wall", "wall, best run of each kind", min),
        ("cpu", "process CPU, median", statistics.median),
        ("cpu", "process CPU, best run", min),
    ):
        t = {k: stat(r[clock] for r in v) for k, v in runs.items()}
        s_off, s_mon = t["off"] / window, t["monitor"] / window  # seconds per step
        save_s = t["all"] - t["monitor"]  # one checkpoint
        production = s_mon + save_s / interval  # per step, one save every `interval` steps
        direct = (
            f" (directly: {100 * (1 - t['off'] / t['all']):.2f}%)" if window == interval else ""
        )
        print(
            f"| {label} | {tokens / t['off']:,.0f} | {tokens / t['monitor']:,.0f} "
            f"| {tokens / t['all']:,.0f} | {100 * (1 - s_off / s_mon):.2f}% "
            f"| {save_s:.3f} s | **{100 * (1 - s_off / production):.2f}%**{direct} |"
        )
    if any("step_s" not in r for r in runs["monitor"]):
        return  # --replay: the per-run lines carry no records
    # the same from the loop's own records, which noise from other processes barely touches:
    # per step, the time outside data/fwd+bwd/optimizer (logging, progress, the trend detectors,
    # LR, zero_grad: an upper bound of what monitoring adds) and the checkpoint write
    on = runs["monitor"] + runs["all"]
    over = statistics.median(r["overhead_s"] for r in on)
    step = statistics.median(r["step_s"] for r in on)
    save = statistics.median(r["skipped_s"] for r in runs["all"])
    print(
        f"\nFrom the records: loop overhead {1e3 * over:.2f} ms of a {step:.3f} s step "
        f"({100 * over / step:.2f}%); one checkpoint write {save:.3f} s, every {interval} steps "
        f"= {100 * save / (interval * step):.2f}%; together {100 * (over + save / interval) / step:.2f}%"
        " of step time (upper bound: overhead_s also holds LR and zero_grad, which `off` has too)."
    )


if __name__ == "__main__":
    main()
