"""Llama weights in Hugging Face's layout: the `LlamaConfig` that computes what model/llama.py
computes, and reading a `LlamaForCausalLM` directory (or a stalwart llama run) back.

stalwart's llama parameters carry HF's names and torch's (out, in) layout, so the weights move
as they are; only a tied head is stored once (`tie_word_embeddings`, as HF saves it).
Nothing here imports transformers: the files are JSON and safetensors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.locate import read_meta, resolve_checkpoint
from stalwart.config import ModelConfig, from_dict
from stalwart.errors import UserError

SAFETENSORS_FORMAT = "stalwart-llama"  # config.json "format" of a llama `--format safetensors`
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config(cfg: ModelConfig, vocab_size: int, eot_id: int | None, dtype: str) -> dict:
    """config.json of the LlamaForCausalLM equal to stalwart's llama of config `cfg`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5 reads this, 5 reads rope_parameters
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": TORCH_NAMES[dtype],
    }


def to_hf_state(sd: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The weights as HF saves them: a tied head only as the embedding."""
    return {k: v.contiguous() for k, v in sd.items() if not (tied and k == ck.TIED)}


def _rope(hf: dict) -> dict:
    rope = hf.get("rope_parameters")
    return rope if isinstance(rope, dict) else {}


def _check(hf: dict, where: Path) -> None:
    """Refuse Llama variants stalwart's model would compute differently."""
    C, heads = hf.get("hidden_size", 0), hf.get("num_attention_heads", 1)
    checks = {
        "hidden_act": hf.get("hidden_act", "silu") == "silu",
        "attention_bias": not hf.get("attention_bias"),
        "mlp_bias": not hf.get("mlp_bias"),
        "rope_scaling": not hf.get("rope_scaling"),
        "rope_type": _rope(hf).get("rope_type", "default") == "default",
        "head_dim": hf.get("head_dim") in (None, C // heads),
        "pretraining_tp": hf.get("pretraining_tp", 1) == 1,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise UserError(f"{where} is a Llama variant stalwart does not implement: {', '.join(bad)}")


def model_config(hf: dict, where: Path) -> ModelConfig:
    """A LlamaConfig dict -> stalwart's model section (the shape every weight must have)."""
    _check(hf, where)
    try:
        return ModelConfig(
            arch="llama", n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=float(_rope(hf).get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), bias=False,
        )  # fmt: skip
    except KeyError as e:
        raise UserError(f"{where}/config.json has no {e.args[0]}: not a Llama config") from None


def _weights(d: Path) -> dict[str, torch.Tensor]:
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():  # sharded
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return {k: v for s in sorted(shards) for k, v in load_file(str(d / s)).items()}
    raise UserError(f"{d} has a Llama config.json but no model.safetensors")


def is_llama_dir(p: Path) -> bool:
    """A HF Llama directory or a llama export (config.json says so)."""
    try:
        cfg = json.loads((Path(p) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (
        cfg.get("model_type") == "llama" or cfg.get("format") == SAFETENSORS_FORMAT
    )


def read_llama(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(weights in stalwart's = HF's names, the model config they imply) of a HF Llama
    directory, a llama export, or a stalwart llama run / checkpoint."""
    p = Path(path)
    if is_llama_dir(p):
        hf = json.loads((p / "config.json").read_text())
        return _weights(p), model_config(hf, p)
    if (p / ck.MANIFEST).is_file() or (p / "checkpoints").is_dir():
        ckpt = resolve_checkpoint(p)
        cfg_dict, _ = read_meta(ckpt)
        cfg = from_dict(cfg_dict).model
        if cfg.arch != "llama":
            raise UserError(f"{p} holds a {cfg.arch} model, not a llama")
        sd = ck.read_model_state(ckpt)
        vocab = int(sd["model.embed_tokens.weight"].shape[0])  # 0 in a config = the dataset's
        return sd, dataclasses.replace(cfg, vocab_size=vocab)
    raise UserError(
        f"{p} is not a Llama model: expected a Hugging Face Llama directory (config.json with "
        "model_type llama + model.safetensors), a llama export, or a stalwart llama run"
    )


FIT_FIELDS = ("n_layer", "n_head", "kv_heads", "n_embd", "ffn_size", "tie_embeddings")


def fit_problems(src: ModelConfig, cfg: ModelConfig, vocab_size: int) -> list[str]:
    """Why weights of config `src` cannot initialise a llama of config `cfg` (empty: they can).

    The shapes (and the head's tying) must match exactly; rope_theta and norm_eps change what
    the weights compute, so they must match too. A shorter context than the source's is fine:
    RoPE has no position table to crop."""
    flags = {"kv_heads": "n_kv_head", "ffn_size": "intermediate_size"}
    out = []
    for name in (*FIT_FIELDS, "rope_theta", "norm_eps"):
        have, got = getattr(cfg, name), getattr(src, name)
        if have != got:
            flag = flags.get(name, name)
            out.append(f"{flag} is {got}, the model's {have} (set --model.{flag} {got})")
    if src.vocab_size != vocab_size:
        out.append(
            f"vocab_size is {src.vocab_size}, the model's {vocab_size} (prepare the data with "
            f"the source's tokenizer and set --model.vocab_size {src.vocab_size})"
        )
    return out
