"""End-of-run summary: where the run stands, in nats and bits per byte, and a sample."""

from __future__ import annotations

import math
import sys

from stalwart.config import Config
from stalwart.data.prepare import bits_per_byte
from stalwart.eval.sample import checkpoint_tokenizer, sample_text


def print_run_summary(cfg: Config, result, stream=None) -> None:
    out = stream or sys.stdout
    meta = result.data_meta
    print(f"\nrun: {result.run_dir}  (step {result.step}/{cfg.train.max_steps})", file=out)
    if result.val_loss is not None and math.isfinite(result.val_loss):
        bpb = bits_per_byte(result.val_loss, meta)
        line = f"held-out loss: {result.val_loss:.4f} nats/token = {bpb:.3f} bits/byte"
        base = meta.get("baselines_bits_per_byte")
        if base:
            line += (
                f"  (same bytes: gzip -9 {base['gzip-9']:.3f}, xz -9 {base['xz-9']:.3f}, "
                f"unigram {base['unigram']:.3f})"
            )
        print(line, file=out)
    if cfg.train.sample_tokens and result.step:
        ckpt = result.run_dir / "checkpoints" / f"step_{result.step:08d}"
        tok = checkpoint_tokenizer(ckpt, meta, cfg.data.dir)
        text = sample_text(result.model, tok, "", cfg.train.sample_tokens, seed=cfg.run.seed)
        print("sample:\n" + "-" * 60 + "\n" + text.strip("\n") + "\n" + "-" * 60, file=out)
    rd = result.run_dir
    print(
        f"records: {rd}/metrics.jsonl, {rd}/config.toml, checkpoints in {rd}/checkpoints/", file=out
    )
