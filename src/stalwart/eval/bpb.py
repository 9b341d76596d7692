"""Bits per byte over a whole held-out split: the figure that compares models across tokenizers.

Every token of the split is scored once, with context, end-of-text tokens included, and the total
is divided by the exact number of bytes those tokens stand for. Converting a per-token loss on
sampled windows with the split's *average* bytes per token is biased when the windows are not
typical (a BPE's tokens are longer in some files than in others), and a byte-level model and a
BPE model then cannot be compared honestly; this is the figure `make train` prints beside
gzip and xz, and `stalwart eval --task bpb` reports.

Windows of `block_size` tokens advance by `stride` (default: block_size, disjoint windows); a
window scores only the targets the previous one did not, so with stride < block_size every
scored token after the first window has at least block_size - stride tokens of context. The
split's first token is scored after `bos` (the end-of-text id that separates documents), so
every token counts; without a `bos` it is context only, and the caller leaves its bytes out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _windows(n: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored target offset) of each window over n + 1 positions (targets 1..n)."""
    out, start, scored_to = [], 0, 0  # scored_to: targets < it are done
    while scored_to < n:
        start = max(0, min(start, n - block_size))
        out.append((start, scored_to - start))
        scored_to = start + block_size
        start += stride
    return out


@torch.no_grad()
def bits_per_byte(
    model: torch.nn.Module,
    tokens: np.ndarray,
    n_bytes: int,
    block_size: int,
    batch: int = 8,
    device: str | torch.device = "cpu",
    bos: int | None = None,
    stride: int | None = None,
) -> dict:
    """Score every token of `tokens` (a whole split) and divide by `n_bytes`.

    Returns bits_per_byte, nats_per_token (the mean over scored tokens), tokens (scored), bytes,
    and bits (the total). The model is evaluated in fp32, in eval mode, on `device`.
    """
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in (0, block_size], got {stride}")
    seq = np.asarray(tokens, dtype=np.int64)
    if bos is not None:
        seq = np.concatenate([np.array([bos], dtype=np.int64), seq])
    n = len(seq) - 1  # targets: seq[1:]
    block = min(block_size, n)
    wins = _windows(n, block, stride)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    data = torch.from_numpy(seq)
    for i in range(0, len(wins), batch):
        group = wins[i : i + batch]
        x = torch.stack([data[s : s + block] for s, _ in group]).to(device)
        y = torch.stack([data[s + 1 : s + 1 + block] for s, _ in group]).to(device)
        logits, _ = model(x)
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        ).view(len(group), block)
        for row, (_, first) in enumerate(group):
            part = nll[row, first:].double()
            total += float(part.sum())  # host sync: once per window, an evaluation
            count += part.numel()
    model.train(was_training)
    return {
        "bits_per_byte": total / math.log(2) / n_bytes,
        "nats_per_token": total / max(count, 1),
        "tokens": count,
        "bytes": int(n_bytes),
        "bits": total / math.log(2),
    }
