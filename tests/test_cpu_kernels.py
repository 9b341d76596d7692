"""train.cpu_kernels: stalwart's compiled CPU kernels (OpenBLAS Linears, causal attention read
in place from c_attn's output, GPT-2's GELU) are torch's functions, in training too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stalwart.config import ModelConfig
from stalwart.model import cpu_kernels
from stalwart.model.gpt import build_model
from tests.conftest import run_cli
from tests.test_kernels import assert_trains_like_torch_and_resumes_bit_exact


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.kernels() is not None, cpu_kernels.unavailable_reason()


def _close(got: torch.Tensor, exact: torch.Tensor, tol: float) -> None:
    """Within `tol` of the largest float64 element (fp32 rounding of sums of many terms)."""
    assert got.shape == exact.shape
    err = (got.double() - exact).abs().max().item()
    assert err <= tol * (1 + exact.abs().max().item()), err


@pytest.mark.parametrize(
    "shape,k,n,bias",
    [((37, 5), 5, 7, True), ((3, 20, 64), 64, 192, True), ((2, 9, 48), 48, 11, False)],
)
def test_linear_is_torch_linear(shape, k, n, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(k, n, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    y = cpu_kernels.linear(x, layer, on=True)
    assert y.grad_fn is not None and type(y.grad_fn).__name__.startswith("_Linear")
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if bias else None
    y64 = F.linear(x64, w64, b64)
    y64.backward(g.double())
    _close(y, y64, 1e-6)
    _close(x.grad, x64.grad, 1e-6)
    _close(layer.weight.grad, w64.grad, 1e-6)
    if bias:
        _close(layer.bias.grad, b64.grad, 1e-6)


def _sdpa(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, 2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C)


@pytest.mark.parametrize(
    "B,T,C,H",
    # T = 1; T below, at and across the 64-row blocks; one head; head widths 16, 32, 64
    [
        (2, 1, 32, 2),
        (3, 5, 48, 3),
        (2, 64, 64, 1),
        (2, 65, 64, 4),
        (1, 200, 128, 2),
        (2, 256, 256, 4),
    ],
)
def test_causal_attention_is_sdpa(B, T, C, H):
    torch.manual_seed(0)
    qkv = (torch.randn(B, T, 3 * C) * 2).requires_grad_()
    y = cpu_kernels.causal_attention(qkv, H)
    g = torch.randn_like(y)
    y.backward(g)
    qkv64 = qkv.detach().double().requires_grad_()
    y64 = _sdpa(qkv64, H)
    y64.backward(g.double())
    _close(y, y64, 2e-6)
    _close(qkv.grad, qkv64.grad, 1e-5)
    # and as close as torch's own fp32 SDPA gets (a small factor for different rounding)
    q32 = qkv.detach().clone().requires_grad_()
    _sdpa(q32, H).backward(g)
    own = (q32.grad.double() - qkv64.grad).abs().max().item()
    assert (qkv.grad.double() - qkv64.grad).abs().max().item() <= 4 * own + 1e-6


def test_gelu_is_gpt2s_tanh_gelu():
    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-30, 30, 6001), torch.randn(4096) * 3]).requires_grad_()
    y = cpu_kernels.gelu_tanh(x)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate="tanh")
    y64.backward(g.double())
    _close(y, y64, 1e-6)
    _close(x.grad, x64.grad, 1e-5)
    nan = cpu_kernels.gelu_tanh(torch.tensor([1.0, float("nan"), -2.0]))
    assert nan.isnan().tolist() == [False, True, False]  # a NaN stays a NaN (the doctor sees it)


def _pair(spec: str = "none", dropout: float = 0.0):
    cfg = ModelConfig(
        n_layer=2,
        n_head=2,
        n_embd=64,
        block_size=80,
        dropout=dropout,
        activation_checkpointing=spec,
    )
    torch.manual_seed(0)
    ref = build_model(cfg, 96)
    fast = build_model(cfg, 96)
    fast.load_state_dict(ref.state_dict())
    fast.set_cpu_kernels(True)
    return ref, fast


def test_gpt2_with_the_kernels_is_the_same_model():
    ref, fast = _pair()
    torch.manual_seed(1)
    x, t = torch.randint(0, 96, (3, 80)), torch.randint(0, 96, (3, 80))
    losses = []
    for m in (ref, fast):
        logits, loss = m(x, t)
        loss.backward()
        losses.append(loss)
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        err = ((a.grad - b.grad).abs().max() / a.grad.abs().max()).item()
        assert err < 1e-4, name
    names = {type(n).__name__ for n in _grad_fns(losses[1])}
    assert {"_LinearBackward", "_CausalAttentionBackward", "_GeluBackward"} <= names
    assert not names & {"AddmmBackward0", "GeluBackward0"}
    ref.eval(), fast.eval()
    with torch.no_grad():  # evaluation and generation take them too
        assert torch.allclose(ref(x)[0], fast(x)[0], rtol=1e-4, atol=1e-5)


def _grad_fns(t: torch.Tensor):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions]
    return seen


def test_they_step_aside_where_they_do_not_apply():
    # attention dropout in training: SDPA (the Linears and GELU still take the kernels)
    _, fast = _pair(dropout=0.1)
    x = torch.randint(0, 96, (2, 16))
    names = {type(n).__name__ for n in _grad_fns(fast(x, x)[1])}
    assert "_CausalAttentionBackward" not in names and "_LinearBackward" in names
    # bf16 autocast: torch's ops, in bf16
    _, fast = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = fast(x, x)
    assert logits.dtype == torch.bfloat16
    assert not {type(n).__name__ for n in _grad_fns(loss)} & {"_LinearBackward", "_GeluBackward"}
    # selective checkpointing saves matmul outputs by op: those blocks keep torch's ops
    _, fast = _pair("selective")
    assert not any(b.attn.cpu_kernels or b.mlp.cpu_kernels for b in fast.blocks)
    # float64: torch's
    layer = torch.nn.Linear(4, 3).double()
    x64 = torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(cpu_kernels.linear(x64, layer, on=True), layer(x64))


@pytest.mark.parametrize("spec", ["full", "every:2"])
def test_under_activation_checkpointing_the_gradients_are_identical(spec):
    _, fast = _pair()
    _, ck = _pair(spec)
    x = torch.randint(0, 96, (3, 80))
    for m in (fast, ck):
        m(x, x)[1].backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), ck.named_parameters()):
        assert torch.equal(a.grad, b.grad), n  # the recomputation is bit-identical


def test_a_run_with_the_kernels_trains_like_torch_and_resumes_bit_exact(tmp_path, tiny_data):
    off = ("--train.cpu_kernels", "false")
    full = assert_trains_like_torch_and_resumes_bit_exact(tmp_path, tiny_data, (), off)  # defaults
    assert full.model.cpu_kernels


@pytest.mark.slow
def test_without_a_cxx_compiler_a_run_says_so_and_uses_torch(tmp_path, tiny_data):
    """A real failing build (no usable C++ compiler, an empty extension cache): one note on
    stderr, and the run trains on torch's ops."""
    env = {"CXX": "/bin/false", "CC": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = run_cli(
        "train", "--quiet", "--data.dir", tiny_data, "--run.dir", tmp_path / "run",
        "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2",
        "--model.block_size", "16", "--train.micro_batch", "2", "--train.max_steps", "2",
        "--schedule.warmup_steps", "1", "--train.sample_tokens", "0", "--run.threads", "1",
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    notes = [ln for ln in out.stderr.splitlines() if ln.startswith("note: train.cpu_kernels")]
    assert len(notes) == 2, out.stderr[-2000:]
    assert "compiling stalwart's CPU kernels" in notes[0]  # said before the pause
    assert "unavailable" in notes[1] and notes[1].endswith("using torch's")


def test_the_peak_calibration_times_the_kernels_matmul_too():
    """MFU's CPU peak is the fastest matmul a run can call: hardware's calibration times the
    Linears' OpenBLAS product beside torch.mm (and it computes a @ b)."""
    from stalwart import hardware

    assert cpu_kernels._calibration_matmul in hardware.MATMUL_BACKENDS
    a, b = torch.randn(40, 24), torch.randn(24, 56)
    _close(cpu_kernels._calibration_matmul(a, b)(), (a.double() @ b.double()), 1e-6)


def test_split_over_two_threads_it_is_the_same_and_repeatable():
    """The suite runs on one thread; runs use two or more. Split over threads (rows of a
    Linear, its weight-gradient rows and bias columns, the (batch, head) jobs of attention),
    every kernel still matches float64, and gives the same bits when run again."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40)
    x = torch.randn(3, 37, 48)
    qkv = torch.randn(3, 70, 3 * 48)
    g_lin, g_att = torch.randn(3, 37, 40), torch.randn(3, 70, 48)

    def run():
        xs, qs = x.clone().requires_grad_(), qkv.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = cpu_kernels.linear(xs, layer, on=True)
        y.backward(g_lin)
        a = cpu_kernels.gelu_tanh(cpu_kernels.causal_attention(qs, 4))
        a.backward(g_att)
        return [
            t.detach().clone() for t in (y, xs.grad, layer.weight.grad, layer.bias.grad, a, qs.grad)
        ]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, again = run(), run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    x64, q64 = x.double().requires_grad_(), qkv.double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, b64)
    y64.backward(g_lin.double())
    a64 = F.gelu(_sdpa(q64, 4), approximate="tanh")
    a64.backward(g_att.double())
    for got, exact in zip(first, (y64, x64.grad, w64.grad, b64.grad, a64, q64.grad)):
        _close(got, exact, 1e-5)
