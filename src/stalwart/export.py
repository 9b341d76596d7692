"""The checkpoint as an inference artifact: `stalwart export`, and `run.init_from` (import).

`--format hf` writes a directory that `transformers` loads offline with
`AutoModelForCausalLM.from_pretrained(DIR)` / `AutoTokenizer.from_pretrained(DIR)`:
config.json (GPT2LMHeadModel; LlamaForCausalLM for `model.arch = "llama"`), model.safetensors, generation_config.json, tokenizer files and
stalwart.json (where it came from). `--format safetensors` writes stalwart's own weights
(nn.Linear layout, tied head stored once) with a small config.json any engine can read.
Neither needs transformers installed: the files are written by safetensors and tokenizers.
The layout details (Conv1D transposes, tied head, biases) live in model/gpt2_weights.py; a llama's
(HF's names already, a tied head stored once) in model/llama_weights.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.locate import read_meta, resolve_checkpoint
from stalwart.config import from_dict
from stalwart.data.hf_tokenizer import write_tokenizer_files
from stalwart.errors import UserError
from stalwart.eval.sample import checkpoint_tokenizer
from stalwart.model import llama_weights
from stalwart.model.gpt2_weights import SAFETENSORS_FORMAT, read_source, shape_of, to_hf_state
from stalwart.precision import DTYPES

TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config(shape: dict, eot_id: int | None, dtype: str) -> dict:
    """config.json of the GPT2LMHeadModel that computes what stalwart's GPT computes."""
    p = shape["dropout"]
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": shape["vocab_size"],
        "n_positions": shape["block_size"],
        "n_embd": shape["n_embd"],
        "n_layer": shape["n_layer"],
        "n_head": shape["n_head"],
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation stalwart's MLP uses
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": p,
        "embd_pdrop": p,
        "attn_pdrop": p,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": TORCH_NAMES[dtype],
    }


def generation_config(eot_id: int | None) -> dict:
    """`stalwart sample`'s defaults, so HF's `generate()` samples the same way by default.

    No max_length: callers pass max_new_tokens, and both together make transformers warn.
    (The context is config.json's n_positions; learned positions end there.)
    """
    return {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
    }


def _write_hf(d: Path, sd: dict, shape: dict, tok, dtype: str) -> None:
    eot = shape["eot_id"]
    hf = to_hf_state(sd, shape["n_layer"], shape["n_embd"])
    save_file(hf, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config(shape, eot, dtype), indent=2) + "\n")
    gen = generation_config(eot)
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _write_safetensors(d: Path, sd: dict, shape: dict, tok, dtype: str) -> None:
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "format": SAFETENSORS_FORMAT,
        **{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
        "bias": shape["bias"],
        "activation": "gelu_tanh",  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        "layer_norm_epsilon": 1e-5,
        "linear_layout": "out_in",  # like torch.nn.Linear: y = x W^T + b
        "tie_word_embeddings": True,  # lm_head.weight is transformer.wte.weight (stored once)
        "dtype": TORCH_NAMES[dtype],
        "tokenizer": shape["tokenizer"],
        "eot_id": shape["eot_id"],
    }
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")


WRITERS = {"hf": _write_hf, "safetensors": _write_safetensors}


def _write_llama(d: Path, sd: dict, shape: dict, tok, dtype: str, fmt: str) -> None:
    """Both formats are HF's LlamaForCausalLM files (HF's names are stalwart's); safetensors
    adds its "format" tag and the tokenizer spec to config.json."""
    cfg = shape["model_cfg"]
    config = llama_weights.hf_config(cfg, shape["vocab_size"], shape["eot_id"], dtype)
    if fmt == "safetensors":
        config |= {"format": llama_weights.SAFETENSORS_FORMAT, "tokenizer": shape["tokenizer"]}
    hf = llama_weights.to_hf_state(sd, cfg.tie_embeddings)
    save_file(hf, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = generation_config(shape["eot_id"])
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _shape(sd: dict, cfg) -> dict:
    if cfg.model.arch == "llama":
        vocab = int(sd["model.embed_tokens.weight"].shape[0])
        return {"model_cfg": cfg.model, "vocab_size": vocab, "block_size": cfg.model.block_size,
                "bias": False}  # fmt: skip
    return {**shape_of(sd), "n_head": cfg.model.n_head, "dropout": cfg.model.dropout}


def _tokenizer(ckpt: Path, meta: dict, data_dir: str, notes: list[str]):
    try:
        return checkpoint_tokenizer(ckpt, meta, data_dir)
    except UserError:
        if meta.get("tokenizer") != "gpt2":
            raise
        notes.append(
            "no tokenizer files written: tiktoken's GPT-2 vocabulary could not be loaded (set "
            "TIKTOKEN_CACHE_DIR to a cached copy and export again, or use the tokenizer files of "
            "openai-community/gpt2: the same vocabulary)"
        )
        return None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty: choose another --out or --force")


def export(path: str | Path, fmt: str, out: str | Path, dtype: str = "fp32", force=False) -> dict:
    """Write the newest valid checkpoint of a run (or a checkpoint dir) as an artifact."""
    if fmt not in WRITERS:
        raise UserError(f"--format must be hf or safetensors, got {fmt!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
    out = Path(out)
    _check_out(out, force)
    ckpt = resolve_checkpoint(path)
    cfg_dict, meta = read_meta(ckpt)
    cfg = from_dict(cfg_dict)
    sd = {k: v.to(DTYPES[dtype]) for k, v in ck.read_model_state(ckpt).items()}
    shape = _shape(sd, cfg)
    notes: list[str] = []
    tok = _tokenizer(ckpt, meta, cfg.data.dir, notes)
    spec = meta.get("tokenizer", "byte")
    eot = tok.eot_id if tok is not None else 50256  # None only for gpt2 offline: its <|endoftext|>
    shape |= {"tokenizer": spec, "eot_id": eot}
    if fmt == "hf" and not shape["bias"] and cfg.model.arch == "gpt2":
        notes.append("the model has no biases and GPT2LMHeadModel always does: zeros were written")
    step = ck.verify(ckpt).step
    info = {"format": fmt, "arch": cfg.model.arch, "dtype": dtype, "tokenizer": spec}
    info |= {"bias": shape["bias"], "source": str(ckpt), "step": step, "notes": notes}
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # written aside and renamed: a failed export leaves nothing that looks complete
        if cfg.model.arch == "llama":
            _write_llama(tmp, sd, shape, tok, dtype, fmt)
        else:
            WRITERS[fmt](tmp, sd, shape, tok, dtype)
        if tok is not None:
            write_tokenizer_files(tmp, tok, shape["block_size"])
        (tmp / "stalwart.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(v.numel() for v in sd.values())
    return {"out": out, "checkpoint": ckpt, "step": step, "params": params, "notes": notes}


# ----------------------------------------------------------------------------------------------
# Import: run.init_from


def fit_problems(src: dict, cfg, vocab_size: int) -> list[str]:
    """Why weights of shape `src` cannot initialise a model of config `cfg` (empty: they can)."""
    out = []
    for name in ("n_layer", "n_head", "n_embd"):
        have, got = getattr(cfg, name), src.get(name)
        if got is not None and got != have:
            out.append(f"{name} is {got}, the model's {have} (set --model.{name} {got})")
    v = src["vocab_size"]
    if v != vocab_size:  # the model's comes from --model.vocab_size or else the dataset's
        out.append(
            f"vocab_size is {v}, the model's {vocab_size} (prepare the data with the "
            f"checkpoint's tokenizer and set --model.vocab_size {v})"
        )
    if src["block_size"] < cfg.block_size:
        out.append(
            f"block_size is {src['block_size']}, the model's {cfg.block_size} "
            f"(set --model.block_size {src['block_size']} or less)"
        )
    if src["bias"] and not cfg.bias and not src["zero_bias"]:
        out.append("it has biases, the model none (set --model.bias true)")
    if not src["bias"] and cfg.bias:
        out.append("it has no biases, the model has (set --model.bias false)")
    return out


def _load_llama_init(model: torch.nn.Module, path: str | Path) -> dict:
    """init_from for a llama: a HF Llama dir, a llama export or run; shapes checked first."""
    sd, src = llama_weights.read_llama(path)
    problems = llama_weights.fit_problems(src, model.cfg, model.vocab_size)
    if problems:
        raise UserError(f"--run.init_from {path} does not fit the model: {'; '.join(problems)}")
    target = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in sd.items()
           if k in target and v.shape != target[k].shape]  # fmt: skip
    if bad:
        raise UserError(f"--run.init_from {path}: tensor shapes differ: {', '.join(bad[:3])}")
    ck.load_model_state(model, sd)
    return {"arch": "llama", "n_layer": src.n_layer, "n_embd": src.n_embd}


def load_init_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Copy a GPT-2's weights into `model` (for fine-tuning) after checking they fit it.

    The model is built from --model.*, which must describe the source's shape: a mismatch is a
    UserError naming each difference and the flag to set. Two differences are allowed: a
    longer context (wpe is cropped to block_size, as nanoGPT's crop_block_size) and all-zero
    biases into a bias=False model (an HF export of one).
    """
    if model.cfg.arch == "llama":
        return _load_llama_init(model, path)
    if llama_weights.is_llama_dir(Path(path)):
        raise UserError(f"--run.init_from {path} is a Llama model: set --model.arch llama")
    sd, src = read_source(path)
    problems = fit_problems(src, model.cfg, model.vocab_size)
    if problems:
        raise UserError(f"--run.init_from {path} does not fit the model: {'; '.join(problems)}")
    if src["block_size"] > model.cfg.block_size:
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][: model.cfg.block_size]
    if src["bias"] and not model.cfg.bias:
        sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    target = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if bad:
        raise UserError(f"--run.init_from {path}: tensor shapes differ: {', '.join(bad[:3])}")
    ck.load_model_state(model, sd)  # copies (and casts) in place; names missing/extra keys
    return src
