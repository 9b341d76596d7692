"""Planner accuracy: predicted vs measured peak memory of a training step on CPU.

    .venv/bin/python benchmarks/memory_accuracy.py [--threads 1] [--json]
        [--sizes small,default,llama-small,llama-default] [--micro 4,32] [--ckpt none,full,selective] [--precision fp32]

Each configuration runs in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536 (exact CPU
measurement, see stalwart.memory.measure.enable_exact_cpu_peak). The process builds the model and
AdamW exactly as `train` does, runs two warm-up steps (the optimizer state exists from the
first), then measures one step - zero_grad, trainer.forward_backward, clip, optimizer.step - two
ways: stalwart.memory.measure.PeakMemory (tensors held at entry + the rise of VmHWM), and the torch
profiler's allocator timeline (every allocation and free of the step, exact for tensor memory,
on top of the weights and optimizer state). The prediction is
memory.planner.plan_training(cfg, micro_batch=B), computed from the config alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZES = {
    "small": ["--model.n_layer", "2", "--model.n_head", "4", "--model.n_embd", "128",
              "--model.block_size", "128"],
    "small4": ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "128",
               "--model.block_size", "128"],  # the shape the issue saw at -13%
    "default": ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "256",
                "--model.block_size", "256"],
}  # fmt: skip
LLAMA = ["--model.arch", "llama", "--model.bias", "false", "--model.n_kv_head", "2",
         "--model.tie_embeddings", "false", "--train.fused_gelu", "false"]  # fmt: skip
SIZES |= {f"llama-{k}": [*v, *LLAMA] for k, v in list(SIZES.items())}  # RoPE, SwiGLU, GQA
VOCAB = 256  # the byte-level tokenizer of data/stdlib-byte


def build(overrides: list[str]):
    """The config, model, optimizer and precision, as train() builds them."""
    import torch

    from stalwart.config import load_config
    from stalwart.model.gpt import build_model
    from stalwart.optim.build import build_optimizer
    from stalwart.precision import build_precision

    cfg = load_config(None, ["--model.vocab_size", str(VOCAB), "--run.device", "cpu", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB)
    opt = build_optimizer(cfg.optim, model)
    prec = build_precision(cfg.train.precision, torch.device("cpu"))
    return cfg, model, opt, prec


def make_step(cfg, model, opt, prec, micro: int):
    """One optimizer step as Trainer.train_step takes it (steps 2-6), on random token ids."""
    import torch

    from stalwart.parallel import DistContext
    from stalwart.train import forward_backward

    ctx, T, accum = DistContext(), cfg.model.block_size, cfg.train.grad_accum
    gen = torch.Generator().manual_seed(1)

    def step(zero_grad: bool = True) -> None:
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        rows = torch.randint(0, VOCAB, (micro * accum, T + 1), generator=gen)
        batches = [(r[:, :-1], r[:, 1:]) for r in rows.split(micro)]
        forward_backward(model, batches, prec, accum, ctx)
        prec.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        prec.scaler.step(opt)
        prec.scaler.update()

    return step


def profiler_peak(step, model, opt) -> int:
    """Exact tensor-bytes peak of one step from the allocator's events. Started after
    zero_grad (the profiler cannot see frees of blocks allocated before it started)."""
    from torch.profiler import ProfilerActivity, profile

    opt.zero_grad(set_to_none=True)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(t.nbytes for s in opt.state.values() for t in s.values() if hasattr(t, "nbytes"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(zero_grad=False)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return held + peak


def child(overrides: list[str], micro: int, threads: int) -> dict:
    from stalwart.memory.measure import PeakMemory, enable_exact_cpu_peak

    enable_exact_cpu_peak()  # before the model exists
    import torch

    from stalwart.memory.planner import plan_training

    torch.set_num_threads(threads)
    cfg, model, opt, prec = build(overrides)
    step = make_step(cfg, model, opt, prec, micro)
    step()
    step()
    with PeakMemory("cpu") as pm:
        step()
    allocator = profiler_peak(step, model, opt)
    plan = plan_training(cfg, micro_batch=micro, vocab_size=VOCAB, device_type="cpu")
    return {
        "measured_bytes": pm.peak_bytes,
        "exact": pm.exact,
        "allocator_bytes": allocator,
        "predicted_bytes": plan.total_bytes,
        "peak_phase": plan.peak_phase,
    }


def run_one(size: str, micro: int, ckpt: str, precision: str, threads: int) -> dict:
    overrides = [*SIZES[size], "--model.activation_checkpointing", ckpt,
                 "--train.precision", precision]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", json.dumps([overrides, micro, threads])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(size=size, micro_batch=micro, checkpointing=ckpt, precision=precision)
    res["error"] = res["predicted_bytes"] / res["measured_bytes"] - 1
    return res


def table(rows: list[dict]) -> str:
    lines = [
        "| model | micro-batch | checkpointing | measured (VmHWM) | allocator (profiler) "
        "| predicted | error | peak at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['micro_batch']} | {r['checkpointing']} "
            f"| {r['measured_bytes'] / 2**20:.1f} MiB | {r['allocator_bytes'] / 2**20:.1f} MiB "
            f"| {r['predicted_bytes'] / 2**20:.1f} MiB | {r['error']:+.1%} | {r['peak_phase']} |"
        )
    worst = max(abs(r["error"]) for r in rows)
    return "\n".join(lines) + f"\n\nworst |error|: {worst:.1%} over {len(rows)} configurations"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="small,default")
    p.add_argument("--micro", default="4,32")
    p.add_argument("--ckpt", default="none,full,selective")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*json.loads(a.child))))
        return
    rows = []
    for size in a.sizes.split(","):
        for micro in map(int, a.micro.split(",")):
            for ckpt in a.ckpt.split(","):
                rows.append(run_one(size, micro, ckpt, a.precision, a.threads))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2) if a.json else table(rows))


if __name__ == "__main__":
    main()
