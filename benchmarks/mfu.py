"""MFU of `stalwart bench` on this machine, for a few model shapes, repeated.

    .venv/bin/python benchmarks/mfu.py [--repeats 3] [--steps 10] [--warmup 3] [--threads N]

Each repeat re-calibrates the CPU's fp32 peak first (`cpu_peak_flops(refresh=True)` keeps the
best figure ever measured on this machine: a busy neighbour can only make a calibration slower,
which would flatter MFU), then runs the bench of every shape, interleaved, so that load from
other processes hits all shapes alike. Per shape it prints the median and the best over repeats
of tokens/s and MFU (MFU from the mean step time of each bench, as in a real run), and the load
average before and after. Prints a markdown table for BENCHMARKS.md.

    .venv/bin/python benchmarks/mfu.py --parts

Where a step's time goes, op by op, on ONE thread timed with `time.thread_time` (the CPU time
of this thread: blind to other processes, so it is stable on a busy machine): the weight
matmuls (forward and both backward matmuls at the model's shapes), attention (SDPA forward +
backward), GELU and layer norm (forward + backward; for GELU both torch's tanh kernel and the
fused one of `train.fused_gelu`, the config's counted in the sum), against the calibrated
one-thread peak. It shows the ceiling MFU the non-matmul work leaves, whatever the loop does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stalwart.bench import run_bench
from stalwart.config import load_config
from stalwart.hardware import cpu_peak_flops, device_name
from stalwart.model.kernels import gelu_tanh

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "tiny-cpu (as configured)": [],
    "the same, as flags": (
        "--model.n_layer 2 --model.n_head 4 --model.n_embd 384 --model.block_size 256 "
        "--train.micro_batch 16 --train.grad_accum 1 --train.fused_gelu true"
    ).split(),
}


def _best_cpu_time(fn, n: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def parts(cfg) -> None:
    """One-thread CPU time of each kind of work in a training step of `cfg`'s shape."""
    torch.set_num_threads(1)
    m = cfg.model
    B, T, C, L, V = int(cfg.train.micro_batch), m.block_size, m.n_embd, m.n_layer, 256
    V = m.vocab_size or V
    n = B * T
    peak = cpu_peak_flops()

    def linear(k, out):  # forward, grad of input, grad of weight
        x, w, g = torch.randn(n, k), torch.randn(k, out), torch.randn(n, out)
        return lambda: (x @ w, g @ w.T, x.T @ g)

    rows = []
    for name, k, out, count in [
        ("qkv", C, 3 * C, L),
        ("attn proj", C, C, L),
        ("mlp up", C, 4 * C, L),
        ("mlp down", 4 * C, C, L),
        ("head", C, V, 1),
    ]:
        t = _best_cpu_time(linear(k, out)) * count
        rows.append((f"matmul {name}", 6 * n * k * out * count, t))
    q, k, v = (torch.randn(B, m.n_head, T, C // m.n_head, requires_grad=True) for _ in range(3))

    def attn():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(torch.ones_like(y))

    rows.append(("attention (SDPA)", 12 * L * T * C * n, _best_cpu_time(attn) * L))
    g = torch.randn(n, 4 * C, requires_grad=True)

    def gelu(fused):
        y = gelu_tanh(g, fused=fused)
        y.backward(torch.ones_like(y))

    # the config's GELU counts in the sum; the other one is shown beside it
    fused = cfg.train.fused_gelu
    t_torch, t_fused = (_best_cpu_time(lambda f=f: gelu(f)) * L for f in (False, True))
    rows.append(
        (
            "GELU (fused, train.fused_gelu)" if fused else "GELU (torch tanh)",
            0,
            t_fused if fused else t_torch,
        )
    )
    ln, xl = torch.nn.LayerNorm(C), torch.randn(n, C, requires_grad=True)

    def norm():
        y = ln(xl)
        y.backward(torch.ones_like(y))

    rows.append(("layer norms", 0, _best_cpu_time(norm) * (2 * L + 1)))
    total_t = sum(t for _, _, t in rows)
    total_f = sum(f for _, f, _ in rows)
    print(f"one thread, calibrated peak {peak / 1e9:.1f} GFLOP/s; micro-batch of {n:,} tokens\n")
    print("| work | GFLOP (counted) | CPU s | share | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|")
    for name, f, t in rows:
        rate = f"{f / t / 1e9:.1f} | {100 * f / t / peak:.0f}%" if f else "- | -"
        print(f"| {name} | {f / 1e9:.2f} | {t:.3f} | {100 * t / total_t:.1f}% | {rate} |")
    other = ("GELU (torch tanh)", t_torch) if fused else ("GELU (fused)", t_fused)
    print(f"| (not in the sum: {other[0]}) | 0 | {other[1]:.3f} | - | - | - |")
    print(
        f"| **sum** | {total_f / 1e9:.2f} | {total_t:.3f} | 100% | {total_f / total_t / 1e9:.1f} "
        f"| **{100 * total_f / total_t / peak:.1f}%** (MFU ceiling before optimizer, adds, loss) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tiny-cpu.toml"))
    ap.add_argument("--data", default=str(ROOT / "data/stdlib-byte"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--parts", action="store_true", help="one-thread op breakdown instead")
    ap.add_argument(
        "--shape",
        action="append",
        default=[],
        help='another shape as config flags, e.g. "--model.n_embd 512" (repeatable)',
    )
    args = ap.parse_args()
    for flags in args.shape:
        SHAPES[flags] = flags.split()
    if args.parts:
        for name, flags in SHAPES.items():
            print(f"\n### {name}\n")
            parts(load_config(args.config, ["--data.dir", args.data, *flags]))
        return
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
                f"MFU {100 * r['mfu']:.1f}% (by CPU time {100 * r['mfu_by_cpu_time']:.1f}%), "
                f"step {r['step_time_s']:.3f} s "
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
        "| shape | tokens/step | tokens/s (median / best) | MFU (median / best) "
        "| MFU by CPU time (median) | fwd+bwd share |"
    )
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        tps = [r["tokens_per_sec"] for r in rs]
        mfu = [r["tokens_per_sec"] * r["flops_per_token"] / peak for r in rs]  # today's peak
        share = statistics.median(r["fwd_bwd_s"] / r["step_time_s"] for r in rs)
        by_cpu = statistics.median(r["mfu_by_cpu_time"] for r in rs)
        m = rs[0]["model"]
        print(
            f"| {name}: {m['n_layer']}L x {m['n_embd']}, T={m['block_size']}, "
            f"micro {m['micro_batch']} | {rs[0]['tokens_per_step']:,} "
            f"| {statistics.median(tps):,.0f} / {max(tps):,.0f} "
            f"| {100 * statistics.median(mfu):.1f}% / {100 * max(mfu):.1f}% "
            f"| {100 * by_cpu:.1f}% "
            f"| {100 * share:.0f}% |"
        )


if __name__ == "__main__":
    main()
