"""The lesson's optimizers written out from first principles: SGD, momentum, Adam, AdamW.

Each is a `torch.optim.Optimizer` subclass, so param groups (each with its own hyperparameters),
`state_dict()` / `load_state_dict()` and a loop that rewrites `group["lr"]` every step all work
exactly as with `torch.optim`. They follow torch's conventions (where the decay goes, what the
first momentum step is), and `tests/test_optimizers.py` proves them equal to `torch.optim`: bit
for bit against its for-loop code path, to within float rounding against its fused kernel. The
math is in the docstrings; the code keeps torch's order of operations (a fused multiply-add
here, a division there) so that the rounding matches too.

Notation: w weights, g gradient, lr learning rate, λ weight decay, t the step (from 1).
"""

from __future__ import annotations

import torch

from stalwart.config import OptimConfig


def adam_state(state: dict, w: torch.Tensor) -> dict:
    """An Adam parameter's state (step, moments; created at its first update), its step
    counted for the update about to happen."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(w)
        state["exp_avg_sq"] = torch.zeros_like(w)
    state["step"] += 1
    return state


def adam_update_(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One Adam step on w from gradient g at step t (from 1); m and v are updated in place.

    Shared by Adam, AdamW and the AdamW part of Muon (which differ only in the weight decay,
    applied by the caller). m̂'s bias correction is folded into the step size and the division
    fused into the update (`addcdiv_`), as torch does, so the rounding matches it bit for bit.
    """
    m.lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g        (first moment: the mean)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 v + (1 - beta2) g²  (second)
    # Both averages start at 0, so early on they underestimate the moments by (1 - beta^t):
    # divide it out (bias correction). Step 1 then moves every weight by lr (eps aside).
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    denom = (v.sqrt() / bc2**0.5).add_(eps)  # sqrt(v̂) + eps
    w.addcdiv_(m, denom, value=-lr / bc1)  # w -= lr * m̂ / (sqrt(v̂) + eps)


class SGD(torch.optim.Optimizer):
    """Plain gradient descent: `w ← w - lr (g + λ w)`.

    Extra state per parameter: none (0 tensors). The weight decay is an L2 term added to the
    gradient, as in `torch.optim.SGD`.
    """

    def __init__(self, params, lr: float = 1e-2, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad.add(w, alpha=group["weight_decay"]) if group["weight_decay"] else w.grad
                w.add_(g, alpha=-group["lr"])
        return loss


class Momentum(torch.optim.Optimizer):
    """SGD with (heavy-ball) momentum, torch's convention:

        g ← g + λ w;   b ← μ b + g;   w ← w - lr b          (b starts at 0, so b₁ = g₁)

    The velocity b is a running *sum* (not mean) of past gradients: at a steady gradient it
    reaches g / (1 - μ), so the effective step is lr / (1 - μ) — 10x lr at μ = 0.9.
    Extra state per parameter: 1 tensor (`momentum_buffer`).
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad.add(w, alpha=group["weight_decay"]) if group["weight_decay"] else w.grad
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                b = state["momentum_buffer"]
                b.mul_(group["momentum"]).add_(g)
                w.add_(b, alpha=-group["lr"])
        return loss


class Adam(torch.optim.Optimizer):
    """Adam with bias correction and *coupled* weight decay (L2 in the gradient):

        g ← g + λ w
        m ← β1 m + (1 - β1) g            v ← β2 v + (1 - β2) g²
        m̂ = m / (1 - β1^t)               v̂ = v / (1 - β2^t)
        w ← w - lr m̂ / (sqrt(v̂) + ε)

    The decay passes through the adaptive scaling: a weight with a large v̂ is barely decayed
    at all (Loshchilov & Hutter 2019; AdamW below fixes it).
    Extra state per parameter: 2 tensors (`exp_avg` m, `exp_avg_sq` v), plus the step count t.
    """

    decoupled = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if wd and self.decoupled:
                    w.mul_(1 - lr * wd)  # AdamW: shrink the weights themselves
                elif wd:
                    g = g.add(w, alpha=wd)  # Adam: L2 term joins the gradient
                state = adam_state(self.state[w], w)
                adam_update_(
                    w, g, state["exp_avg"], state["exp_avg_sq"], state["step"], lr, beta1, beta2,
                    group["eps"],
                )  # fmt: skip
        return loss


class AdamW(Adam):
    """Adam with *decoupled* weight decay (torch's convention: decay first, scaled by lr):

        w ← w - lr λ w                   (the only line that differs from Adam)
        m, v, m̂, v̂ as in Adam, from the raw gradient g
        w ← w - lr m̂ / (sqrt(v̂) + ε)

    Every decayed weight shrinks by the same factor (1 - lr λ) whatever its gradient history.
    Extra state per parameter: 2 tensors (`exp_avg`, `exp_avg_sq`), plus the step count t.
    """

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _closure(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def build(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The reference optimizer `cfg.name` over param groups that carry their own weight_decay."""
    if cfg.name == "sgd":
        return SGD(groups, lr=cfg.lr)
    if cfg.name == "momentum":
        return Momentum(groups, lr=cfg.lr, momentum=cfg.momentum)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adam":
        return Adam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    raise ValueError(f"no reference optimizer {cfg.name!r}")  # muon is built by stalwart.optim.muon
