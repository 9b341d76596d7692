"""Optimizer construction: decay / no-decay parameter groups, then the chosen algorithm.

Weight decay belongs on the weight matrices (dim >= 2: linear layers and embeddings) and not on
biases or layer-norm gains, which set scales and offsets rather than store features; decaying
them only pulls the network towards a worse parameterisation (the lesson; nanoGPT; GPT-3).
The same two groups feed every optimizer (torch's or the reference ones); Muon splits the
decayed group once more, into hidden matrices (Muon) and embeddings (AdamW).

The optimizer's memory: `optimizer_state_bytes(opt)` measures it from a live optimizer and
`optimizer_state_bytes_for(cfg.optim, cfg.model, vocab)` predicts it from the config alone (the
memory planner uses the latter; tests hold the two against each other).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from stalwart.config import ModelConfig, OptimConfig
from stalwart.errors import UserError
from stalwart.model.gpt import hidden_matrix_params, num_params
from stalwart.optim import muon
from stalwart.optim import reference as reference_optim


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: every trainable tensor with dim >= 2 decayed, the rest not; each exactly once.

    `named_parameters()` yields a tied parameter (wte == lm_head) once, so nothing is counted
    twice; the groups carry the names too, for tests and for the reference optimizers' docs.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {
            "params": [p for _, p in decay],
            "names": [n for n, _ in decay],
            "weight_decay": weight_decay,
        },
        {
            "params": [p for _, p in no_decay],
            "names": [n for n, _ in no_decay],
            "weight_decay": 0.0,
        },
    ]


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused Adam/AdamW kernel runs on CPU and CUDA (and is ~4x the for-loop on CPU)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "muon":  # one implementation, whatever optim.impl says
        return muon.build(cfg, model)
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g.pop("names")  # torch.optim keeps unknown keys in state_dict; keep it minimal
    params = [p for g in groups for p in g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.impl == "reference":
        return reference_optim.build(cfg, groups)
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=_fused_ok(params)
        )
    if cfg.name == "adam":
        # coupled L2: torch's Adam adds weight_decay * w to the gradient (the lesson's "wrong" way)
        return torch.optim.Adam(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=_fused_ok(params)
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.0)
    if cfg.name == "momentum":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise UserError(f"--optim.name {cfg.name} is unknown: use sgd, momentum, adam, adamw or muon")


# ----------------------------------------------------------------------------------------------
# Optimizer-state memory: 0x, 1x or 2x the parameter bytes (the lesson's table).

# Extra tensors, each the size of its parameter, kept per parameter by each algorithm.
_STATE_TENSORS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def state_tensors_per_param(name: str, hidden_matrix: bool = False) -> float:
    """Parameter-sized state tensors per parameter: sgd 0, momentum 1, adam/adamw 2.

    Muon keeps 1 (its momentum) for a hidden matrix and 2 (AdamW's m and v) for everything
    else: pass `hidden_matrix` to say which (see `stalwart.optim.muon.is_hidden_matrix`).
    """
    if name == "muon":
        return 1.0 if hidden_matrix else 2.0
    if name not in _STATE_TENSORS:
        raise UserError(f"--optim.name {name} is unknown: use sgd, momentum, adam, adamw or muon")
    return float(_STATE_TENSORS[name])


def optimizer_state_bytes(opt: torch.optim.Optimizer, include_counters: bool = False) -> int:
    """Bytes held by the optimizer's per-element state, measured on the live tensors.

    Counts every state tensor shaped like its parameter (momenta, moments). The step counters
    (one scalar per parameter tensor in torch's Adam, a Python int in the reference ones) are
    bookkeeping, a few hundred bytes: left out unless `include_counters`. State appears at the
    first step: a fresh optimizer holds 0 bytes.
    """
    total = 0
    for p, state in opt.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and (include_counters or value.shape == p.shape):
                total += value.numel() * value.element_size()
    return total


def optimizer_state_bytes_for(
    cfg_optim: OptimConfig, cfg_model: ModelConfig, vocab_size: int, bytes_per_elem: int = 4
) -> int:
    """What `optimizer_state_bytes` will measure, from the config alone (the memory planner).

    State tensors have their parameter's dtype: bytes_per_elem 4 for fp32 master weights.
    """
    total = num_params(cfg_model, vocab_size)["total"]
    if cfg_optim.name != "muon":
        return int(state_tensors_per_param(cfg_optim.name) * total * bytes_per_elem)
    # Muon's hidden matrices: the blocks' weight matrices; everything else is AdamW's.
    hidden = hidden_matrix_params(cfg_model)
    per_elem = state_tensors_per_param("muon", True) * hidden + state_tensors_per_param(
        "muon", False
    ) * (total - hidden)
    return int(per_elem * bytes_per_elem)
