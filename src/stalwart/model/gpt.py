"""GPT-2: learned positions, pre-norm blocks, GELU MLP, tied embedding/head, causal SDPA.

`build_model`, `num_params`, `flops_per_token` and `hardware_flops_per_token` are the model
API for every caller and dispatch on `model.arch`: llama's live in model/llama.py.

Parameter names follow nanoGPT / GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so the
Hugging Face export is a rename and a transpose, nothing more.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stalwart.config import ModelConfig, parse_activation_checkpointing
from stalwart.model import cpu_kernels, llama
from stalwart.model.common import TransformerLM
from stalwart.model.cpu_kernels import linear
from stalwart.model.kernels import gelu_tanh
from stalwart.model.recompute import selective_contexts


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.cpu_kernels = False  # set by GPT.set_cpu_kernels (train.cpu_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = linear(x, self.c_attn, self.cpu_kernels)  # (B, T, 3C)
        if (
            self.cpu_kernels
            and not (self.training and self.dropout > 0)
            and cpu_kernels.applies(qkv)
        ):  # q, k, v read in place; y comes out as c_proj's input
            return self.resid_dropout(
                linear(cpu_kernels.causal_attention(qkv, self.n_head), self.c_proj, True)
            )
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # (B, nh, T, hs): flash / memory-efficient kernels where the backend has them
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True
        self.dropout = nn.Dropout(cfg.dropout)
        self.fused_gelu = False  # set by GPT.set_fused_gelu (train.fused_gelu)
        self.cpu_kernels = False  # set by GPT.set_cpu_kernels (train.cpu_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximate GELU: GPT-2's "gelu_new", so exported weights mean the same thing
        h = linear(x, self.c_fc, self.cpu_kernels)
        if self.cpu_kernels and cpu_kernels.applies(h):
            h = cpu_kernels.gelu_tanh(h)
        else:
            h = gelu_tanh(h, self.fused_gelu)
        return self.dropout(linear(h, self.c_proj, self.cpu_kernels))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.checkpointed = False  # set by GPT.set_activation_checkpointing
        self.selective = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self._forward(x)
        # use_reentrant=False: works with autocast, DDP/FSDP and inputs without grad, and
        # stops recomputing once backward has what it needs
        if self.checkpointed:  # keep only the block's input; recompute its insides in backward
            return checkpoint(self._forward, x, use_reentrant=False)
        if self.selective:  # keep matmul and attention outputs; recompute the element-wise ops
            return checkpoint(self._forward, x, use_reentrant=False, context_fn=selective_contexts)
        return self._forward(x)


class GPT(TransformerLM):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        self.cpu_kernels = False  # set by set_cpu_kernels (train.cpu_kernels)
        self.set_activation_checkpointing(cfg.activation_checkpointing)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (FSDP wraps one unit per block)."""
        return self.transformer.h

    def set_activation_checkpointing(self, spec: str) -> None:
        super().set_activation_checkpointing(spec)
        self._route_cpu_kernels()

    def set_cpu_kernels(self, on: bool) -> None:
        """CPU fp32: Linears, causal attention and GELU through stalwart's kernels
        (stalwart.model.cpu_kernels); torch's ops wherever those do not apply."""
        self.cpu_kernels = on
        self._route_cpu_kernels()

    def _route_cpu_kernels(self) -> None:
        on = getattr(self, "cpu_kernels", False)
        for block in self.transformer.h:
            # selective checkpointing keeps matmul outputs by op (model/recompute.py); the
            # kernels are not dispatcher ops its policy could see, so those blocks keep torch's
            block.attn.cpu_kernels = block.mlp.cpu_kernels = on and not block.selective

    def set_fused_gelu(self, on: bool) -> None:
        """CPU fp32: GPT-2's GELU as compiled one-pass kernels (stalwart.model.kernels)."""
        for block in self.transformer.h:
            block.mlp.fused_gelu = on

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B,T,C)
        for block in self.transformer.h:
            x = block(x)
        logits = linear(self.transformer.ln_f(x), self.lm_head, self.cpu_kernels)  # (B, T, vocab)
        return self._with_loss(logits, targets)

    def num_params(self, exclude_position: bool = False) -> int:
        """Unique parameters (the tied head counted once); optionally without wpe."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if exclude_position else n


def num_params(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Parameter counts by part, from the config alone (the planner uses it without a model)."""
    if cfg.arch == "llama":
        return llama.num_params(cfg, vocab_size)
    C, L, V, T = cfg.n_embd, cfg.n_layer, vocab_size, cfg.block_size
    b = 1 if cfg.bias else 0
    ln = C * (1 + b)
    block = 2 * ln + (C * 3 * C + b * 3 * C) + (C * C + b * C) + (C * 4 * C + b * 4 * C)
    block += 4 * C * C + b * C
    return {
        "wte": V * C,
        "wpe": T * C,
        "blocks": L * block,
        "ln_f": ln,
        "total": V * C + T * C + L * block + ln,
    }


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    """Model FLOPs per trained token, the numerator of MFU: 6 N + 12 L T C (matmuls only).

    Convention (each public loop picks its own; the differences are a few percent):
      * N = the parameters that take part in a matmul: the blocks' four weight matrices
        (12 L C^2) and the tied wte/lm_head once (V C: the head is a (C x V) matmul on every
        token). Left out: wpe (a lookup, no matmul), layer norms and biases (element-wise).
        nanoGPT takes all parameters minus wpe (so it also counts norms and biases); llm.c takes
        all parameters, wpe included.
      * 2 FLOPs per multiply-add, forward 2N, backward 4N (gradients of inputs and of weights).
      * Attention: QK^T and AV are 2 * 2 T C FLOPs per token per layer forward, x3 with backward
        = 12 L T C. Like nanoGPT and PaLM (appendix B) we count the full T x T square although
        causal masking leaves half of it unused; llm.c counts half (6 L T C).
    This is exactly what `torch.utils.flop_counter.FlopCounterMode` counts for one forward and
    backward when attention runs as plain matmuls (tests/test_flops.py).
    """
    if cfg.arch == "llama":
        return llama.flops_per_token(cfg, vocab_size)
    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    matmul_params = L * 12 * C * C + vocab_size * C
    return 6 * matmul_params + 12 * L * T * C


def recomputed_blocks(cfg: ModelConfig) -> int:
    """How many blocks activation checkpointing recomputes in backward (full / every:K)."""
    kind, every = parse_activation_checkpointing(cfg.activation_checkpointing)
    if kind == "full":
        return cfg.n_layer
    if kind == "every":
        return len(range(0, cfg.n_layer, every))  # blocks 0, K, 2K, ... (GPT.set_...)
    return 0


def hardware_flops_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    """FLOPs the hardware executes per token, the numerator of HFU: the model FLOPs plus the
    forward work activation checkpointing repeats in backward.

    A checkpointed block is recomputed from its input up to the last tensor backward needs.
    torch's non-reentrant checkpoint stops there (early stop, on by default), so the MLP's
    down-projection, whose output nothing saves, is not recomputed: 2 (3 + 1 + 4) C^2 = 16 C^2
    of the block's 24 C^2 weight FLOPs, plus the 4 T C of attention. `selective` recomputes
    only element-wise work (norms, GELU) and no matmuls, so it adds nothing here.
    """
    C, T = cfg.n_embd, cfg.block_size
    per_block = 16 * C * C + 4 * T * C
    if cfg.arch == "llama":
        per_block = llama.recompute_flops_per_token(cfg)
    return flops_per_token(cfg, vocab_size) + recomputed_blocks(cfg) * per_block


def hidden_matrix_params(cfg: ModelConfig) -> int:
    """Elements of the blocks' weight matrices (Muon's share; the planner's optimizer state)."""
    if cfg.arch == "llama":
        return llama.num_params(cfg, 1)["hidden"]
    return cfg.n_layer * 12 * cfg.n_embd**2  # c_attn 3C^2, c_proj C^2, c_fc 4C^2, c_proj 4C^2


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The model `model.arch` names: GPT-2 (this module) or Llama (model/llama.py)."""
    if cfg.arch == "llama":
        return llama.Llama(cfg, vocab_size)
    return GPT(cfg, vocab_size)
