"""MFU of `stalwart bench` on this machine, for a few model shapes, repeated.

    .venv/bin/python benchmarks/mfu.py [--repeats 3] [--steps 10] [--warmup 3] [--threads N]

Each repeat re-calibrates the CPU's fp32 peak first (`cpu_peak_flops(refresh=True)` keeps the
best figure ever measured on this machine: a busy neighbour can only make a calibration slower,
which would flatter MFU), then runs the bench of every shape, interleaved, so that load from
other processes hits all shapes alike. Per shape it prints the median and the best over repeats
of tokens/s and MFU (MFU from the mean step time of each bench, as in a real run), and the load
average before and after. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from stalwart.bench import run_bench
from stalwart.config import load_config
from stalwart.hardware import cpu_peak_flops, device_name

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "tiny-cpu (as configured)": [],
    "4L x 256, T=256, micro 16": (
        "--model.n_layer 4 --model.n_head 4 --model.n_embd 256 --model.block_size 256 "
        "--train.micro_batch 16 --train.grad_accum 1"
    ).split(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tiny-cpu.toml"))
    ap.add_argument("--data", default=str(ROOT / "data/stdlib-byte"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name in SHAPES}
    peaks = []
    for rep in range(args.repeats):
        peaks.append(cpu_peak_flops(refresh=True))
        for name, flags in SHAPES.items():
            overrides = ["--data.dir", args.data, "--train.precision", "fp32", *flags]
            if args.threads:
                overrides += ["--run.threads", str(args.threads)]
            cfg = load_config(args.config, overrides)
            r = run_bench(cfg, args.steps, args.warmup, memory=False)
            results[name].append(r)
            print(
                f"[{rep + 1}/{args.repeats}] {name}: {r['tokens_per_sec']:,.0f} tok/s, "
                f"MFU {100 * r['mfu']:.1f}%, step {r['step_time_s']:.3f} s "
                f"(median {r['step_time_median_s']:.3f}), load {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
            )
    peak = cpu_peak_flops()
    print(
        f"\nmachine: {device_name(torch.device('cpu'))}, calibrated fp32 peak "
        f"{peak / 1e9:.1f} GFLOP/s (this run's calibrations: "
        + ", ".join(f"{p / 1e9:.1f}" for p in peaks)
        + f"); load average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(
        "| shape | tokens/step | tokens/s (median / best) | MFU (median / best) | fwd+bwd share |"
    )
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        tps = [r["tokens_per_sec"] for r in rs]
        mfu = [r["tokens_per_sec"] * r["flops_per_token"] / peak for r in rs]  # today's peak
        share = statistics.median(r["fwd_bwd_s"] / r["step_time_s"] for r in rs)
        m = rs[0]["model"]
        print(
            f"| {name}: {m['n_layer']}L x {m['n_embd']}, T={m['block_size']}, "
            f"micro {m['micro_batch']} | {rs[0]['tokens_per_step']:,} "
            f"| {statistics.median(tps):,.0f} / {max(tps):,.0f} "
            f"| {100 * statistics.median(mfu):.1f}% / {100 * max(mfu):.1f}% "
            f"| {100 * share:.0f}% |"
        )


if __name__ == "__main__":
    main()
