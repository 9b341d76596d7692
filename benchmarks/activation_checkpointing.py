"""Activation checkpointing on vs off: peak memory and step time at micro-batch 16 and 64
(the lesson's exercise), for none / selective / full.

    .venv/bin/python benchmarks/activation_checkpointing.py [--micro 16,64]
        [--ckpt none,selective,full] [--repeats 7] [--threads 2] [--json]
        [--section.field VALUE ...]

Memory: one fresh process per (micro-batch, variant), started with MALLOC_MMAP_THRESHOLD_=65536
so that stalwart.memory.measure.PeakMemory is exact on CPU; it measures one training step after two
warm-up steps (benchmarks/memory_accuracy.py's harness), next to the planner's prediction.
Time: one process per micro-batch, *without* that malloc setting (it slows CPU steps), holding
every variant with the same weights and timing them round-robin (repeats x one step each,
after a warm-up step), so machine load hits all variants alike; the median and the best step
are reported, and the ratios to `none` are the figure to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_accuracy import SIZES, build, make_step  # noqa: E402


def time_child(
    overrides: list[str], micro: int, variants: list[str], repeats: int, threads: int
) -> dict:
    import torch

    torch.set_num_threads(threads)
    steps = {}
    for v in variants:
        cfg, model, opt, prec = build([*overrides, "--model.activation_checkpointing", v])
        steps[v] = make_step(cfg, model, opt, prec, micro)
        steps[v]()  # warm-up (and the optimizer state)
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    return {v: {"median": statistics.median(ts), "all": ts} for v, ts in times.items()}


def memory_of(overrides: list[str], micro: int, variant: str, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    args = [[*overrides, "--model.activation_checkpointing", variant], micro, threads]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_accuracy.py"), "--child",
           json.dumps(args)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_of(overrides, micro, variants, repeats, threads) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--time-child",
           json.dumps([overrides, micro, variants, repeats, threads])]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| micro-batch | checkpointing | peak memory (measured) | predicted | vs none "
        "| step time (median / best) | vs none (median / best) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["micro_batch"]: r for r in rows if r["checkpointing"] == "none"}
    for r in rows:
        b = base.get(r["micro_batch"], r)
        lines.append(
            f"| {r['micro_batch']} | {r['checkpointing']} | {r['measured_bytes'] / 2**20:.0f} MiB "
            f"| {r['predicted_bytes'] / 2**20:.0f} MiB "
            f"| {r['measured_bytes'] / b['measured_bytes']:.2f}x "
            f"| {r['step_time_s']:.2f} / {min(r['step_times_s']):.2f} s "
            f"| {r['step_time_s'] / b['step_time_s']:.2f}x / "
            f"{min(r['step_times_s']) / min(b['step_times_s']):.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--time-child", help=argparse.SUPPRESS)
    p.add_argument("--micro", default="16,64")
    p.add_argument("--ckpt", default="none,selective,full")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--time-only", action="store_true", help="skip the memory runs")
    a, rest = p.parse_known_args()
    if a.time_child:
        print(json.dumps(time_child(*json.loads(a.time_child))))
        return
    overrides = [*SIZES["default"], "--train.precision", "fp32", *rest]
    variants = a.ckpt.split(",")
    rows = []
    for micro in map(int, a.micro.split(",")):
        times = time_of(overrides, micro, variants, a.repeats, a.threads)
        for v in variants:
            r = {} if a.time_only else memory_of(overrides, micro, v, 1)
            r.update(
                micro_batch=micro,
                checkpointing=v,
                step_time_s=times[v]["median"],
                step_times_s=times[v]["all"],
            )
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2) if a.json else table(rows))


if __name__ == "__main__":
    main()
