"""What a checkpoint costs: size, save time (sync, and async: blocking part + background write),
verify and restore time, for the model sizes of the recipes in configs/.

    .venv/bin/python benchmarks/checkpoint_cost.py [--configs configs/tiny-cpu.toml ...]
        [--repeats 3] [--out DIR] [--json]

The state is real: the recipe's model, its AdamW with moments filled by one optimizer step on a
short synthetic batch, a loader, a health monitor, RNG states; saved through the same
CheckpointSaver the loop uses (with its continuity probe disabled: its cost, one forward of
one micro-batch, is reported separately). The save fraction of wall time at the recipe's
interval is save_s / (interval x step_s); step_s is measured for the CPU recipe and given as
the break-even step time (fraction = 1%) for the GPU one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stalwart.checkpoint import format as ck  # noqa: E402
from stalwart.checkpoint import state as trainstate  # noqa: E402
from stalwart.checkpoint.backend import nonfinite_tensors, pick_backend  # noqa: E402
from stalwart.checkpoint.saver import CheckpointSaver  # noqa: E402
from stalwart.checkpoint.state import TrainParts  # noqa: E402
from stalwart.config import load_config, to_dict, with_overrides  # noqa: E402
from stalwart.data.loader import BatchLoader  # noqa: E402
from stalwart.health.monitor import build_monitor  # noqa: E402
from stalwart.model.gpt import build_model  # noqa: E402
from stalwart.optim.build import build_optimizer  # noqa: E402
from stalwart.precision import build_precision  # noqa: E402

BYTE_VOCAB = 256  # tiny-cpu trains on the byte-level dataset (vocab_size 0 = the dataset's)


def build_parts(cfg) -> TrainParts:
    vocab = cfg.model.vocab_size
    model = build_model(cfg.model, vocab)
    opt = build_optimizer(cfg.optim, model)
    x = torch.randint(0, vocab, (1, min(64, cfg.model.block_size)))
    _, loss = model(x, x)
    loss.backward()
    opt.step()  # AdamW's moments now exist: the optimizer state is its full size
    opt.zero_grad(set_to_none=True)
    data = np.zeros(cfg.model.block_size * 4, dtype=np.uint16)
    loader = BatchLoader(data, cfg.model.block_size, 1, 1, cfg.run.seed)
    loop = trainstate.LoopState(step=1000, tokens=10**9, best_val=3.0)
    scaler = build_precision("fp32", torch.device("cpu")).scaler
    return TrainParts(model, opt, scaler, loader, build_monitor(cfg.health), loop)


def time_saves(cfg, parts, out: Path, asynchronous: bool, repeats: int) -> list[dict]:
    """`repeats` saves through one saver (as in a run: async reuses its snapshot buffers
    from the second save on), then verify and restore the last one."""
    cfg = with_overrides(cfg, {"ckpt.async_save": asynchronous})
    run = Path(tempfile.mkdtemp(dir=out))
    backend = pick_backend(None, optim=cfg.optim, train=cfg.train, seed=cfg.run.seed)
    ckpts = CheckpointSaver(cfg.ckpt, run, parts, backend, config=to_dict(cfg), say=lambda s: None)
    ckpts.attach_log(type("Log", (), {"write": lambda self, r: None})())
    results = []
    for _ in range(repeats):
        parts.loop.step += 1
        t0 = time.perf_counter()
        ckpts.save([ck.step_dir(run / "checkpoints", parts.loop.step)])
        blocking = time.perf_counter() - t0
        ckpts.wait()
        results.append({"blocking_s": blocking, "total_s": time.perf_counter() - t0})
    path = ck.step_dir(run / "checkpoints", parts.loop.step)
    t0 = time.perf_counter()
    assert ck.verify(path).ok
    results[-1]["verify_s"] = time.perf_counter() - t0
    p = build_parts_like(cfg, parts)  # what a fresh process has built when it resumes
    t0 = time.perf_counter()
    trainstate.restore_checkpoint(
        path, p.model, p.optimizer, p.scaler, p.loader, p.monitor, p.loop, check=False
    )
    results[-1]["restore_s"] = time.perf_counter() - t0  # read + load into the objects
    results[-1]["bytes"] = sum(f.stat().st_size for f in path.iterdir())
    shutil.rmtree(run)
    return results


def build_parts_like(cfg, parts: TrainParts) -> TrainParts:
    """Empty objects of the same shapes to restore into (a fresh process after a crash)."""
    model = build_model(cfg.model, cfg.model.vocab_size)
    opt = build_optimizer(cfg.optim, model)
    loader = BatchLoader(parts.loader.data, cfg.model.block_size, 1, 1, cfg.run.seed)
    scaler = build_precision("fp32", torch.device("cpu")).scaler
    return TrainParts(model, opt, scaler, loader, build_monitor(cfg.health), trainstate.LoopState())


def step_time(cfg, steps: int = 4) -> float:
    """Median seconds per optimizer step of the recipe (fp32, CPU): forward+backward of
    micro_batch x block_size tokens, grad_accum times, then AdamW."""
    model = build_model(cfg.model, cfg.model.vocab_size)
    opt = build_optimizer(cfg.optim, model)
    mb = int(cfg.train.micro_batch)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            x = torch.randint(0, cfg.model.vocab_size, (mb, cfg.model.block_size))
            _, loss = model(x, x)
            (loss / cfg.train.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


@torch.no_grad()
def probe_time(cfg) -> float:
    model = build_model(cfg.model, cfg.model.vocab_size).eval()
    x = torch.randint(0, cfg.model.vocab_size, (int(cfg.train.micro_batch), cfg.model.block_size))
    model(x, x)
    t0 = time.perf_counter()
    model(x, x)
    return time.perf_counter() - t0


def bench(config: str, repeats: int, out: Path, cpu_steps: bool) -> dict:
    cfg = load_config(config, ["--run.threads", "0"])
    cfg = with_overrides(cfg, {"model.vocab_size": cfg.model.vocab_size or BYTE_VOCAB})
    parts = build_parts(cfg)
    n_params = sum(p.numel() for p in parts.model.parameters())
    t0 = time.perf_counter()
    nonfinite_tensors(parts.model.state_dict())  # the saver's NaN guard, inside every save
    guard_s = time.perf_counter() - t0
    sync = time_saves(cfg, parts, out, False, repeats)
    asyn = time_saves(cfg, parts, out, True, repeats + 1)
    med = statistics.median
    result = {
        "config": config,
        "params": n_params,
        "checkpoint_bytes": sync[-1]["bytes"],
        "sync_save_s": med(r["total_s"] for r in sync),
        "async_first_blocking_s": asyn[0]["blocking_s"],  # allocates the snapshot buffers
        "async_blocking_s": med(r["blocking_s"] for r in asyn[1:]),
        "async_total_s": med(r["total_s"] for r in asyn[1:]),
        "verify_s": sync[-1]["verify_s"],
        "restore_s": sync[-1]["restore_s"],
        "nan_guard_s": guard_s,
        "interval": cfg.ckpt.interval,
        "eval_interval": cfg.train.eval_interval,
        "repeats": repeats,
    }
    # worst case: the held-out loss improves at every evaluation, so best/ is written every
    # eval_interval steps too (linked, not rewritten, when a step checkpoint is due anyway)
    every = min(cfg.ckpt.interval, cfg.train.eval_interval or cfg.ckpt.interval)
    result["worst_case_every"] = every
    if cpu_steps:
        s = step_time(cfg)
        result.update(step_s=s, probe_s=probe_time(cfg))
        for mode, key in (("sync", "sync_save_s"), ("async", "async_blocking_s")):
            result[f"{mode}_fraction"] = result[key] / (cfg.ckpt.interval * s)
            result[f"{mode}_fraction_worst"] = (result[key] + result["probe_s"]) / (every * s)
    else:  # the step time at which the saves are 1% of the wall time
        for mode, key in (("sync", "sync_save_s"), ("async", "async_blocking_s")):
            result[f"breakeven_step_s_{mode}"] = result[key] / (0.01 * cfg.ckpt.interval)
            result[f"breakeven_step_s_{mode}_worst"] = result[key] / (0.01 * every)
    del parts
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--configs", nargs="+", default=["configs/tiny-cpu.toml", "configs/gpt2-124m.toml"]
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="where to write (default: a temp dir in runs/)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(args.out or ROOT / "runs")
    base.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=base))
    try:
        results = [
            bench(str(ROOT / c), args.repeats, out, cpu_steps="cpu" in Path(c).name)
            for c in args.configs
        ]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"loadavg": load, "results": results}, indent=2))
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} (measured under that load)")
    for r in results:
        print(
            f"{Path(r['config']).name}: {r['params'] / 1e6:.1f}M params, "
            f"{r['checkpoint_bytes'] / 1e6:.1f} MB per checkpoint (median of {r['repeats']})"
        )
        print(
            f"  save sync {r['sync_save_s']:.3f} s | async: blocks {r['async_blocking_s']:.3f} s "
            f"(first save {r['async_first_blocking_s']:.3f} s), written after "
            f"{r['async_total_s']:.3f} s | verify {r['verify_s']:.3f} s | "
            f"restore {r['restore_s']:.3f} s | of a save, the NaN guard: {r['nan_guard_s']:.3f} s"
        )
        if "step_s" in r:
            print(
                f"  step {r['step_s']:.3f} s; probe forward {r['probe_s']:.3f} s per save; saving "
                f"every {r['interval']} steps: sync {100 * r['sync_fraction']:.3f}% of wall time, "
                f"async {100 * r['async_fraction']:.3f}%; worst case (a save + probe every "
                f"{r['worst_case_every']} steps): sync {100 * r['sync_fraction_worst']:.3f}%, "
                f"async {100 * r['async_fraction_worst']:.3f}%"
            )
        else:
            print(
                f"  saves are < 1% of wall time when a step takes more than: every "
                f"{r['interval']} steps {r['breakeven_step_s_sync']:.4f} s sync / "
                f"{r['breakeven_step_s_async']:.4f} s async; worst case every "
                f"{r['worst_case_every']} steps {r['breakeven_step_s_sync_worst']:.4f} s / "
                f"{r['breakeven_step_s_async_worst']:.4f} s"
            )


if __name__ == "__main__":
    main()
