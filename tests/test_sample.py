"""Sampling: greedy, temperature, top-k, seeds, streaming, and every kind of source it loads."""

from __future__ import annotations

import pytest
import torch

from stalwart.checkpoint.locate import resolve_checkpoint
from stalwart.config import ModelConfig
from stalwart.data.tokenizer import ByteTokenizer
from stalwart.errors import UserError
from stalwart.eval.sample import generate, load_any, sample_text
from stalwart.export import export
from stalwart.model.gpt import build_model
from stalwart.train import train
from tests.conftest import tiny_config

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CFG, 256).eval()


def test_greedy_is_argmax_and_top_k_1(model):
    idx = torch.tensor([[1, 2, 3]])
    out = generate(model, idx, 8, temperature=0)
    ref = idx
    for _ in range(8):  # the reference: the argmax of the last position, one token at a time
        nxt = model(ref)[0][0, -1].argmax()
        ref = torch.cat([ref, nxt.view(1, 1)], dim=1)
    assert torch.equal(out, ref)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(generate(model, idx, 8, temperature=1.0, top_k=1, generator=gen), ref)


def test_seeded_sampling_is_reproducible_and_top_k_is_respected(model):
    idx = torch.tensor([[1, 2, 3]])

    def run(seed, top_k=0):
        return generate(model, idx, 12, 1.5, top_k, torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    out = run(2, top_k=3)
    logits = model(out[:, :-1])[0][0]  # the logits each new token was drawn from
    for t in range(idx.shape[1], out.shape[1]):
        assert out[0, t] in torch.topk(logits[t - 1], 3).indices


def test_context_longer_than_block_size_is_cropped(model):
    out = generate(model, torch.zeros(1, 10, dtype=torch.long), 20, temperature=0)
    assert out.shape == (1, 30)  # 30 > block_size 16: only the last 16 are fed back


def test_stream_prints_exactly_the_returned_text_even_a_partial_utf8_tail(model):
    ended_partial = False
    for seed in range(6):  # an untrained byte model emits arbitrary bytes, broken UTF-8 included
        pieces: list[str] = []
        text = sample_text(model, ByteTokenizer(), "ab", 9, 1.0, 0, seed, stream=pieces.append)
        assert text.startswith("ab") and "".join(pieces) == text[2:]
        ended_partial |= text.endswith("\ufffd")
    assert ended_partial  # the held-back tail case really happened


def test_load_any_run_checkpoint_and_exported_dirs(tmp_path, tiny_data):
    steps = ["--train.max_steps", "3", "--schedule.warmup_steps", "1", "--train.eval_interval", "0"]
    result = train(tiny_config(tmp_path / "run", tiny_data, *steps), progress=False)
    export(tmp_path / "run", "safetensors", tmp_path / "st", dtype="bf16")
    want = result.model.state_dict()
    for source in (tmp_path / "run", resolve_checkpoint(tmp_path / "run"), tmp_path / "st"):
        model, tok = load_any(source)
        assert isinstance(tok, ByteTokenizer) and not model.training
        got = model.state_dict()
        for k, v in want.items():  # the bf16 export comes back upcast, to bf16 precision
            tol = 1e-2 * v.abs().max().item() if source.name == "st" else 0
            torch.testing.assert_close(got[k], v, atol=tol, rtol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no valid checkpoint"):
        load_any(tmp_path / "empty")
