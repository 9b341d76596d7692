"""What the GPT-2 and the Llama models share: GPT-2's initialisation and the activation
checkpointing switch, over `self.blocks` (the transformer blocks / decoder layers)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stalwart.config import parse_activation_checkpointing


class TransformerLM(nn.Module):
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_proj", False):
                # each residual branch adds to the stream: 2 per block, keep its variance fixed
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_activation_checkpointing(self, spec: str) -> None:
        kind, every = parse_activation_checkpointing(spec)
        for i, block in enumerate(self.blocks):
            block.checkpointed = kind == "full" or (kind == "every" and i % every == 0)
            block.selective = kind == "selective"

    @staticmethod
    def _with_loss(logits: torch.Tensor, targets: torch.Tensor | None):
        """(logits, loss): the loss in fp32 even under autocast (log-softmax over the vocab
        needs the range); None without targets."""
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss
