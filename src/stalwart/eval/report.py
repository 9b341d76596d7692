"""End-of-run summary: where the run stands, in nats and bits per byte, and a sample.

The bits per byte that count are measured over the whole held-out split (eval.bpb); the sampled
windows' loss, converted with the split's average bytes per token, is shown as an estimate."""

from __future__ import annotations

import math
import sys

from stalwart.config import Config
from stalwart.data.loader import open_dataset
from stalwart.data.prepare import bits_per_byte as sampled_bits_per_byte
from stalwart.eval.bpb import bits_per_byte
from stalwart.eval.intask import task_lines
from stalwart.eval.sample import checkpoint_tokenizer, sample_text


def whole_split_bpb(cfg: Config, result) -> dict:
    """bits/byte of the final model over the whole held-out split (eval.bpb), every token
    scored after the end-of-text that separates documents."""
    data = open_dataset(cfg.data.dir)
    device = next(result.model.parameters()).device
    block = result.model.cfg.block_size
    # the dataset's own separator: a dataset prepared before documents were separated has none
    # (and its vocabulary may not even hold the tokenizer's end-of-text id)
    return bits_per_byte(
        result.model, data.val, data.meta["val_bytes"], block, batch=8, device=device,
        bos=data.meta.get("eot_id"), stride=block // 2,
    )  # fmt: skip


def whole_split_line(cfg: Config, result) -> str:
    r = whole_split_bpb(cfg, result)
    line = (
        f"held-out, whole split: {r['bits_per_byte']:.3f} bits/byte "
        f"({r['tokens']:,} tokens scored = {r['bytes']:,} bytes)"
    )
    base = result.data_meta.get("baselines_bits_per_byte")
    if base:
        verdict = "below" if r["bits_per_byte"] < base["xz-9"] else "above"
        line += f", {verdict} xz -9 ({base['xz-9']:.3f})"
    return line


def print_run_summary(cfg: Config, result, stream=None) -> None:
    out = stream or sys.stdout
    meta = result.data_meta
    print(f"\nrun: {result.run_dir}  (step {result.step}/{cfg.train.max_steps})", file=out)
    if result.val_loss is not None and math.isfinite(result.val_loss):
        bpb = sampled_bits_per_byte(result.val_loss, meta)
        line = f"held-out loss: {result.val_loss:.4f} nats/token ~ {bpb:.3f} bits/byte (sampled)"
        base = meta.get("baselines_bits_per_byte")
        if base:
            line += (
                f"  (same bytes: gzip -9 {base['gzip-9']:.3f}, xz -9 {base['xz-9']:.3f}, "
                f"unigram {base['unigram']:.3f})"
            )
        print(line, file=out)
    if result.step:
        print(whole_split_line(cfg, result), file=out)
    if cfg.train.sample_tokens and result.step:
        ckpt = result.run_dir / "checkpoints" / f"step_{result.step:08d}"
        tok = checkpoint_tokenizer(ckpt, meta, cfg.data.dir)
        text = sample_text(result.model, tok, "", cfg.train.sample_tokens, seed=cfg.run.seed)
        print("sample:\n" + "-" * 60 + "\n" + text.strip("\n") + "\n" + "-" * 60, file=out)
    for line in task_lines(result.run_dir):  # eval.tasks: accuracy against chance
        print(line, file=out)
    rd = result.run_dir
    print(
        f"records: {rd}/metrics.jsonl, {rd}/config.toml, checkpoints in {rd}/checkpoints/", file=out
    )
