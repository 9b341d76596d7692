"""The precision experiment: fp32 vs bf16 vs fp16 autocast, through `stalwart.bench`.

Each precision runs the same model and batch through the real loop (`run_bench`: warm-up
steps, then timed steps; the peak memory of one step measured in a fresh process). On a CPU
without AMX (this machine: AVX2 only) bf16/fp16 matmuls have no fast kernels, so 16-bit
autocast is *slower* there; on a GPU with tensor cores it is the other way round. The report
says which this run measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stalwart.experiments.common import (
    Context,
    fmt_bytes,
    make_config,
    markdown_table,
    new_figure,
    save_figure,
    write_report,
)

FULL = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 128,
    "model.block_size": 64,
    "train.micro_batch": 8,
}
QUICK = {
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 32,
    "train.micro_batch": 2,
}
BENCH_COMMON = {"run.seed": 1337, "run.threads": 2, "schedule.warmup_steps": 1}


def bench(
    ctx: Context, name: str, overrides: dict, steps: int, warmup: int, memory: bool | None = None
) -> dict:
    """run_bench on one config (the real loop), restoring the process-wide thread count."""
    from stalwart.bench import run_bench

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


def bars(ax, labels: list[str], values: list[float], title: str, ylabel: str, fmt: str) -> None:
    rects = ax.bar(labels, values, color=["C0", "C1", "C2", "C3"][: len(labels)])
    ax.bar_label(rects, labels=[fmt.format(v) for v in values], fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot(res: dict[str, dict], path: Path, title: str) -> Path:
    fig, (ax_t, ax_m) = new_figure(ncols=2, width=5.0)
    names = list(res)
    bars(ax_t, names, [res[n]["tokens_per_sec"] for n in names], "throughput",
         "tokens/s (higher is better)", "{:,.0f}")
    mem = [(res[n]["peak_memory_bytes"] or 0) / 2**20 for n in names]
    bars(ax_m, names, mem, "peak memory of one step", "MiB", "{:.1f}")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("train.precision (autocast dtype)")
    fig.suptitle(title)
    return save_figure(fig, path)


def run(ctx: Context) -> Path:
    from stalwart.precision import cpu_has_bf16_units

    size = QUICK if ctx.quick else FULL
    steps, warmup = (2, 1) if ctx.quick else (4, 2)
    res = {
        p: bench(ctx, p, {**size, "train.precision": p, "run.device": "cpu"}, steps, warmup)
        for p in ("fp32", "bf16", "fp16")
    }
    base = res["fp32"]
    rows = []
    for p, r in res.items():
        peak = r["peak_memory_bytes"]
        rows.append([
            f"`{p}`",
            f"{r['tokens_per_sec']:,.0f}",
            f"{r['step_time_s'] * 1e3:.0f}",
            f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x",
            fmt_bytes(peak) if peak else "not measured",
            f"{peak / base['peak_memory_bytes']:.2f}x" if peak and base["peak_memory_bytes"] else "-",
        ])
    headers = ["precision", "tokens/s", "step time (ms)", "speed vs fp32", "peak memory",
               "memory vs fp32"]
    m = base["config"].model
    device = base["device"]
    title = f"{m.n_layer}-layer {m.n_embd}-wide GPT, {size['train.micro_batch']} x " \
            f"{m.block_size} tokens per step, on {device}"
    figure = plot(res, ctx.out / "precision.png", title)
    amx = cpu_has_bf16_units()
    fastest = max(res, key=lambda p: res[p]["tokens_per_sec"])
    lines = [
        f"Throughput: bf16 {res['bf16']['tokens_per_sec'] / base['tokens_per_sec']:.2f}x and "
        f"fp16 {res['fp16']['tokens_per_sec'] / base['tokens_per_sec']:.2f}x fp32's; the "
        f"fastest here is {fastest}.",
        ("This CPU has AMX tiles: 16-bit matmuls have fast kernels here." if amx else
         "This CPU has no AMX (AVX2 only): PyTorch has no fast bf16/fp16 matmul kernels for it, "
         "so autocast to 16 bits makes every matmul slower, not faster. The lesson's speed-up "
         "(up to ~2x and more with tensor cores) is a GPU result; this run cannot show it."),
        "Peak memory: autocast keeps fp32 master weights, gradients and Adam state, and adds "
        "16-bit copies of the weights for the matmuls; it saves only on the activations saved "
        "for backward, so at this tiny size (weights and optimizer state dominate, short "
        "sequences) the saving is small or negative. It grows with micro-batch x sequence length.",
    ]
    if ctx.quick:
        lines.insert(0, "**--quick run: too short to support any conclusion; smoke test only.**")
    body = f"""
## Setup

{title}. `stalwart.bench.run_bench`: {warmup} warm-up steps, then {steps} timed steps (mean
step time); the peak memory of one step measured in a fresh process (exact CPU peak).
AMX present: {amx}. Timings were taken on a shared machine under load: ratios within this run
mean more than the absolute numbers.

## Results

![throughput and memory]({figure.name})

{markdown_table(headers, rows)}

## Conclusion

{chr(10).join(f"- {line}" for line in lines)}
"""
    return write_report(ctx, "Precision: fp32 vs bf16 vs fp16 autocast", body)
