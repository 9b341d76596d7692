"""Per-rank peak memory of a training step under DDP, ZeRO-1 and FSDP (CPU, gloo), measured
and predicted by the planner (`stalwart plan --world-size N --zero K`).

    .venv/bin/python benchmarks/fsdp_memory.py [--nproc 2] [--modes ddp,zero1,fsdp]
        [--repeats 1] [--json] [--section.field VALUE ...]

For each mode it launches `torchrun --standalone --nproc-per-node N` on this script's worker,
which runs the real loop (`train()`, 4 steps) and measures step 3 on every rank with
stalwart.memory.measure.PeakMemory (exact CPU peak: tensors held at the start + the rise of the
resident set over the step, with glibc's mmap threshold lowered before the model is built).
The prediction is memory.planner.plan_training(cfg, world_size=N, zero=0|1|3), same config.
Each rank is one process with its own copy of everything torch holds: the CPU stands in for N
devices. The default model is sized so that weights + gradients + AdamW state are of the same
order as the activations, which is where sharding shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ZERO = {"ddp": 0, "zero1": 1, "fsdp": 3}
MODEL = [
    "--model.n_layer", "6", "--model.n_head", "6", "--model.n_embd", "384",
    "--model.block_size", "128", "--train.micro_batch", "2", "--train.grad_accum", "1",
    "--train.precision", "fp32", "--run.threads", "1", "--data.dir", "data/stdlib-byte",
]  # fmt: skip
LOOP = [
    "--train.max_steps", "4", "--schedule.warmup_steps", "1", "--train.eval_interval", "0",
    "--train.eval_batches", "2", "--ckpt.interval", "0", "--ckpt.resume_check", "off",
    "--train.sample_tokens", "0", "--run.device", "cpu",
    # a logged step resets the process's peak RSS (its metrics record carries the peak since
    # the last one): log only the last step, after the measured one
    "--train.log_interval", "100",
]  # fmt: skip
MEASURED_STEP = 3  # step 1 allocates the optimizer state; 4 is the last (it saves)


def worker(out_dir: Path, overrides: list[str]) -> None:
    """One rank: the loop with a PeakMemory held over step MEASURED_STEP; writes rankR.json."""
    from stalwart.memory.measure import PeakMemory, enable_exact_cpu_peak

    enable_exact_cpu_peak()  # before anything is allocated: see stalwart.memory.measure
    from stalwart.config import load_config
    from stalwart.train import AfterStep, train

    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as run_dir:
        cfg = load_config(None, [*overrides, "--run.dir", run_dir])
        ctor = ddp_constructor_bytes(cfg)
        stack, box = ExitStack(), {}

        def hook(step: int, record: dict) -> None:
            if step == MEASURED_STEP - 1:
                box["pm"] = stack.enter_context(PeakMemory("cpu"))
            elif step == MEASURED_STEP:
                stack.close()

        train(cfg, progress=False, callbacks=[AfterStep(hook)])
    rank = int(os.environ["RANK"])
    pm = box["pm"]
    result = {
        "rank": rank,
        "peak_bytes": pm.peak_bytes,
        "baseline_bytes": pm.baseline_bytes,
        "ddp_constructor_bytes": ctor,
        "exact": pm.exact,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


def ddp_constructor_bytes(cfg) -> int:
    """What wrapping a same-sized model in DDP adds to the resident set (0 for FSDP): the
    reducer's gradient buckets and whatever else it holds in C++, out of Python's sight and so
    outside PeakMemory's baseline. Reported beside the peak, not added to it: with
    gradient_as_bucket_view the buckets *are* the gradients, which the baseline counts."""
    if cfg.parallel.mode not in ("ddp", "zero1"):
        return 0
    import gc

    import torch

    from stalwart import parallel
    from stalwart.data.loader import open_dataset
    from stalwart.memory.measure import proc_status_bytes
    from stalwart.model.gpt import build_model

    ctx = parallel.init(cfg.parallel, "cpu")  # train() will find the group ready
    vocab = cfg.model.vocab_size or int(open_dataset(cfg.data.dir).meta["vocab_size"])
    model = build_model(cfg.model, vocab)
    before = proc_status_bytes("VmRSS:")
    # DDP / ZeRO-1 only here: the compute dtype matters to FSDP's policy alone
    wrapped = parallel.wrap_model(
        model, cfg.parallel, ctx, seed=cfg.run.seed, compute_dtype=torch.float32
    )
    grown = proc_status_bytes("VmRSS:") - before
    del wrapped, model
    gc.collect()
    return max(grown, 0)


def predicted(overrides: list[str], mode: str, world: int) -> dict:
    from stalwart.config import load_config
    from stalwart.data.loader import open_dataset
    from stalwart.memory.planner import plan_training

    cfg = load_config(None, overrides)
    vocab = cfg.model.vocab_size or int(open_dataset(cfg.data.dir).meta["vocab_size"])
    plan = plan_training(
        cfg, world_size=world, zero=ZERO[mode], vocab_size=vocab, device_type="cpu"
    )
    return {"total_bytes": plan.total_bytes, "components": plan.components}


def measure(mode: str, nproc: int, overrides: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-out-") as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", __file__, "--worker", out,
            *overrides, "--parallel.mode", mode,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{mode}: torchrun failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return [json.loads((Path(out) / f"rank{i}.json").read_text()) for i in range(nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--modes", default="ddp,zero1,fsdp")
    p.add_argument("--repeats", type=int, default=1, help="median over this many launches")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    overrides = [*MODEL, *LOOP, *rest]
    if args.worker:
        return worker(Path(args.worker), overrides)
    rows = []
    for mode in args.modes.split(","):
        runs = [measure(mode, args.nproc, overrides) for _ in range(args.repeats)]
        peaks = [max(r["peak_bytes"] for r in ranks) for ranks in runs]
        plan = predicted([*overrides, "--parallel.mode", mode], mode, args.nproc)
        rows.append(
            {
                "mode": mode,
                "world_size": args.nproc,
                "zero": ZERO[mode],
                "measured_peak_bytes": statistics.median(peaks),
                "per_rank_peak_bytes": [r["peak_bytes"] for r in runs[-1]],
                "ddp_constructor_bytes": runs[-1][0]["ddp_constructor_bytes"],
                "exact": all(r["exact"] for ranks in runs for r in ranks),
                "predicted_bytes": plan["total_bytes"],
                "predicted_components": plan["components"],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'mode':<6} {'zero':>4} {'measured/rank':>14} {'predicted':>10} {'pred/meas':>9}")
    for r in rows:
        m, q = r["measured_peak_bytes"], r["predicted_bytes"]
        mib = f"{m / 2**20:>11.1f}MiB {q / 2**20:>7.1f}MiB"
        print(f"{r['mode']:<6} {r['zero']:>4} {mib} {q / m:>9.3f}")


if __name__ == "__main__":
    main()
