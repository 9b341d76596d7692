"""The precision experiment: fp32 vs bf16 vs fp16 autocast, through `stalwart.bench`.

Each precision runs the same model and batch through the real loop (`run_bench`: warm-up
steps, then timed steps; the peak memory of one step measured in a fresh process). On a CPU
without AMX (this machine: AVX2 only) bf16/fp16 matmuls have no fast kernels, so 16-bit
autocast is *slower* there; on a GPU with tensor cores it is the other way round. The report
says which this run measured.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stalwart.bench import run_bench
from stalwart.config import with_overrides
from stalwart.experiments.common import (
    Context,
    bullets,
    fmt_bytes,
    make_config,
    markdown_table,
    new_figure,
    save_figure,
    write_report,
)
from stalwart.experiments.presets import SEED, preset
from stalwart.memory.measure import live_tensor_bytes
from stalwart.precision import cpu_has_bf16_units
from stalwart.train import AfterStep, train

BENCH_COMMON = {"run.seed": SEED, "run.threads": 2, "schedule.warmup_steps": 1}


def bench(
    ctx: Context, name: str, overrides: dict, steps: int, warmup: int, memory: bool | None = None
) -> dict:
    """run_bench on one config (the real loop), restoring the process-wide thread count."""
    cfg = make_config(ctx, name, {**BENCH_COMMON, **overrides})
    threads = torch.get_num_threads()
    print(f"[{ctx.name}] {name}: bench {steps} steps after {warmup}", flush=True)
    t0 = time.perf_counter()
    try:
        # --quick skips the fresh-process memory measurement (seconds of startup each)
        memory = not ctx.quick if memory is None else memory
        out = run_bench(cfg, steps=steps, warmup=warmup, memory=memory)
    finally:
        torch.set_num_threads(threads)
    out["wall_s"] = time.perf_counter() - t0
    out["config"] = cfg
    return out


class _AllocatorPeak:
    """Called after every step of train() (as `AfterStep(fn)`): profiles step 2 (after a warm-up
    step) with the torch profiler's allocator events. Peak = every tensor held when the step
    starts (`live_tensor_bytes`: weights, last step's gradients, optimizer state) + the highest
    running sum of the step's allocations and frees: what torch.cuda.max_memory_allocated
    means, on a CPU. (The bench's RSS-based CPU peak read ~weights + state only here until
    18719ee: an independent measure.)"""

    def __init__(self):
        self.prof, self.baseline, self.peak = None, 0, None

    def __call__(self, step: int, record: dict) -> None:
        if step == 1:
            self.baseline = live_tensor_bytes()
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        elif step == 2 and self.prof is not None:
            self.prof.__exit__(None, None, None)
            events = [
                e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"
            ]
            now = high = 0
            for e in sorted(events, key=lambda e: e.start_ns()):
                now += e.nbytes()
                high = max(high, now)
            self.peak = self.baseline + high


def allocator_peak(ctx: Context, name: str, overrides: dict) -> int | None:
    """The peak tensor memory of one training step of this config (the real loop, 3 steps)."""
    fixed = {
        "train.max_steps": 3,
        "train.eval_interval": 0,
        "train.eval_batches": 1,
        "train.sample_tokens": 0,
        "ckpt.interval": 0,
        "ckpt.keep_last": 1,
        "train.log_interval": 1,
        "schedule.warmup_steps": 1,
    }
    cfg = make_config(ctx, f"peak_{name}", {**BENCH_COMMON, **overrides, **fixed})
    probe = _AllocatorPeak()
    threads = torch.get_num_threads()
    print(f"[{ctx.name}] {name}: allocator peak of one step", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="stalwart-peak-") as d:
            in_tmp = with_overrides(cfg, {"run.dir": d})  # the run's files are thrown away
            train(in_tmp, progress=False, callbacks=[AfterStep(probe)])
    finally:
        torch.set_num_threads(threads)
    return probe.peak


def cpu_step_s(r: dict) -> float:
    """CPU time the process got per step, over its threads (from bench's mfu_by_cpu_time): unlike
    the wall clock it does not count time the scheduler gave other processes on a busy machine.
    None where the bench could not measure it (no known peak FLOP/s for this dtype here)."""
    mfu_cpu, peak = r.get("mfu_by_cpu_time"), r.get("peak_flops")
    if not mfu_cpu or not peak:
        return None
    return r["flops_per_token"] * r["tokens_per_step"] / (mfu_cpu * peak)


def step_cost(results: list[dict]) -> tuple[str, list[float]]:
    """Per-step seconds to compare: CPU time where every result has it, else median wall."""
    cpu = [cpu_step_s(r) for r in results]
    if all(c is not None for c in cpu):
        return "CPU time per step", cpu
    return "median wall-clock step time", [r["step_time_median_s"] for r in results]


def bars(ax, labels: list[str], values: list[float], title: str, ylabel: str, fmt: str) -> None:
    rects = ax.bar(labels, values, color=["C0", "C1", "C2", "C3"][: len(labels)])
    ax.bar_label(rects, labels=[fmt.format(v) for v in values], fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot(res: dict[str, dict], path: Path, title: str) -> Path:
    fig, (ax_t, ax_m) = new_figure(ncols=2, width=5.0)
    names = list(res)
    bars(
        ax_t,
        names,
        [res[n]["tokens_per_sec"] for n in names],
        "throughput",
        "tokens/s (higher is better)",
        "{:,.0f}",
    )
    mem = [(res[n]["peak_memory_bytes"] or 0) / 2**20 for n in names]
    bars(ax_m, names, mem, "peak memory of one step", "MiB", "{:.1f}")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("train.precision (autocast dtype)")
    fig.suptitle(title)
    return save_figure(fig, path)


def _memory_conclusion(res: dict) -> str:
    """The memory sentence, from the measured peaks (not from what one expects them to be)."""
    peaks = {p: r["peak_memory_bytes"] for p, r in res.items()}
    if not all(peaks.values()):
        return "Peak memory: not measured for every precision."
    ratios = ", ".join(f"{p} {peaks[p] / peaks['fp32']:.2f}x" for p in ("bf16", "fp16"))
    return (
        f"Peak memory: {ratios} fp32's. Autocast keeps fp32 master weights, gradients and Adam "
        "state and adds 16-bit copies of the weights for the matmuls; what it saves is the "
        "activations stored for backward in 16 bits, so the saving grows with micro-batch x "
        "sequence length and shrinks as weights and optimizer state dominate."
    )


def run(ctx: Context) -> Path:
    size = preset("precision", ctx.quick)
    steps, warmup = (2, 1) if ctx.quick else (5, 2)
    res = {}
    for p in ("fp32", "bf16", "fp16"):
        over = {**size, "train.precision": p, "run.device": "cpu"}
        res[p] = bench(ctx, p, over, steps, warmup, memory=False)
        res[p]["peak_memory_bytes"] = allocator_peak(ctx, p, over)
    base = res["fp32"]
    rows = []
    basis, cost = step_cost(list(res.values()))
    for i, (p, r) in enumerate(res.items()):
        peak = r["peak_memory_bytes"]
        rows.append(
            [
                f"`{p}`",
                f"{r['tokens_per_sec']:,.0f}",
                f"{r['step_time_median_s'] * 1e3:.0f}",
                f"{cpu_step_s(r) * 1e3:.0f}" if cpu_step_s(r) else "n/a",
                f"{cost[0] / cost[i]:.2f}x",
                fmt_bytes(peak) if peak else "not measured",
                f"{peak / base['peak_memory_bytes']:.2f}x"
                if peak and base["peak_memory_bytes"]
                else "-",
            ]
        )
    headers = [
        "precision",
        "tokens/s",
        "step time, median wall (ms)",
        "CPU time per step (ms)",
        "speed vs fp32",
        "peak memory",
        "memory vs fp32",
    ]
    m = base["config"].model
    device = base["device"]
    title = (
        f"{m.n_layer}-layer {m.n_embd}-wide GPT, {size['train.micro_batch']} x "
        f"{m.block_size} tokens per step, on {device}"
    )
    figure = plot(res, ctx.out / "precision.png", title)
    amx = cpu_has_bf16_units()
    fastest = list(res)[cost.index(min(cost))]
    lines = [
        f"Speed (by {basis}): bf16 {cost[0] / cost[1]:.2f}x and fp16 {cost[0] / cost[2]:.2f}x "
        f"fp32's; the fastest here is {fastest}.",
        (
            "This CPU has AMX tiles: 16-bit matmuls have fast kernels here."
            if amx
            else "This CPU has no AMX (AVX2 only): PyTorch has no fast bf16/fp16 matmul kernels for it, "
            "so autocast to 16 bits makes every matmul slower, not faster. The lesson's speed-up "
            "(up to ~2x and more with tensor cores) is a GPU result; this run cannot show it."
        ),
        _memory_conclusion(res),
    ]
    body = f"""
## Setup

{title}. `stalwart.bench.run_bench`: {warmup} warm-up steps, then {steps} timed steps (mean
step time); the peak tensor memory of one step from the torch profiler's allocator events
in a separate short run of the real loop (step 2, after a warm-up step).
AMX present: {amx}. Timings were taken on a shared machine under load: ratios within this run
mean more than the absolute numbers.

## Results

![throughput and memory]({figure.name})

{markdown_table(headers, rows)}

## Conclusion

{bullets(lines, ctx.quick)}
"""
    return write_report(ctx, "Precision: fp32 vs bf16 vs fp16 autocast", body)
