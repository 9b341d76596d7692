"""The reference optimizers against torch.optim, Adam vs AdamW, bias correction, Muon, resume,
and the optimizer-state memory accounting."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn as nn

from stalwart.config import OptimConfig
from stalwart.logs.metrics import read_metrics
from stalwart.model.gpt import build_model
from stalwart.optim import muon
from stalwart.optim import reference as R
from stalwart.optim.build import (
    build_optimizer,
    optimizer_state_bytes,
    optimizer_state_bytes_for,
    param_groups,
    state_tensors_per_param,
)
from tests.conftest import crash_and_resume
from tests.test_model import tiny

STEPS = 120


def small_model() -> nn.Module:
    """Matrices, biases and a norm gain: enough to exercise both param groups."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))


def run(make_opt, group_hparams: list[dict], steps: int = STEPS, lr_wobble: bool = True):
    """Train small_model() `steps` steps on fixed data; the LR of every group changes every step.

    Returns the model and the optimizer. The batches are drawn up front so two runs see the same.
    """
    model = small_model()
    groups = param_groups(model, 0.0)
    for g, extra in zip(groups, group_hparams):
        g.pop("names")
        g.update(extra)
    opt = make_opt(groups)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 4, generator=gen)
    idx = torch.randint(0, 64, (steps, 16), generator=gen)
    for s in range(steps):
        if lr_wobble:  # as the loop does: a new LR written into every group, every step
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * (1 + 0.5 * math.cos(0.1 * s))
        opt.zero_grad(set_to_none=True)
        ((model(x[idx[s]]) - y[idx[s]]) ** 2).mean().backward()
        opt.step()
    return model, opt


def assert_same_run(ref, tor):
    (m1, o1), (m2, o2) = ref, tor
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # state by state: same keys, same tensors (torch keeps `step` as a tensor, we as an int)
    for p, q in zip(m1.parameters(), m2.parameters()):
        s1, s2 = o1.state[p], o2.state[q]
        assert set(s1) == set(s2)
        for k in s1:
            if k == "step":
                assert s1[k] == int(s2[k]) == STEPS
            else:
                torch.testing.assert_close(s1[k], s2[k], rtol=1e-6, atol=1e-7)


# (reference, torch, hyperparameters shared by both, torch-only keyword arguments)
PAIRS = {
    "sgd": (R.SGD, torch.optim.SGD, dict(lr=0.1), {}),
    "momentum": (R.Momentum, torch.optim.SGD, dict(lr=0.05, momentum=0.9), {}),
    "adam": (R.Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.95)), {"foreach": False}),
    "adamw": (R.AdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.95)), {"foreach": False}),
}


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_reference_matches_torch(name, decay):
    ref_cls, torch_cls, hp, torch_only = PAIRS[name]
    groups = [{"weight_decay": decay}, {"weight_decay": 0.0}]
    ref = run(lambda g: ref_cls(g, **hp), groups)
    tor = run(lambda g: torch_cls(g, **hp, **torch_only), groups)
    assert_same_run(ref, tor)
    if name != "sgd":
        assert all(len(s) > 0 for s in ref[1].state.values())


@pytest.mark.parametrize("name", PAIRS)
def test_reference_matches_torch_with_groups_of_different_hyperparameters(name):
    ref_cls, torch_cls, hp, torch_only = PAIRS[name]
    groups = [
        {"weight_decay": 0.2, "lr": hp["lr"] * 2},
        {"weight_decay": 0.01, "lr": hp["lr"] / 3},
    ]
    if "momentum" in hp:
        groups[1]["momentum"] = 0.5
    if "betas" in hp:
        groups[1].update(betas=(0.8, 0.99), eps=1e-6)
    ref = run(lambda g: ref_cls(g, **hp), groups)
    tor = run(lambda g: torch_cls(g, **hp, **torch_only), groups)
    assert_same_run(ref, tor)
    assert ref[1].param_groups[1]["lr"] != ref[1].param_groups[0]["lr"]


@pytest.mark.parametrize("name", PAIRS)
def test_reference_is_bit_exact_with_torchs_for_loop_implementation(name):
    """Same operations in the same order as torch's single-tensor code path: not just close,
    equal, after 120 steps with decay and a changing LR."""
    ref_cls, torch_cls, hp, _ = PAIRS[name]
    groups = [{"weight_decay": 0.1}, {"weight_decay": 0.0}]
    (m1, _), (m2, _) = (
        run(lambda g: ref_cls(g, **hp), groups),
        run(lambda g: torch_cls(g, **hp, foreach=False), groups),
    )
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_reference_matches_torchs_fused_kernel(name):
    """`optim.impl torch` uses the fused kernel: a different rounding, the same algorithm."""
    ref_cls, torch_cls, hp, _ = PAIRS[name]
    groups = [{"weight_decay": 0.1}, {"weight_decay": 0.0}]
    (m1, _), (m2, _) = (
        run(lambda g: ref_cls(g, **hp), groups),
        run(lambda g: torch_cls(g, **hp, fused=True), groups),
    )
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_adam_with_decay_differs_from_adamw_with_the_same_decay():
    groups = [{"weight_decay": 0.1}, {"weight_decay": 0.0}]
    hp = dict(lr=1e-2, betas=(0.9, 0.95))
    (m1, _), (m2, _) = (
        run(lambda g: R.Adam(g, **hp), groups, steps=5),
        run(lambda g: R.AdamW(g, **hp), groups, steps=5),
    )
    diff = max((p - q).abs().max().item() for p, q in zip(m1.parameters(), m2.parameters()))
    assert diff > 1e-4
    # and without decay they are the same algorithm
    no_decay = [{"weight_decay": 0.0}, {"weight_decay": 0.0}]
    (m1, _), (m2, _) = (
        run(lambda g: R.Adam(g, **hp), no_decay, steps=5),
        run(lambda g: R.AdamW(g, **hp), no_decay, steps=5),
    )
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_adamw_equals_the_hand_computed_decoupled_rule():
    """w = [1, -2], lr 0.1, λ 0.5, β = (0.5, 0.75), eps 0; gradients [2, 1] then [-2, 1].

    Step 1: decay  w ← w (1 - 0.1·0.5) = [0.95, -1.9]
            m = 0.5·[2, 1] = [1, 0.5];  v = 0.25·[4, 1] = [1, 0.25]
            m̂ = m / 0.5 = [2, 1];      v̂ = v / 0.25 = [4, 1];  m̂/sqrt(v̂) = [1, 1]
            w ← [0.95 - 0.1, -1.9 - 0.1] = [0.85, -2.0]
    Step 2: decay  w ← w · 0.95 = [0.8075, -1.9]
            m = 0.5·[1, 0.5] + 0.5·[-2, 1] = [-0.5, 0.75]
            v = 0.75·[1, 0.25] + 0.25·[4, 1] = [1.75, 0.4375]
            m̂ = m / 0.75 = [-2/3, 1];   v̂ = v / 0.4375 = [4, 1];  m̂/sqrt(v̂) = [-1/3, 1]
            w ← [0.8075 + 0.1/3, -1.9 - 0.1] = [0.840833..., -2.0]
    (Adam would have added λw to the gradient instead, and then divided it by sqrt(v̂).)
    """
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = R.AdamW([w], lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.5)
    for g, expected in (([2.0, 1.0], [0.85, -2.0]), ([-2.0, 1.0], [0.8075 + 0.1 / 3, -2.0])):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], torch.tensor([1.75, 0.4375]).double())


@pytest.mark.parametrize("cls", [R.Adam, R.AdamW])
def test_adam_first_step_moves_every_weight_by_lr(cls):
    """Bias correction: m̂₁ = g, v̂₁ = g², so the step is lr·g/|g| = ±lr wherever g ≠ 0."""
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    model(x).pow(2).mean().backward()
    opt.step()
    for p, p0 in zip(model.parameters(), before):
        nonzero = p.grad != 0
        assert nonzero.any()
        step = (p.detach() - p0)[nonzero]
        torch.testing.assert_close(step.abs(), torch.full_like(step, 1e-3), rtol=1e-3, atol=0)
        assert torch.equal(step.sign(), -p.grad[nonzero].sign())


# ---------------------------------------------------------------------------------------------
# Muon


def test_newton_schulz_orthogonalises():
    gen = torch.Generator().manual_seed(0)
    for shape in [(64, 64), (192, 64), (64, 256)]:
        # a badly conditioned gradient: singular values spread over 2 orders of magnitude
        u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=gen))
        v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen))
        k = min(shape)
        g = u[:, :k] @ torch.diag(torch.logspace(0, -2, k)) @ v[:, :k].T
        ortho = muon.newton_schulz(g)
        assert ortho.shape == g.shape
        s = torch.linalg.svdvals(ortho)
        # the quintic pulls every singular value into a band around 1 (about 0.68-1.2 after 5
        # iterations, by design: exactly 1 would need more iterations and trains no better)
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())
        # same singular vectors: O = U S' Vᵀ, so Uᵀ O V is diagonal
        core = u[:, :k].T @ ortho @ v[:, :k]
        torch.testing.assert_close(core, torch.diag(torch.diagonal(core)), atol=1e-3, rtol=0)


def test_muon_groups_state_and_update():
    model = build_model(tiny(), 256)
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, momentum=0.95)
    opt = build_optimizer(cfg, model)
    hidden, other, flat = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert hidden["use_muon"] and not other["use_muon"] and not flat["use_muon"]
    assert all(".h." in names[id(p)] and p.dim() == 2 for p in hidden["params"])
    assert {names[id(p)] for p in other["params"]} == {
        "transformer.wte.weight",
        "transformer.wpe.weight",
    }
    assert hidden["lr_ratio"] == pytest.approx(20.0) and flat["weight_decay"] == 0.0
    # every group key is a constructor argument: a rebuild from the groups (ZeRO-1) keeps them
    accepted = set(inspect.signature(muon.Muon.__init__).parameters)
    assert all(set(g) - {"params"} <= accepted for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    opt.step()
    for p in hidden["params"]:
        assert set(opt.state[p]) == {"momentum_buffer"}
        # step 1: buffer = (1-μ) g; Nesterov update ∝ g; the step is muon_lr · scale · NS(g)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.05 * p.grad)
        w0 = before[names[id(p)]]
        expected = w0 * (1 - 0.02 * 0.1) - 0.02 * muon.shape_scale(p.shape) * muon.newton_schulz(
            p.grad
        )
        torch.testing.assert_close(p.detach(), expected)
    for p in other["params"] + flat["params"]:
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


# ---------------------------------------------------------------------------------------------
# Optimizer-state memory


@pytest.mark.parametrize("name,ratio", [("sgd", 0), ("momentum", 1), ("adam", 2), ("adamw", 2)])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_state_bytes_are_0x_1x_2x_the_parameter_bytes(name, ratio, impl):
    model = build_model(tiny(), 256)
    cfg = OptimConfig(name=name, impl=impl)
    opt = build_optimizer(cfg, model)
    assert optimizer_state_bytes(opt) == 0  # state is created at the first step
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert optimizer_state_bytes(opt) == ratio * param_bytes
    assert optimizer_state_bytes_for(cfg, tiny(), 256) == ratio * param_bytes
    assert state_tensors_per_param(name) == ratio


def test_muon_state_bytes_measured_equal_predicted():
    model = build_model(tiny(), 256)
    cfg = OptimConfig(name="muon")
    opt = build_optimizer(cfg, model)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    opt.step()
    measured = optimizer_state_bytes(opt)
    assert measured == optimizer_state_bytes_for(cfg, tiny(), 256)
    hidden = sum(p.numel() for p in opt.param_groups[0]["params"])
    total = sum(p.numel() for p in model.parameters())
    assert measured == 4 * (hidden + 2 * (total - hidden))
    assert 4 * total < measured < 8 * total  # between momentum's 1x and AdamW's 2x
    assert optimizer_state_bytes_for(cfg, tiny(), 256, bytes_per_elem=2) == measured // 2


# ---------------------------------------------------------------------------------------------
# Through the real loop: resume bit-exactly with the reference optimizers and with Muon


@pytest.mark.parametrize(
    "opt_args",
    [
        ["--optim.impl", "reference", "--optim.name", "adamw"],
        ["--optim.impl", "reference", "--optim.name", "momentum", "--optim.lr", "0.1"],
        ["--optim.name", "muon"],
    ],
    ids=["reference-adamw", "reference-momentum", "muon"],
)
def test_resume_continues_exactly(tmp_path, tiny_data, opt_args):
    """Crash after step 13 (checkpoint at 10), resume: bit-identical to one uninterrupted run."""
    full, resumed = crash_and_resume(tmp_path, tiny_data, *opt_args)

    def losses(d):
        return [r["train_loss"] for r in read_metrics(d / "metrics.jsonl") if "train_loss" in r]

    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 20
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert losses(tmp_path / "full")[-1] < losses(tmp_path / "full")[0]  # it did train
