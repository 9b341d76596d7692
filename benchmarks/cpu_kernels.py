"""Each of stalwart's CPU kernels (`train.cpu_kernels`) against torch's op, forward + backward,
at one GPT-2 shape (default nanoGPT's small CPU model: micro-batch 16, T 256, 256 wide, 4
heads), alternated in one process so the shared machine's load falls on both alike; then a whole
training step of the model (forward, backward, clip, AdamW) both ways.

    .venv/bin/python benchmarks/cpu_kernels.py [--batch 16 --T 256 --C 256 --heads 4 --layers 4]
        [--repeats 15] [--threads 2]

Prints one markdown table: median milliseconds of each, the ratio, and what each piece is.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from stalwart.config import ModelConfig
from stalwart.model import cpu_kernels
from stalwart.model.gpt import build_model


def _sdpa(qkv: torch.Tensor, H: int) -> torch.Tensor:
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, 2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).contiguous().view(B, T, C)


def _fwd_bwd(f, *inputs):
    def run():
        out = f(*inputs)
        out.backward(torch.ones_like(out))
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None

    return run


def _time(pairs: dict, repeats: int) -> dict:
    """pairs: name -> (torch's callable, the kernel's); alternated, medians in ms."""
    times = {name: ([], []) for name in pairs}
    for a, b in pairs.values():
        for _ in range(3):
            a(), b()  # warm-up
    for _ in range(repeats):
        for name, fns in pairs.items():
            for i, f in enumerate(fns):
                t0 = time.perf_counter()
                f()
                times[name][i].append(time.perf_counter() - t0)
    return {n: tuple(1e3 * statistics.median(x) for x in ts) for n, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_kernels.kernels() is not None, cpu_kernels.unavailable_reason()
    B, T, C, H = args.batch, args.T, args.C, args.heads
    torch.manual_seed(0)
    x = torch.randn(B, T, C, requires_grad=True)
    h = torch.randn(B, T, 4 * C, requires_grad=True)
    qkv = torch.randn(B, T, 3 * C, requires_grad=True)
    c_attn, c_proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(4 * C, C)
    pieces = {
        f"Linear {C} -> {3 * C} (c_attn)": (
            _fwd_bwd(lambda t: c_attn(t), x),
            _fwd_bwd(lambda t: cpu_kernels.linear(t, c_attn, True), x),
        ),
        f"Linear {4 * C} -> {C} (MLP c_proj)": (
            _fwd_bwd(lambda t: c_proj(t), h),
            _fwd_bwd(lambda t: cpu_kernels.linear(t, c_proj, True), h),
        ),
        f"causal attention, {H} heads (SDPA + transposes)": (
            _fwd_bwd(lambda t: _sdpa(t, H), qkv),
            _fwd_bwd(lambda t: cpu_kernels.causal_attention(t, H), qkv),
        ),
        "GPT-2's tanh GELU": (
            _fwd_bwd(lambda t: F.gelu(t, approximate="tanh"), h),
            _fwd_bwd(cpu_kernels.gelu_tanh, h),
        ),
    }
    cfg = ModelConfig(n_layer=args.layers, n_head=H, n_embd=C, block_size=T, dropout=0.0)
    models, opts = [], []
    for on in (False, True):
        torch.manual_seed(0)
        m = build_model(cfg, args.vocab)
        m.set_cpu_kernels(on)
        models.append(m)
        opts.append(torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True))
    ids = torch.randint(0, args.vocab, (B, T + 1))

    def step(i):
        def run():
            loss = models[i](ids[:, :-1], ids[:, 1:])[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[i].parameters(), 1.0)
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)

        return run

    pieces[f"training step, {args.layers} layers (+ clip, AdamW)"] = (step(0), step(1))
    res = _time(pieces, args.repeats)
    print(f"B={B} T={T} C={C} heads={H}, {args.threads} threads, median of {args.repeats}:\n")
    print("| forward + backward | torch ms | stalwart kernels ms | speed-up |")
    print("|---|---|---|---|")
    for name, (a, b) in res.items():
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
