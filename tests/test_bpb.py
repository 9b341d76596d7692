"""eval.bpb: bits per byte over a whole split, every token scored once, with context."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stalwart.config import ModelConfig
from stalwart.eval.bpb import _windows, bits_per_byte
from stalwart.model.gpt import build_model

V = 50


def _model(block: int = 16):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=16, block_size=block)
    return build_model(cfg, V)


@pytest.mark.parametrize(
    "n, block, stride", [(100, 16, 16), (100, 16, 8), (37, 16, 5), (10, 16, 16)]
)
def test_every_target_is_scored_exactly_once(n, block, stride):
    block = min(block, n)
    scored = []
    for start, first in _windows(n, block, stride):
        assert 0 <= start and start + block <= n and 0 <= first < block
        scored += [start + 1 + k for k in range(first, block)]  # target indices
    assert scored == list(range(1, n + 1))


def test_disjoint_windows_equal_a_direct_sum():
    model = _model().eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, 16 * 5).astype(np.uint16)
    bos = V - 1
    seq = torch.from_numpy(np.concatenate([[bos], tokens]).astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for s in range(0, 16 * 5, 16):  # disjoint windows of 16 targets
            logits, _ = model(seq[s : s + 16][None])
            total += F.cross_entropy(logits[0], seq[s + 1 : s + 17], reduction="sum").item()
    r = bits_per_byte(model, tokens, n_bytes=200, block_size=16, batch=3, bos=bos)
    assert r["tokens"] == 80  # every token, the first one too (after bos)
    assert r["bits_per_byte"] == pytest.approx(
        total / math.log(2) / 200, rel=1e-6
    )  # fp32 logits, batched differently
    assert r["nats_per_token"] == pytest.approx(
        total / 80, rel=1e-6
    )  # fp32 logits, batched differently


def test_more_context_never_scores_a_token_twice_and_helps_a_copying_model():
    """With a periodic text a model that has seen the period predicts the rest; overlapping
    windows (stride < block) give every scored token that context, and the same count."""
    model = _model(block=16).eval()
    tokens = np.tile(np.arange(10), 20).astype(np.int64)
    a = bits_per_byte(model, tokens, 200, 16, bos=V - 1)
    b = bits_per_byte(model, tokens, 200, 16, bos=V - 1, stride=4)
    assert a["tokens"] == b["tokens"] == 200
    assert math.isfinite(a["bits"]) and math.isfinite(b["bits"])


def test_without_bos_the_first_token_is_context_only():
    model = _model().eval()
    r = bits_per_byte(model, np.arange(40) % V, 39, 16)
    assert r["tokens"] == 39


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match="stride"):
        bits_per_byte(_model(), np.arange(40), 40, 16, stride=17)
