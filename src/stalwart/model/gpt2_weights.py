"""GPT-2 weights in every layout stalwart meets: its own, Hugging Face's, nanoGPT's.

stalwart's parameter names are GPT-2's (`transformer.h.0.attn.c_attn.weight`, ...), so moving
weights to and from Hugging Face is a rename-free copy with two details:
- HF's GPT-2 uses `Conv1D` (y = x W + b, W stored (in, out)) where stalwart uses `nn.Linear`
  (W stored (out, in)): the four projection matrices of every block are transposed.
- `lm_head.weight` is tied to `transformer.wte.weight`: stored once, `tie_word_embeddings`.
The GELU is the tanh approximation on both sides ("gelu_new"), LayerNorm eps 1e-5.

`read_source` reads a Hugging Face GPT-2 directory, a nanoGPT `ckpt.pt`, a stalwart
run/checkpoint or an export, and normalises it to stalwart's names and layout. Pickles are read
with `weights_only=True`: a file that needs code to unpickle is refused, and no code in it runs.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.locate import read_meta, resolve_checkpoint
from stalwart.errors import UserError

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_FORMAT = "stalwart-gpt2"  # config.json "format" of `--format safetensors`
NOT_A_MODEL = (
    "is not a model: expected a Hugging Face GPT-2 directory (config.json + model.safetensors), "
    "a nanoGPT ckpt.pt, a stalwart run or checkpoint directory, or a stalwart export"
)
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")
_ATTN_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")  # HF's causal-mask buffers, not weights


# ----------------------------------------------------------------------------------------------
# Layout: stalwart (nn.Linear) <-> Hugging Face (Conv1D)


def block_biases(n_layer: int, n_embd: int) -> dict[str, int]:
    """Every bias of a GPT-2 and its length (what a bias=False model leaves out)."""
    C = n_embd
    sizes = {"ln_1": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "ln_2": C}
    sizes |= {"mlp.c_fc": 4 * C, "mlp.c_proj": C}
    out = {f"transformer.h.{i}.{k}.bias": n for i in range(n_layer) for k, n in sizes.items()}
    return out | {"transformer.ln_f.bias": C}


def to_hf_state(sd: dict[str, torch.Tensor], n_layer: int, n_embd: int) -> dict:
    """stalwart weights -> GPT2LMHeadModel weights (same names; Conv1D transposed; biases)."""
    out = {}
    for k, v in sd.items():
        if k == ck.TIED:
            continue
        out[k] = v.t().contiguous() if k.endswith(CONV1D) else v.contiguous()
    for k, n in block_biases(n_layer, n_embd).items():
        # GPT2LMHeadModel always has biases: a bias=False model exports zeros, same outputs
        out.setdefault(k, torch.zeros(n, dtype=sd["transformer.wte.weight"].dtype))
    return out


def normalize(sd: dict, where: Path) -> dict[str, torch.Tensor]:
    """Any GPT-2 state dict (HF, nanoGPT, compiled, DDP) -> stalwart names and layout."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise UserError(f"{where} holds {type(v).__name__} values: expected a state dict")
        while k.startswith(("_orig_mod.", "module.")):  # torch.compile / DDP wrappers
            k = k.split(".", 1)[1]
        if k.startswith(("h.", "wte.", "wpe.", "ln_f.")):  # GPT2Model files have no prefix
            k = "transformer." + k
        if not _ATTN_BUFFER.search(k):
            out[k] = v
    wte = out.get("transformer.wte.weight")
    if wte is None or "transformer.wpe.weight" not in out:
        raise UserError(f"{where} has no GPT-2 weights (no transformer.wte/wpe.weight)")
    head = out.pop(ck.TIED, None)
    if head is not None and not torch.equal(head, wte):
        raise UserError(f"{where} has an untied lm_head: stalwart ties it to wte (GPT-2)")
    fc = out.get("transformer.h.0.mlp.c_fc.weight")
    if fc is not None and fc.shape[0] == wte.shape[1]:  # (C, 4C): Conv1D layout
        out = {k: v.t().contiguous() if k.endswith(CONV1D) else v for k, v in out.items()}
    return out


def shape_of(sd: dict[str, torch.Tensor]) -> dict:
    """The architecture the weights imply (n_head excepted: no tensor shows it)."""
    layers = [int(m.group(1)) for k in sd if (m := _LAYER.match(k))]
    biases = [v for k, v in sd.items() if k.endswith(".bias")]
    vocab, n_embd = sd["transformer.wte.weight"].shape
    return {
        "n_layer": max(layers) + 1 if layers else 0,
        "n_embd": int(n_embd),
        "vocab_size": int(vocab),
        "block_size": int(sd["transformer.wpe.weight"].shape[0]),
        "bias": bool(biases),
        "zero_bias": all(not v.any() for v in biases),
    }


# ----------------------------------------------------------------------------------------------
# Reading a foreign (or our own) model


def load_pickle(path: Path) -> object:
    """torch.load with weights_only=True: tensors and containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        other = re.search(r"WeightsUnpickler error: ([^\n]*?)(\.|$)", str(e), re.M)
        why = f"it calls {glob.group(1)}" if glob else other.group(1) if other else "see torch.load"
        raise UserError(
            f"{path} is not a plain state dict ({why}): loading it would run code, so it was "
            "refused; re-save it as torch.save({'model': model.state_dict(), 'model_args': ...})"
        ) from None
    except Exception as e:  # not a zip/pickle at all, truncated, ...
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _read_pickled(path: Path) -> tuple[dict, dict]:
    obj = load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # nanoGPT's ckpt.pt
        args = obj.get("model_args") if isinstance(obj.get("model_args"), dict) else {}
        return obj["model"], args
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], {}
    if isinstance(obj, dict):
        return obj, {}
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a JSON object")
    return obj


def check_hf_config(cfg: dict, path: Path) -> None:
    """Refuse GPT-2 variants that stalwart's model would compute differently."""
    if cfg.get("model_type") != "gpt2":
        raise UserError(f"{path} is a {cfg.get('model_type')!r} model: only GPT-2 can be imported")
    n_inner = cfg.get("n_inner") or 4 * cfg.get("n_embd", 0)
    checks = {
        "activation_function": cfg.get("activation_function", "gelu_new")
        in ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12,
        "n_inner": n_inner == 4 * cfg.get("n_embd", 0),
        "scale_attn_by_inverse_layer_idx": not cfg.get("scale_attn_by_inverse_layer_idx"),
        "scale_attn_weights": cfg.get("scale_attn_weights", True),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise UserError(f"{path} is a GPT-2 variant stalwart does not implement: {', '.join(bad)}")


def _hf_weights(d: Path) -> dict:
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    if (d / "model.safetensors.index.json").is_file():  # sharded
        shards = set(_read_json(d / "model.safetensors.index.json").get("weight_map", {}).values())
        return {k: v for s in sorted(shards) for k, v in load_file(str(d / s)).items()}
    if (d / "pytorch_model.bin").is_file():
        return _read_pickled(d / "pytorch_model.bin")[0]
    raise UserError(f"{d} has a config.json but no model.safetensors or pytorch_model.bin")


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights in stalwart names and layout, shape) of any importable model.

    The shape is what the weights imply plus n_head (and the tokenizer spec) where recorded.
    """
    p = Path(path)
    extra: dict = {}
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if p.is_file():
        sd, args = (load_file(str(p)), {}) if p.suffix == ".safetensors" else _read_pickled(p)
        extra = {"n_head": args.get("n_head")}
    elif (p / "config.json").is_file():
        cfg = _read_json(p / "config.json")
        if cfg.get("format") == SAFETENSORS_FORMAT:
            sd = load_file(str(p / "model.safetensors"))
        else:
            check_hf_config(cfg, p / "config.json")
            sd = _hf_weights(p)
        extra = {"n_head": cfg.get("n_head"), "tokenizer": cfg.get("tokenizer")}
    elif (p / ck.MANIFEST).is_file() or (p / "checkpoints").is_dir():
        ckpt = resolve_checkpoint(p)
        cfg, meta = read_meta(ckpt)
        sd = ck.read_model_state(ckpt)
        extra = {"n_head": cfg["model"]["n_head"], "tokenizer": meta.get("tokenizer")}
    else:
        raise UserError(f"{p} {NOT_A_MODEL}")
    sd = normalize(sd, p)
    return sd, {**shape_of(sd), **extra}
