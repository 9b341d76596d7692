"""`stalwart plan`: will this config fit, what holds the memory, and what to change if not.

Everything here is arithmetic on the config (`memory.training_memory`): nothing is allocated,
so a 70B plan answers in a second on a laptop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stalwart.errors import UserError
from stalwart.hardware import DEVICE_MEMORY
from stalwart.memory.planner import (
    AUTO_MAX_MICRO_BATCH,
    HEADROOM,
    gb,
    inference_memory,
    resolve_plan_precision,
    training_memory,
)

MAX_MICRO_BATCH = 1 << 16


def cpu_available_bytes() -> int:
    """MemAvailable: what the kernel can hand out without swapping (page cache included)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise UserError("cannot read MemAvailable from /proc/meminfo: pass --train.micro_batch N")


def runtime_budget(device: torch.device) -> tuple[str, int]:
    """(label, bytes) this process can use now: free CUDA memory, or the system's available
    RAM on CPU (a CPU run shares the machine; MemAvailable is what it can take unswapped)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return f"{torch.cuda.get_device_name(device)} (free memory)", int(free)
    return "this machine (available RAM)", cpu_available_bytes()


def named_budget(name: str) -> tuple[str, int]:
    """`--device NAME`: a DEVICE_MEMORY entry (case and spaces ignored), or `cpu`."""
    if name.lower() == "cpu":
        return "this machine (available RAM)", cpu_available_bytes()
    key = name.lower().replace(" ", "").replace("-", "")
    for known, size in DEVICE_MEMORY.items():
        if known.lower().replace(" ", "").replace("-", "") == key:
            return f"{known} ({size / 1024**3:.0f} GiB)", size
    raise UserError(f"unknown --device {name!r}: use cpu or one of {', '.join(DEVICE_MEMORY)}")


def largest_micro_batch(cfg, budget_bytes: int, **kw) -> int:
    """The largest micro-batch whose predicted peak is within budget (0: not even 1).

    Peak memory grows with the micro-batch, so: double until it does not fit, then bisect."""

    def fits(b: int) -> bool:
        return training_memory(cfg, micro_batch=b, **kw).total_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo = 1
    while lo < MAX_MICRO_BATCH and fits(lo * 2):
        lo *= 2
    hi = min(lo * 2, MAX_MICRO_BATCH + 1)  # lo fits, hi does not (or is past the cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def batch_split(target_tokens: int, seq_len: int, max_micro: int, world: int) -> dict:
    """micro_batch x grad_accum x world reaching at least `target_tokens` per optimizer step,
    with the largest micro-batch that fits (fewest accumulation steps)."""
    seqs = -(-target_tokens // seq_len)  # sequences per step, rounded up
    per_rank = -(-seqs // world)
    if max_micro < 1:
        return {"target_tokens": target_tokens, "micro_batch": None, "grad_accum": None}
    accum = -(-per_rank // max_micro)
    micro = -(-per_rank // accum)  # spread evenly: 48 = 2 x 24, not 32 + 16
    return {
        "target_tokens": target_tokens,
        "micro_batch": micro,
        "grad_accum": accum,
        "tokens_per_step": micro * accum * world * seq_len,
    }


def resolve_vocab(cfg) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    meta = Path(cfg.data.dir) / "meta.json"
    try:
        return int(json.loads(meta.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"no vocabulary size: set --model.vocab_size (or --data.dir to a prepared dataset; "
            f"{meta} is not readable)"
        ) from None


def build_report(
    cfg,
    world: int,
    zero: int,
    device: str,
    headroom: float,
    target: int | None,
    context: int | None,
) -> dict:
    """The whole answer as one JSON-able dict (`plan --json` prints it as is)."""
    vocab = resolve_vocab(cfg)
    dev_type = "cpu" if device.lower() == "cpu" else "cuda"
    kw = {"world_size": world, "zero": zero, "vocab_size": vocab, "device_type": dev_type}
    label, budget = named_budget(device)
    usable = int(budget * (1 - headroom))
    largest = largest_micro_batch(cfg, usable, **kw)
    micro = cfg.train.micro_batch
    if micro == "auto":  # what train would pick on this device (memory.auto_micro_batch)
        micro = min(1 << (largest.bit_length() - 1), AUTO_MAX_MICRO_BATCH) if largest else 1
    plan = training_memory(cfg, micro_batch=micro, **kw)
    T = cfg.model.block_size
    target = target or int(micro) * cfg.train.grad_accum * world * T
    out = plan.to_json()
    out["vocab_size"] = vocab
    out["device"] = {
        "name": label,
        "memory_bytes": budget,
        "headroom": headroom,
        "usable_bytes": usable,
        "fits": plan.total_bytes <= usable,
        "largest_micro_batch": largest,
    }
    out["batch"] = batch_split(target, T, largest, world)
    out["inference"] = inference_memory(cfg, context=context, vocab_size=vocab).to_json()
    out["precision"] = resolve_plan_precision(cfg.train.precision, dev_type)
    return out


LABELS = {
    "weights": "weights (fp32 master)",
    "weight_copies": "16-bit weight casts",
    "gradients": "gradients",
    "ddp_buckets": "DDP gradient buckets",
    "optimizer": "optimizer state",
    "activations": "activations (saved)",
    "logits": "logits + loss",
    "temporaries": "temporaries",
    "batch": "batch (token ids)",
}


def format_report(r: dict) -> str:
    d, b = r["device"], r["batch"]
    lines = [
        f"{r['params'] / 1e6:.1f}M parameters; micro_batch {r['micro_batch']} x "
        f"{r['seq_len']} tokens, {r['precision']}, checkpointing "
        f"{r['activation_checkpointing']}, {r['world_size']} rank(s), ZeRO-{r['zero']}",
        f"  {'component':26s} {'largest':>12s} {'at the peak':>12s}",
    ]
    for k, v in r["components"].items():
        if v or r["at_peak"][k]:
            lines.append(f"  {LABELS.get(k, k):26s} {gb(v):>12s} {gb(r['at_peak'][k]):>12s}")
    lines.append(f"  {'predicted peak':26s} {gb(r['total_bytes']):>12s}   ({r['peak_phase']})")
    verdict = "fits" if d["fits"] else "DOES NOT FIT"
    lines.append(
        f"{d['name']}: {verdict} with {d['headroom']:.0%} headroom "
        f"({gb(r['total_bytes'])} of {gb(d['usable_bytes'])} usable)"
    )
    if d["largest_micro_batch"]:
        lines.append(f"  largest micro-batch that fits: {d['largest_micro_batch']}")
        lines.append(
            f"  {b['target_tokens']:,} tokens per step: micro_batch {b['micro_batch']} x "
            f"grad_accum {b['grad_accum']} x {r['world_size']} rank(s) = "
            f"{b['tokens_per_step']:,} tokens"
        )
    else:
        lines.append(
            "  not even micro-batch 1 fits: try --model.activation_checkpointing full, "
            "--zero 3 with more ranks, or a smaller model"
        )
    inf = r["inference"]
    lines.append(
        f"inference: {gb(inf['total_bytes'])} (bf16 weights "
        f"{gb(inf['components']['weights'])} + KV cache {gb(inf['components']['kv_cache'])} "
        f"for {inf['context']} tokens)"
    )
    return "\n".join(lines)


def default_device(cfg) -> str:
    dev = cfg.run.device
    if dev == "cpu" or (dev == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "H100"


def cmd_plan(args, rest) -> int:
    from stalwart.config import load_config

    if args.lesson_table:
        from stalwart.memory.plan_table import lesson_table

        print(lesson_table(as_json=args.json))
        return 0
    cfg = load_config(args.config, rest)
    zero = args.zero
    if zero is None:  # what the configured parallel mode shards
        zero = {"zero1": 1, "fsdp": 3}.get(cfg.parallel.mode, 0)
    report = build_report(
        cfg,
        args.world_size,
        zero,
        args.device or default_device(cfg),
        HEADROOM if args.headroom is None else args.headroom,
        args.tokens_per_step,
        args.context,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
