"""`stalwart plan`: will this config fit, what holds the memory, and what to change if not.

Everything here is arithmetic on the config (memory.planner): nothing is allocated, so a 70B
plan answers in a second on a laptop. This is the top of the memory package: the report and its
formatting; nothing below imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stalwart.config import Config, load_config
from stalwart.errors import UserError
from stalwart.memory.budget import HEADROOM, auto_choice, largest_micro_batch, named_budget
from stalwart.memory.plan_table import lesson_table
from stalwart.memory.planner import (
    gb,
    inference_memory,
    resolve_plan_precision,
    step_of,
    training_memory,
    zero_stage,
)


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


def resolve_vocab(vocab_size: int, data_dir: str | Path) -> int:
    """The config's vocabulary size, or else the prepared dataset's (its meta.json)."""
    if vocab_size:
        return vocab_size
    meta = Path(data_dir) / "meta.json"
    try:
        return int(json.loads(meta.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"no vocabulary size: set --model.vocab_size (or --data.dir to a prepared dataset; "
            f"{meta} is not readable)"
        ) from None


def build_report(
    cfg: Config,
    world: int,
    zero: int,
    device: str,
    headroom: float,
    target: int | None,
    context: int | None,
) -> dict:
    """The whole answer as one JSON-able dict (`plan --json` prints it as is)."""
    vocab = resolve_vocab(cfg.model.vocab_size, cfg.data.dir)
    dev_type = "cpu" if device.lower() == "cpu" else "cuda"
    step = step_of(cfg, world_size=world, zero=zero, vocab_size=vocab, device_type=dev_type)
    label, budget = named_budget(device)
    usable = int(budget * (1 - headroom))
    largest = largest_micro_batch(step, usable)
    micro = cfg.train.micro_batch
    if micro == "auto":  # what train would pick on this device (memory.budget.auto_micro_batch)
        micro = auto_choice(largest) if largest else 1
    plan = training_memory(step, int(micro))
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
    out["inference"] = inference_memory(cfg.model, vocab, context=context).to_json()
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


def default_device(run_device: str) -> str:
    """The device to plan for when `--device` is not given: this CPU, or else an H100."""
    if run_device == "cpu" or (run_device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "H100"


def cmd_plan(args, rest) -> int:
    if args.lesson_table:
        print(lesson_table(as_json=args.json))
        return 0
    cfg = load_config(args.config, rest)
    zero = args.zero
    if zero is None:  # what the configured parallel mode shards
        zero = zero_stage(cfg.parallel.mode)
    report = build_report(
        cfg,
        args.world_size,
        zero,
        args.device or default_device(cfg.run.device),
        HEADROOM if args.headroom is None else args.headroom,
        args.tokens_per_step,
        args.context,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
