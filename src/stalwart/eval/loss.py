"""Held-out loss: the only honest measure of generalization (the lesson), on fixed batches."""

from __future__ import annotations

import torch

from stalwart import parallel


@torch.no_grad()
def evaluate(model, batches, prec, ctx) -> float:
    """Mean held-out loss over the fixed eval batches (this rank's share, averaged over ranks)."""
    model.eval()
    total = torch.zeros((), device=prec.device)
    for x, y in batches:
        with prec.autocast():
            _, loss = model(x.to(prec.device), y.to(prec.device))
        total += loss.float()
    model.train()
    return float(parallel.mean_across_ranks_tensor(total / max(len(batches), 1), ctx))
