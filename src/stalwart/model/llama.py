"""Llama: Hugging Face's `LlamaForCausalLM`, exactly (`model.arch = "llama"`).

RMSNorm (eps `model.norm_eps`, computed in fp32), rotary positions (theta `model.rope_theta`, in
HF's rotate-half layout: the first and second halves of each head are the pairs), grouped-query
attention (`model.n_kv_head` key/value heads shared by n_head / n_kv_head query heads each),
a SwiGLU MLP of width `model.ffn_size`, no biases, and an output head tied to the token embedding
or not (`model.tie_embeddings`). `model.dropout` drops attention probabilities only (HF's
`attention_dropout`; Llama has no residual dropout).

Parameter names are HF's (`model.layers.0.self_attn.q_proj.weight`, ...) and every Linear keeps
torch's (out, in) layout, so export and import are plain copies (export.py, model/llama_weights.py).
Activation checkpointing (full / every:K / selective) works as in GPT-2 (model/gpt.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stalwart.config import ModelConfig
from stalwart.model.common import TransformerLM
from stalwart.model.recompute import selective_contexts


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in fp32 then cast back (HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_tables(T: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim): frequency i for dims i and i + head_dim / 2 (HF)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    pos = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin  # (B, h, T, hd) * (T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.kv_heads
        self.hd = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=False)
        self.o_proj.residual_proj = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # HF casts the tables to the activations'
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv != self.n_head:  # GQA: each kv head serves n_head / n_kv query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.n_embd, bias=False)
        self.down_proj.residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.checkpointed = False  # set by Llama.set_activation_checkpointing
        self.selective = False

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self._forward(x, cos, sin)
        if self.checkpointed:
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        if self.selective:
            return checkpoint(
                self._forward, x, cos, sin, use_reentrant=False, context_fn=selective_contexts
            )
        return self._forward(x, cos, sin)


class Llama(TransformerLM):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(vocab_size, cfg.n_embd),
                layers=nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer)),
                norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        cos, sin = rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_theta, "cpu")
        # not persistent: derived from the config, never part of a checkpoint or an export
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.set_activation_checkpointing(cfg.activation_checkpointing)

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (FSDP wraps one unit per layer)."""
        return self.model.layers

    def set_cpu_kernels(self, on: bool) -> None:
        """`train.cpu_kernels` is GPT-2's (its fused attention reads c_attn's packed q/k/v);
        llama runs torch's ops."""

    def set_fused_gelu(self, on: bool) -> None:
        """No GELU here (SwiGLU): `train.fused_gelu` changes nothing for llama."""

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self._with_loss(self.lm_head(self.model.norm(x)), targets)  # (B, T, vocab)

    def num_params(self, exclude_position: bool = False) -> int:
        """Unique parameters (a tied head counted once); no position table to exclude."""
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------
# Counts from the config alone (planner, MFU): the llama side of model/gpt.py's functions


def layer_matrices(cfg: ModelConfig) -> dict[str, int]:
    """Element counts of one layer's weight matrices (all of them in matmuls, all Muon's)."""
    C, hd, I = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.ffn_size  # noqa: E741
    kv = cfg.kv_heads * hd
    return {"q": C * C, "k": C * kv, "v": C * kv, "o": C * C, "gate": C * I, "up": C * I,
            "down": I * C}  # fmt: skip


def num_params(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    C, L, V = cfg.n_embd, cfg.n_layer, vocab_size
    hidden = L * sum(layer_matrices(cfg).values())
    head = 0 if cfg.tie_embeddings else V * C
    layers = hidden + L * 2 * C
    total = V * C + head + layers + C
    return {"embed_tokens": V * C, "lm_head": head, "layers": layers, "norm": C,
            "hidden": hidden, "total": total}  # fmt: skip


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    """6 N + 12 L T C, as GPT-2's (model/gpt.py): N = the layers' seven matrices (GQA's
    narrower k, v and the three SwiGLU matrices) + the head's V C (a lookup, the embedding, is
    not a matmul, tied or not). RoPE, RMSNorm, SiLU and the gate's product are element-wise and
    uncounted; GQA's repeated keys and values leave attention's 12 L T C unchanged."""
    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    matmul_params = L * sum(layer_matrices(cfg).values()) + vocab_size * C
    return 6 * matmul_params + 12 * L * T * C


def recompute_flops_per_token(cfg: ModelConfig) -> int:
    """A checkpointed layer's recomputed forward: every matmul but down_proj (whose output
    nothing saves: torch's non-reentrant checkpoint stops before it), and attention's 4 T C."""
    m = layer_matrices(cfg)
    return 2 * (sum(m.values()) - m["down"]) + 4 * cfg.block_size * cfg.n_embd
