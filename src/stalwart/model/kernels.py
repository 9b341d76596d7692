"""GPT-2's tanh GELU as one fused loop on the CPU (`train.fused_gelu`).

GPT-2's activation ("gelu_new") is 0.5 x (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3).
torch's CPU kernel for `F.gelu(x, approximate="tanh")` evaluates tanh with a 1-ULP SLEEF
routine that costs ~3 ns an element on this AVX2 CPU: forward + backward of the tiny-cpu
model's GELUs take 10-12% of a training step while doing no counted FLOPs. Compiling the same
tanh does not help (inductor emits the same routine).

The identity 0.5 (1 + tanh(z)) = sigmoid(2 z) gives the same function in a form whose
exponential is cheap:

    gelu(x)  = x * s,                      s = sigmoid(u), u = K x (1 + A x^2), K = 2 sqrt(2/pi)
    gelu'(x) = s + x s (1 - s) u'(x)       u'(x) = K (1 + 3 A x^2)

Both are compiled once per process by inductor into a single vectorised loop each (forward:
read x, write y; backward: read grad and x, write the input's grad), so the layer saves and
allocates exactly what torch's GELU does (the input only) and the memory planner's replay stays
true. The result equals torch's tanh GELU to fp32 rounding (|error| < 1e-6 forward, tested), so
exported weights still mean GPT-2's activation. Forward + backward take about half the time of
torch's kernel here (docs/throughput.md).

Where it does not apply (CUDA, where torch's kernel is already one fused pass; non-fp32 dtypes;
no working C++ compiler for inductor) `gelu_tanh` is torch's `F.gelu(x, approximate="tanh")`.
Inside `torch.compile` (`train.compile`) it returns the sigmoid form as plain ops for inductor to
fuse into the surrounding graph.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

_K = 2.0 * math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_tanh_sigmoid_form(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU written with a sigmoid (plain ops: autograd and compile trace it)."""
    return x * torch.sigmoid(_K * x * (1.0 + _A * x * x))


def _gelu_tanh_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x2 = x * x
    s = torch.sigmoid(_K * x * (1.0 + _A * x2))
    return grad * s * (1.0 + x * (1.0 - s) * (_K * (1.0 + 3.0 * _A * x2)))


_kernels: tuple | None = None  # (forward, backward) once compiled
_unavailable: str | None = None  # why the fused kernels cannot be used in this process


def _compiled_kernels() -> tuple | None:
    """Compile the two kernels on first use; None (and one note on stderr) if inductor can't."""
    global _kernels, _unavailable
    if _kernels is not None or _unavailable is not None:
        return _kernels
    try:
        fwd = torch.compile(gelu_tanh_sigmoid_form, dynamic=True, fullgraph=True)
        bwd = torch.compile(_gelu_tanh_grad, dynamic=True, fullgraph=True)
        # compile now, on a probe that covers the range where tanh saturates, and check the
        # kernels against torch's before trusting them with a run
        x = torch.linspace(-12.0, 12.0, 4097)
        grad = torch.linspace(-1.0, 1.0, 4097)
        ref = x.clone().requires_grad_()
        F.gelu(ref, approximate="tanh").backward(grad)
        with torch.no_grad():
            y, dx = fwd(x), bwd(grad, x)
        if not (
            torch.allclose(y, F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
            and torch.allclose(dx, ref.grad, rtol=1e-4, atol=1e-5)
        ):
            raise RuntimeError("compiled GELU disagrees with torch's on the probe")
        _kernels = (fwd, bwd)
    except Exception as e:  # no C++ compiler, a sandbox without /tmp, a torch without inductor
        _unavailable = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        print(
            f"note: train.fused_gelu: the compiled CPU GELU is unavailable ({_unavailable[:160]}); "
            "using torch's F.gelu",
            file=sys.stderr,
        )
    return _kernels


class _FusedGeluTanh(torch.autograd.Function):
    """Saves the input only, like torch's GELU; the kernels work on the flattened tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().contiguous()  # detached: one compiled graph, whatever requires_grad says
        ctx.save_for_backward(x)
        return _kernels[0](x.view(-1)).view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.detach().contiguous()
        return _kernels[1](grad.view(-1), x.detach().view(-1)).view(x.shape)


def fused_gelu_applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def gelu_tanh(x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """GPT-2's GELU; `fused` takes the compiled sigmoid-form kernels on CPU fp32 tensors."""
    if fused and fused_gelu_applies(x):
        if torch.compiler.is_compiling():
            return gelu_tanh_sigmoid_form(x)
        if _compiled_kernels() is not None:
            return _FusedGeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")
