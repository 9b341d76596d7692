"""Text generation from a trained model: temperature, top-k, greedy, streamed.

`load_any(PATH)` takes a run directory (its newest valid checkpoint), a checkpoint directory,
or an exported directory (`stalwart export --format hf|safetensors`, or any Hugging Face GPT-2
directory on disk): the artifact is checked by sampling from it with the same code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.locate import read_meta, resolve_checkpoint
from stalwart.config import ModelConfig, from_dict
from stalwart.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenGPT2,
    Tokenizer,
    load_tokenizer,
)
from stalwart.errors import UserError
from stalwart.model.gpt import GPT, build_model
from stalwart.model.gpt2_weights import read_source
from stalwart.model.llama_weights import is_llama_dir, read_llama


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Append max_new_tokens to idx (1, T). temperature 0 = greedy (argmax)."""
    model.eval()
    for _ in range(max_new_tokens):
        context = idx[:, -model.cfg.block_size :]
        logits, _ = model(context)
        logits = logits[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        if on_token:
            on_token(int(nxt))
    return idx


def load_model(ckpt_dir: Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    cfg_dict, meta = read_meta(ckpt_dir)
    cfg = from_dict(cfg_dict)
    model = build_model(cfg.model, cfg.model.vocab_size)
    ck.load_model_state(model, ck.read_model_state(ckpt_dir))
    model.to(device).eval()
    return model, checkpoint_tokenizer(ckpt_dir, meta, cfg.data.dir), meta


def is_exported(path: Path) -> bool:
    """An export or a Hugging Face directory (config.json), not a stalwart run or checkpoint."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / ck.MANIFEST).is_file()


def load_exported(path: Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """A model from an exported (or Hugging Face GPT-2 / Llama) directory, in fp32, and its
    tokenizer."""
    if is_llama_dir(path):
        sd, cfg = read_llama(path)
        model = build_model(cfg, cfg.vocab_size)
        ck.load_model_state(model, sd)
        return model.to(device).eval(), exported_tokenizer(Path(path), cfg.vocab_size)
    sd, src = read_source(path)
    if not src.get("n_head"):
        raise UserError(f"{path}/config.json does not say n_head")
    cfg = ModelConfig(
        n_layer=src["n_layer"],
        n_head=src["n_head"],
        n_embd=src["n_embd"],
        block_size=src["block_size"],
        vocab_size=src["vocab_size"],
        bias=src["bias"],
    )
    model = build_model(cfg, src["vocab_size"])
    ck.load_model_state(model, sd)  # bf16/fp16 exports are upcast into the fp32 model
    return model.to(device).eval(), exported_tokenizer(Path(path), src["vocab_size"])


def exported_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    info = path / "stalwart.json"
    spec = json.loads(info.read_text()).get("tokenizer") if info.is_file() else None
    if spec == "byte":
        return ByteTokenizer()
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.load(path / "tokenizer.json", spec or "tokenizer.json")
    if spec == "gpt2" or vocab_size in (50257, 50304):
        return TiktokenGPT2()
    raise UserError(f"{path} has no tokenizer.json: cannot turn text into ids for this model")


def load_any(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """Run dir, checkpoint dir or exported dir -> (model in eval mode, tokenizer)."""
    if is_exported(Path(path)):
        return load_exported(Path(path), device)
    model, tok, _ = load_model(resolve_checkpoint(path), device)
    return model, tok


def checkpoint_tokenizer(ckpt_dir: Path, meta: dict, data_dir: str) -> Tokenizer:
    spec = meta.get("tokenizer", "byte")
    if spec == "byte":
        return ByteTokenizer()
    own = Path(ckpt_dir) / "tokenizer.json"
    if own.is_file():
        return HFTokenizer.load(own, spec)
    return load_tokenizer(data_dir, spec)


def sample_text(
    model: GPT,
    tok: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stream: Callable[[str], None] | None = None,
) -> str:
    device = next(model.parameters()).device
    ids = tok.encode(prompt) if prompt else [tok.eot_id if tok.eot_id is not None else 10]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out_ids: list[int] = []
    printed = [0]

    def on_token(t: int) -> None:
        out_ids.append(t)
        if stream:
            text = tok.decode(out_ids)
            # hold back a trailing partial UTF-8 sequence until it completes
            if not text.endswith("\ufffd"):
                stream(text[printed[0] :])
                printed[0] = len(text)

    generate(model, idx, max_new_tokens, temperature, top_k, gen, on_token)
    text = tok.decode(out_ids)
    if stream and len(text) > printed[0]:  # what was held back (an incomplete UTF-8 tail)
        stream(text[printed[0] :])
    return prompt + text
