"""Muon: momentum, then Newton-Schulz orthogonalisation of each hidden weight matrix's update.

Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/) is the optimizer behind
the fastest public GPT-2 speedruns (modded-nanogpt). For a weight matrix W (out x in) with
gradient G, momentum μ and learning rate lr_muon:

    B ← μ B + (1 - μ) G                  momentum (an EMA of the gradient)
    U = (1 - μ) G + μ B                  Nesterov: look one step ahead along the momentum
    O ≈ orthogonalise(U)                 5 Newton-Schulz iterations: U = A Σ Cᵀ  ->  ≈ A Cᵀ
    W ← W (1 - lr_muon λ)                decoupled weight decay, as AdamW
    W ← W - lr_muon sqrt(max(1, out/in)) O

Orthogonalising sets every singular value of the update to about 1: the step moves W by the
same amount in every direction of its row/column spaces instead of mostly along the few
directions that dominate the gradient. The shape factor keeps the per-element step size of tall
matrices (the MLP's up-projection, 4C x C) comparable to square ones.

Only the 2-D matrices *inside* the blocks get Muon. The token and position embeddings (and the
head, tied to the token embedding here), biases and norm gains are not "linear maps between
hidden states" and are trained with AdamW, in the same optimizer (Keller Jordan's
MuonWithAuxAdam). Extra state per parameter: 1 tensor (`momentum_buffer`) for a Muon matrix,
2 tensors (`exp_avg`, `exp_avg_sq`) for the AdamW ones.

Learning rates: `optim.lr` is the AdamW part's peak LR and drives the schedule; Muon's matrices
step at `optim.muon_lr` at peak. The loop writes the scheduled LR into every group's "lr" each
step; a Muon group multiplies it by its `lr_ratio` (= muon_lr / lr), so warmup and decay apply to
both parts in proportion. Momentum is `optim.momentum` (the reference uses 0.95).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from stalwart.config import OptimConfig
from stalwart.optim.reference import adam_state, adam_update_

# Quintic Newton-Schulz coefficients (Keller Jordan): chosen to maximise the slope at zero so
# that 5 iterations pull every singular value into roughly [0.7, 1.2] (not exactly 1, which
# does not hurt training and saves iterations).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
_NOT_HIDDEN = ("wte", "wpe", "lm_head", "embed")


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """≈ U Vᵀ for G = U Σ Vᵀ, by the odd polynomial X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X.

    Dividing by the Frobenius norm first puts every singular value in (0, 1], where the iteration
    converges. The iteration works on the short side (X Xᵀ is the smaller Gram matrix). On CUDA it
    runs in bf16 as the reference does (tensor cores; the result is only approximately
    orthogonal anyway); on CPU in fp32, where bf16 matmuls are many times slower.
    """
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def _orthogonalise(update: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz of the whole matrix, also when FSDP2 shards it (a DTensor: each rank holds
    some rows). Orthogonalising a shard alone would be a different update, so the matrix is
    all-gathered, every rank runs the same iteration on it, and keeps its own rows (no second
    collective: `src_data_rank=None` takes each rank's local copy as the truth). DDP and ZeRO-1
    step on full gradients and take the plain path."""
    local = getattr(update, "_local_tensor", None)
    if local is None:
        return newton_schulz(update)
    from torch.distributed.tensor import distribute_tensor

    full = newton_schulz(update.full_tensor())
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


def shape_scale(shape: torch.Size) -> float:
    """sqrt(max(1, rows / cols)): an orthogonal (rows x cols) matrix has RMS entry
    1/sqrt(max(rows, cols)); this lifts tall matrices to the RMS of square ones."""
    return max(1.0, shape[0] / shape[1]) ** 0.5


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A weight matrix that maps hidden states to hidden states (Muon's domain)."""
    return p.dim() == 2 and not any(k in name for k in _NOT_HIDDEN)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True`, AdamW for the others (see the module docstring).

    Group keys: lr (the scheduled LR, rewritten by the loop), lr_ratio (the group's LR is
    lr * lr_ratio), weight_decay, momentum (Muon groups), betas and eps (AdamW groups).
    """

    def __init__(
        self,
        groups,
        lr: float = 6e-4,
        lr_ratio: float = 1.0,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_muon: bool = False,
    ):
        # every group key is an argument, so a rebuild from `defaults` (ZeRO-1) keeps them all
        defaults = dict(
            lr=lr, lr_ratio=lr_ratio, momentum=momentum, betas=betas, eps=eps,
            weight_decay=weight_decay, use_muon=use_muon,
        )  # fmt: skip
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_ratio"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon_update(w, lr, group)
                else:
                    self._adamw_update(w, lr, group)
        return loss

    def _muon_update(self, w: torch.Tensor, lr: float, group: dict) -> None:
        state = self.state[w]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(w)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(w.grad, 1 - mu)
        update = w.grad.lerp(buf, mu)  # Nesterov
        ortho = _orthogonalise(update) * shape_scale(w.shape)
        if group["weight_decay"]:
            w.mul_(1 - lr * group["weight_decay"])
        w.add_(ortho, alpha=-lr)

    def _adamw_update(self, w: torch.Tensor, lr: float, group: dict) -> None:
        state = adam_state(self.state[w], w)
        if group["weight_decay"]:
            w.mul_(1 - lr * group["weight_decay"])
        beta1, beta2 = group["betas"]
        adam_update_(
            w, w.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr, beta1, beta2,
            group["eps"],
        )  # fmt: skip


def muon_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Hidden matrices (Muon, decayed), other matrices (AdamW, decayed), the rest (AdamW, 0)."""
    hidden, other, flat = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_hidden_matrix(name, p):
            hidden.append(p)
        else:
            (other if p.dim() >= 2 else flat).append(p)
    ratio = cfg.muon_lr / cfg.lr
    return [
        {"params": hidden, "use_muon": True, "lr_ratio": ratio, "weight_decay": cfg.weight_decay},
        {"params": other, "use_muon": False, "weight_decay": cfg.weight_decay},
        {"params": flat, "use_muon": False, "weight_decay": 0.0},
    ]


def build(cfg: OptimConfig, model: nn.Module) -> Muon:
    groups = [g for g in muon_param_groups(model, cfg) if g["params"]]
    return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
