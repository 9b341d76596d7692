"""Optimizer construction: decay / no-decay parameter groups, then the chosen algorithm.

Weight decay belongs on the weight matrices (dim >= 2: linear layers and embeddings) and not on
biases or layer-norm gains, which set scales and offsets rather than store features; decaying
them only pulls the network towards a worse parameterisation (the lesson; nanoGPT; GPT-3).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from stalwart.config import OptimConfig


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
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g.pop("names")  # torch.optim keeps unknown keys in state_dict; keep it minimal
    params = [p for g in groups for p in g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.impl == "reference":
        from stalwart import reference_optim

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
    from stalwart.errors import UserError

    raise UserError(f"--optim.name {cfg.name} needs --optim.impl reference")
