"""Text generation from a trained model: temperature, top-k, greedy, streamed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from stalwart import checkpoint as ck
from stalwart.config import from_dict
from stalwart.errors import UserError
from stalwart.model import GPT, build_model
from stalwart.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir -> its newest valid checkpoint; a checkpoint dir -> itself (verified)."""
    p = Path(path)
    if (p / ck.MANIFEST).is_file():
        info = ck.verify(p)
        if not info.ok:
            raise UserError(f"checkpoint {p} is unusable: {info.problem}")
        return p
    for d in reversed(ck.step_dirs(p / "checkpoints")):
        if ck.verify(d).ok:
            return d
    best = p / "checkpoints" / "best"
    if best.is_dir() and ck.verify(best).ok:
        return best
    raise UserError(f"{p} holds no valid checkpoint: pass a run dir or a checkpoint dir")


def read_meta(ckpt_dir: Path) -> tuple[dict, dict]:
    """(config dict, data meta) from a checkpoint's state.json without loading any tensor."""
    tree = ck.read_json_state(ckpt_dir, ("config", "data_meta"))
    return tree["config"], tree.get("data_meta", {})


def load_model(ckpt_dir: Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    cfg_dict, meta = read_meta(ckpt_dir)
    cfg = from_dict(cfg_dict)
    model = build_model(cfg.model, cfg.model.vocab_size)
    ck.load_model_state(model, ck.read_model_state(ckpt_dir))
    model.to(device).eval()
    return model, checkpoint_tokenizer(ckpt_dir, meta, cfg.data.dir), meta


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
    return prompt + tok.decode(out_ids)
