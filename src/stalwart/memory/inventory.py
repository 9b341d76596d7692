"""One training step of stalwart's GPT-2, replayed as allocations and frees (no tensors).

The planner's model of memory is the step itself: every tensor the forward keeps for backward
(as torch.autograd.graph.saved_tensors_hooks shows it: each layer norm's input, mean and rstd,
each Linear's input, the qkv projection, SDPA's output and logsumexp, the MLP's pre- and
post-GELU, dropout masks, the fp32 log-softmax), the buffers the backward allocates (gradients
of activations, the gradients of q, k, v and their concatenation), the weight gradients as
AccumulateGrad creates them, and the optimizer state. A running total gives the peak and what
is held at it. The step is `trainer.forward_backward` + clip + `optimizer.step()`.

This module is the inventory (what is kept, per block, per checkpointing kind); the replay of
the step over it is memory.replay.
"""

from __future__ import annotations

from dataclasses import dataclass

from stalwart.config import parse_activation_checkpointing

CATEGORIES = (
    "weights",  # fp32 parameters: the master copy autocast casts from
    "weight_copies",  # autocast's 16-bit casts of the matmul weights, kept for backward
    "gradients",
    "ddp_buckets",  # DDP's flat gradient buckets (gradient_as_bucket_view=False, the default)
    "optimizer",
    "activations",  # saved for backward (or kept by checkpointing, and recomputed)
    "logits",  # logits, the fp32 log-softmax and their gradients
    "temporaries",  # gradients of activations, other short-lived buffers
    "fsdp_gathered",  # FSDP: the all-gathered (unsharded) parameters of the running units
    "batch",  # the step's input/target token ids
)


class Timeline:
    """Running totals by category; remembers the peak, what was held then, and each maximum."""

    def __init__(self):
        self.held = dict.fromkeys(CATEGORIES, 0)
        self.most = dict.fromkeys(CATEGORIES, 0)
        self.peak, self.at_peak, self.peak_phase, self.phase = 0, dict(self.held), "", ""

    def alloc(self, cat: str, n: float) -> None:
        self.held[cat] += int(n)
        self.most[cat] = max(self.most[cat], self.held[cat])
        total = sum(self.held.values())
        if total > self.peak:
            self.peak, self.at_peak, self.peak_phase = total, dict(self.held), self.phase

    def free(self, cat: str, n: float) -> None:
        self.held[cat] -= int(n)

    def spike(self, cat: str, n: float) -> None:
        self.alloc(cat, n)
        self.free(cat, n)


@dataclass(frozen=True)
class Step:
    """Everything the replay needs, already resolved (sizes in elements unless named *_bytes)."""

    B: int
    T: int
    C: int
    h: int
    V: int
    L: int
    block_size: int
    bias: bool
    lp: int  # bytes of a matmul output: 2 under bf16/fp16 autocast, 4 in fp32
    p_drop: float
    mask: int  # bytes of a dropout-mask element: CPU multiplies by a float mask, CUDA keeps bool
    cpu: bool
    ckpt: tuple[str, ...]  # per block: none | full | selective
    world: int
    zero: int
    grad_accum: int
    opt_state_bytes: int  # unsharded
    arch: str = "gpt2"  # llama: memory.replay_llama replays its layer (RMSNorm, RoPE, SwiGLU)
    kv: int = 0  # llama: key/value width (n_kv_head x head_dim)
    ffn: int = 0  # llama: SwiGLU width
    tied: bool = True  # the head is the token embedding (one matrix, one gradient)

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def amp(self) -> bool:
        return self.lp == 2

    @property
    def math_attention(self) -> bool:
        """CPU SDPA with dropout falls back to the math kernel (keeps T x T matrices)."""
        return self.cpu and self.p_drop > 0


def block_params(C: int, bias: bool) -> list[int]:
    """Element counts of one block's parameter tensors, in forward order."""
    lin = lambda i, o: [i * o, o] if bias else [i * o]  # noqa: E731
    ln = [C, C] if bias else [C]
    return ln + lin(C, 3 * C) + lin(C, C) + ln + lin(C, 4 * C) + lin(4 * C, C)


def layer_params(s: Step) -> list[int]:
    """Element counts of one block's (gpt2) or layer's (llama) parameter tensors."""
    if s.arch != "llama":
        return block_params(s.C, s.bias)
    C, kv, ffn = s.C, s.kv, s.ffn
    return [C, C * C, C * kv, C * kv, C * C, C, C * ffn, C * ffn, ffn * C]


def linear_params(s: Step) -> int:
    """A block's Linear weights and biases: what autocast casts to 16 bits."""
    if s.arch == "llama":
        return sum(layer_params(s)) - 2 * s.C
    return sum(block_params(s.C, s.bias)) - 2 * s.C * (2 if s.bias else 1)


def model_params(s: Step) -> int:
    if s.arch == "llama":
        return s.V * s.C * (1 if s.tied else 2) + s.L * sum(layer_params(s)) + s.C
    ln = s.C * (2 if s.bias else 1)
    return s.V * s.C + s.block_size * s.C + s.L * sum(block_params(s.C, s.bias)) + ln


def llama_saved_items(s: Step) -> list[tuple[str, int, str]]:
    """What a llama layer keeps for backward (as saved_tensors_hooks shows it), in forward order.

    RMSNorm works in fp32: it keeps 1/rms (N) and the normalised input (N C, fp32), and the next
    Linear keeps its (autocast-cast) input. RoPE keeps only its tables (shared, tiny); SDPA keeps
    the rotated q, the keys and values (GQA's repeated copies: full width) and its output and
    logsumexp. SwiGLU keeps gate and up (matmul outputs), SiLU's output and the product."""
    N, C, lp, ffn = s.N, s.C, s.lp, s.ffn
    norm = N * 4 + N * C * 4 + N * C * lp
    return [
        ("x_in", N * C * 4, "input"),
        ("norm1", norm, "pointwise"),
        ("qkv", 3 * N * C * lp, "matmul"),
        ("att_out", N * C * lp + N * s.h * 4, "matmul"),
        ("x_mid", N * C * 4, "pointwise"),
        ("norm2", norm, "pointwise"),
        ("gate_up", 2 * N * ffn * lp, "matmul"),
        ("silu_prod", 2 * N * ffn * lp, "pointwise"),
    ]


def saved_items(s: Step) -> list[tuple[str, int, str]]:
    """(name, bytes, kind) a non-checkpointed block keeps for backward, in forward order.

    kind: 'pointwise' (cheap to recompute: norms, GELU, adds, dropout) or 'matmul' (Linear and
    attention outputs: costly to recompute). The block's output is the next block's input and
    is counted there (`x_in`)."""
    if s.arch == "llama":
        return llama_saved_items(s)
    N, C, lp = s.N, s.C, s.lp
    items = [("x_in", N * C * 4, "input"), ("ln1", N * 8 + N * C * lp, "pointwise")]
    if s.math_attention:  # CPU's math kernel works in fp32 even under autocast
        att = s.B * s.h * s.T * s.T
        items += [("qkv_copies", 3 * N * C * 4, "matmul"), ("att_probs", 2 * att * 4, "matmul")]
        items += [("att_mask", att * 4, "pointwise"), ("att_out", N * C * lp, "matmul")]
    else:
        items += [("qkv", 3 * N * C * lp, "matmul")]
        items += [("att_out", N * C * lp + N * s.h * 4, "matmul")]  # + logsumexp (fp32)
    if s.p_drop > 0:
        items.append(("drop1", N * C * s.mask, "pointwise"))
    items += [("x_mid", N * C * 4, "pointwise"), ("ln2", N * 8 + N * C * lp, "pointwise")]
    items += [("fc", 4 * N * C * lp, "matmul"), ("gelu", 4 * N * C * lp, "pointwise")]
    if s.p_drop > 0:
        items.append(("drop2", N * C * s.mask, "pointwise"))
    return items


def kept_in_forward(s: Step, kind: str) -> int:
    """Bytes a block keeps past its forward, beyond its input, for each checkpointing kind."""
    inner = [(n, b, k) for n, b, k in saved_items(s) if k != "input"]
    if kind == "none":
        return sum(b for _, b, _ in inner)
    if kind == "full":
        return 0
    # selective: the outputs of every matmul and of SDPA stay (incl. both c_proj outputs, which
    # the policy saves too); norms, GELU, the mid residual and dropout are recomputed.
    return sum(b for _, b, k in inner if k == "matmul") + 2 * s.N * s.C * s.lp


def norm_saved(s: Step) -> int:
    """What the final norm keeps: LayerNorm's mean and rstd, or RMSNorm's 1/rms and fp32 input."""
    if s.arch == "llama":
        return s.N * 4 + s.N * s.C * 4 + s.N * s.C * s.lp
    return s.N * 8 + s.N * s.C * s.lp


def checkpoint_kinds(spec: str, n_layer: int) -> tuple[str, ...]:
    """Per block: which blocks `model.activation_checkpointing` checkpoints (as model/gpt.py
    does)."""
    kind, every = parse_activation_checkpointing(spec)
    if kind == "every":
        return tuple("full" if i % every == 0 else "none" for i in range(n_layer))
    return (kind,) * n_layer
