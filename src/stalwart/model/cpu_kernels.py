"""stalwart's CPU kernels for fp32 training (`train.cpu_kernels`, on by default).

On a CPU in fp32 a GPT-2 step is three quarters matrix products, and torch leaves speed in
three places (measured on this 2-core AMD EPYC, docs/throughput.md):

* torch's CPU build multiplies with MKL, which on AMD runs ~15% under OpenBLAS here;
* causal attention through SDPA splits, transposes and copies q/k/v and computes more of the
  T x T scores than the causal mask keeps;
* GPT-2's tanh GELU runs a 1-ULP tanh that costs ~3 ns an element.

`csrc/cpu_kernels.cpp` does the Linears' products with OpenBLAS (the `scipy-openblas32` wheel),
causal attention straight from c_attn's (B, T, 3C) output into c_proj's input, and the GELU as
x * sigmoid(2z) (the same function). Each is the same math as torch's, to fp32 rounding, and
saves exactly what torch's saves for backward, so the memory planner's replay stays true. Each
output element comes from one thread in a fixed order: results do not depend on scheduling,
and a resumed run stays bit-exact.

The source is compiled once per machine on first use (torch.utils.cpp_extension, ~20 s; the
Makefile's set-up does it) into torch's extension cache (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions), with -march=native, and reused after. They apply to CPU float32
tensors outside autocast and outside torch.compile; attention only without dropout. Where they
do not apply, or cannot be built (no C++ compiler, no OpenBLAS wheel for the platform), the
model runs torch's ops and the run says so once on stderr.

    python -m stalwart.model.cpu_kernels   # build now and check the result against torch
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from stalwart import hardware

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]

_module: ModuleType | None = None
_unavailable: str | None = None  # why they cannot be used in this process


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernels; raises if they cannot be built."""
    import scipy_openblas32  # the OpenBLAS the kernels link against
    from torch.utils.cpp_extension import get_default_build_root, load

    try:  # the pip `ninja` puts its binary beside the package, not always on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    lib = scipy_openblas32.get_lib_dir()
    ldflags = [f"-L{lib}", f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{lib}"]
    # -march=native: the name carries the CPU, the flags, the source and torch's version, so
    # a cache shared between machines or versions never hands one a build for another
    key = "\n".join([SOURCE.read_text(), *CFLAGS, *ldflags, torch.__version__, _cpu_model()])
    name = "stalwart_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    if not any(root.glob(f"**/{name}/{name}.so")):  # a pause at start deserves a word
        print(
            "note: train.cpu_kernels: compiling stalwart's CPU kernels for this machine "
            "(once, ~20 s)",
            file=sys.stderr,
            flush=True,
        )
    return load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=CFLAGS,
        extra_ldflags=ldflags,
        verbose=verbose,
    )


def kernels() -> ModuleType | None:
    """The compiled kernels, built on first use; None (and one note on stderr) if they can't."""
    global _module, _unavailable
    if _module is not None or _unavailable is not None:
        return _module
    try:
        _module = build()
    except Exception as e:  # no compiler, no ninja, no OpenBLAS wheel, a read-only cache
        msg = str(e).strip().splitlines()
        _unavailable = f"{type(e).__name__}: {msg[0] if msg else ''}"
        print(
            f"note: train.cpu_kernels: stalwart's CPU kernels are unavailable "
            f"({_unavailable[:160]}); using torch's",
            file=sys.stderr,
        )
    return _module


def unavailable_reason() -> str | None:
    return _unavailable


def applies(x: torch.Tensor) -> bool:
    """Whether a kernel may take `x` (the caller also checks its own switch)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and kernels() is not None
    )


def _calibration_matmul(a: torch.Tensor, b: torch.Tensor):
    """For hardware's peak calibration: a @ b as the Linears compute it (x W^T, OpenBLAS)."""
    if kernels() is None:
        return None
    w = b.t().contiguous()
    return lambda: _module.linear_forward(a, w, None)


hardware.MATMUL_BACKENDS.append(_calibration_matmul)


# ---- autograd ---------------------------------------------------------------------------


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _module.linear_forward(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _module.linear_backward(
            grad.contiguous(), x, weight, need[0], need[1], ctx.has_bias and need[2]
        )
        return dx, dw, db if ctx.has_bias else None


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head):
        y, lse = _module.attention_forward(qkv, n_head)
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head = n_head
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qkv, y, lse = ctx.saved_tensors
        return _module.attention_backward(grad.contiguous(), qkv, y, lse, ctx.n_head), None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _module.gelu_forward(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _module.gelu_backward(grad.contiguous(), x)


# ---- what the models call ---------------------------------------------------------------


def linear(x: torch.Tensor, layer: torch.nn.Linear, on: bool) -> torch.Tensor:
    """`layer(x)`, through OpenBLAS when `on` and the kernels apply."""
    w, b = layer.weight, layer.bias
    if on and applies(x) and w.dtype == torch.float32 and w.is_contiguous():
        return _Linear.apply(x.contiguous(), w, b)
    return F.linear(x, w, b)


def causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, 3C) -> (B, T, C): softmax(q k^T / sqrt(d) + causal mask) v per head. The caller
    checks `applies(qkv)` and that there is no dropout."""
    return _CausalAttention.apply(qkv.contiguous(), n_head)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU; the caller checks `applies(x)`."""
    return _Gelu.apply(x.contiguous())


# ---- python -m stalwart.model.cpu_kernels -----------------------------------------------


def _self_check() -> None:
    """Build (or load), and compare the kernels with torch in float64 through a small layer."""
    t0 = time.perf_counter()
    build(verbose=False)
    kernels()
    print(f"built/loaded in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(0)
    B, T, C, H = 2, 100, 96, 3
    x = torch.randn(B, T, C, requires_grad=True)
    lin = torch.nn.Linear(C, 3 * C)
    qkv = linear(x, lin, True)
    y = gelu_tanh(causal_attention(qkv, H))
    y.square().sum().backward()
    got = (x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    x.grad = lin.weight.grad = lin.bias.grad = None
    x64, l64 = x.detach().double().requires_grad_(), torch.nn.Linear(C, 3 * C).double()
    l64.load_state_dict(lin.state_dict())
    q, k, v = (
        t.view(B, T, H, C // H).transpose(1, 2)
        for t in F.linear(x64, l64.weight, l64.bias).split(C, 2)
    )
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    F.gelu(a, approximate="tanh").square().sum().backward()
    for name, g, r in zip(
        ("d x", "d weight", "d bias"), got, (x64.grad, l64.weight.grad, l64.bias.grad)
    ):
        err = ((g.double() - r).abs().max() / r.abs().max()).item()
        print(f"{name}: max error {err:.1e} of the largest element (float64 reference)")
        if err > 1e-4:
            raise SystemExit(f"error: the CPU kernels disagree with torch ({name}: {err:.1e})")


if __name__ == "__main__":
    _self_check()
