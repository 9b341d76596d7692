"""train.fused_gelu: the compiled sigmoid-form GELU is GPT-2's tanh GELU, in training too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from stalwart.config import ModelConfig
from stalwart.model import kernels
from stalwart.model.gpt import build_model
from stalwart.model.kernels import gelu_tanh
from stalwart.train import train
from tests.conftest import ROOT, crash_and_resume, tiny_config
from tests.test_train import _losses


def _inputs():
    torch.manual_seed(0)
    wide = torch.randn(3, 40, 96) * 4
    edges = torch.tensor([0.0, 1e-6, -1e-6, 0.5, -0.5, 3.0, -3.0, 9.0, -9.0, 30.0, -30.0, 80.0])
    return [wide, edges, torch.randn(96, 40).t()]  # the last one is not contiguous


@pytest.mark.parametrize("i", range(3))
def test_fused_gelu_is_gpt2s_tanh_gelu(i):
    x = _inputs()[i]
    grad = torch.randn_like(x)
    fused_x, torch_x, exact_x = (
        x.clone().requires_grad_(),
        x.clone().requires_grad_(),
        x.double().requires_grad_(),
    )
    y = gelu_tanh(fused_x, fused=True)
    assert kernels._kernels is not None, kernels._unavailable  # the compiled path really ran
    y.backward(grad)
    F.gelu(torch_x, approximate="tanh").backward(grad)
    exact = F.gelu(exact_x, approximate="tanh")
    exact.backward(grad.double())
    # as close to the float64 truth as torch's own fp32 kernel (within a small factor: the two
    # round differently; in the far negative tail the sigmoid form is the more exact one)
    torch_y = F.gelu(x, approximate="tanh").double()
    fwd_err, torch_fwd_err = (y.double() - exact).abs().max(), (torch_y - exact).abs().max()
    bwd_err = (fused_x.grad.double() - exact_x.grad).abs().max()
    torch_bwd_err = (torch_x.grad.double() - exact_x.grad).abs().max()
    assert fwd_err <= 1e-6 * (1 + exact.abs().max())
    assert bwd_err <= 1e-5 * (1 + exact_x.grad.abs().max())
    assert fwd_err <= 4 * torch_fwd_err + 1e-6 and bwd_err <= 4 * torch_bwd_err + 1e-6
    assert y.shape == x.shape and fused_x.grad.shape == x.shape


def test_fused_gelu_leaves_other_dtypes_and_the_default_to_torch():
    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(gelu_tanh(x, fused=True), F.gelu(x, approximate="tanh"))
    x32 = torch.randn(5, 7)
    assert torch.equal(gelu_tanh(x32), F.gelu(x32, approximate="tanh"))  # fused=False


@pytest.mark.parametrize("spec", ["selective", "full"])
def test_fused_gelu_under_activation_checkpointing_gives_identical_gradients(spec):
    base = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(0)
    ref = build_model(base, 64).train()
    ck = build_model(ModelConfig(**{**base.__dict__, "activation_checkpointing": spec}), 64)
    ck.load_state_dict(ref.state_dict())
    ck.train()
    for m in (ref, ck):
        m.set_fused_gelu(True)
    x = torch.randint(0, 64, (4, 16))
    for m in (ref, ck):
        m(x, x)[1].backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ck.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


def assert_trains_like_torch_and_resumes_bit_exact(tmp_path, tiny_data, kernels, torch_ops):
    """A run on other kernels (`kernels` flags) against one on torch's (`torch_ops`): another
    computation of the same function, and a crash-and-resume of it is bit-exact. Returns the
    uninterrupted run's result."""
    full, resumed = crash_and_resume(tmp_path, tiny_data, *kernels)
    train(tiny_config(tmp_path / "torch", tiny_data, *torch_ops), progress=False)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "torch")
    assert a != b  # really another kernel ...
    assert a == pytest.approx(b, rel=1e-4)  # ... for the same function
    assert _losses(tmp_path / "part") == a  # resumed after a crash at step 13: bit-exact
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    return full


def test_fused_gelu_trains_like_torch_and_resumes_bit_exact(tmp_path, tiny_data):
    torch_ops = ("--train.cpu_kernels", "false")  # (train.cpu_kernels has a GELU of its own)
    fused = ("--train.fused_gelu", "true", *torch_ops)
    assert_trains_like_torch_and_resumes_bit_exact(tmp_path, tiny_data, fused, torch_ops)


@pytest.mark.slow
def test_without_a_cxx_compiler_it_falls_back_to_torch(tmp_path):
    """A real failing compile (no usable C++ compiler, an empty kernel cache): one note on
    stderr, and the result is torch's kernel, bit for bit."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from stalwart.model.kernels import gelu_tanh\n"
        "x = torch.randn(64, 33)\n"
        "assert torch.equal(gelu_tanh(x, fused=True), F.gelu(x, approximate='tanh'))\n"
        "print('ok')\n"
    )
    env = {
        **os.environ,
        "CXX": "/bin/false",
        "CC": "/bin/false",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
    notes = [line for line in out.stderr.splitlines() if line.startswith("note: train.fused_gelu")]
    assert len(notes) == 1 and "using torch's F.gelu" in notes[0]
