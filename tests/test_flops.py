"""The FLOP count behind MFU and HFU, held against torch's own FlopCounterMode.

FlopCounterMode counts 2 FLOPs per multiply-add of every mm / addmm / bmm (bias adds, norms,
GELU, softmax: nothing), which is our convention exactly, term by term, with two differences in
what it can see, both pinned here:
  * on CPU the fused attention kernel (`_scaled_dot_product_flash_attention_for_cpu`) has no
    FLOP formula registered, so attention counts 0 unless it runs as plain matmuls (the math
    backend); on CUDA the flash / efficient kernels are counted, as the full T x T square;
  * the embedding lookups (wte, wpe) are not matmuls and count 0, as in ours; the tied head is a
    matmul and counts V C per token, as in ours.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stalwart.config import ModelConfig
from stalwart.logs.metrics import utilization
from stalwart.model.gpt import (
    build_model,
    flops_per_token,
    hardware_flops_per_token,
    recomputed_blocks,
)

V, B = 256, 3


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)
    return ModelConfig(**{**base, **kw})


def count(cfg: ModelConfig, math_attention: bool = True) -> dict[str, int]:
    """FLOPs of one forward + backward by op, as FlopCounterMode sees them."""
    torch.manual_seed(0)
    model = build_model(cfg, V)
    x = torch.randint(0, V, (B, cfg.block_size))
    backend = SDPBackend.MATH if math_attention else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend), FlopCounterMode(display=False) as fc:
        _, loss = model(x, x)
        loss.backward()
    by_op = {str(k).split(".")[-1]: v for k, v in fc.get_flop_counts()["Global"].items()}
    by_op["total"] = fc.get_total_flops()
    return by_op


def test_flops_per_token_matches_flop_counter_term_by_term():
    cfg = tiny()
    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    tokens = B * T
    got = count(cfg)
    # weight matmuls, 6 N per token: N = 12 L C^2 (blocks) + V C (the tied head)
    assert got["mm"] + got["addmm"] == 6 * (12 * L * C * C + V * C) * tokens
    # attention, 12 L T C per token: QK^T and AV over the full square, forward + backward
    assert got["bmm"] == 12 * L * T * C * tokens
    assert got["total"] == flops_per_token(cfg, V) * tokens


def test_cpu_fused_attention_is_invisible_to_the_flop_counter():
    cfg = tiny()
    got = count(cfg, math_attention=False)
    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    assert got["total"] == (flops_per_token(cfg, V) - 12 * L * T * C) * B * T


def test_our_n_is_nanogpts_minus_norms_and_biases():
    """nanoGPT's N is all parameters minus wpe; ours keeps only those in matmuls."""
    cfg = tiny()
    model = build_model(cfg, V)
    elementwise = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 1
    )  # layer-norm weights and biases, Linear biases
    C, L = cfg.n_embd, cfg.n_layer
    assert model.num_params(exclude_position=True) - elementwise == 12 * L * C * C + V * C


@pytest.mark.parametrize("spec, blocks", [("none", 0), ("full", 3), ("every:2", 2)])
def test_hfu_counts_exactly_the_recomputation(spec, blocks):
    cfg = tiny(n_layer=3, activation_checkpointing=spec)
    assert recomputed_blocks(cfg) == blocks
    got = count(cfg)
    assert got["total"] == hardware_flops_per_token(cfg, V) * B * cfg.block_size
    if blocks:
        assert hardware_flops_per_token(cfg, V) > flops_per_token(cfg, V)


def test_utilization_is_achieved_over_peak_and_none_without_a_peak():
    assert utilization(8e9, 2.0, 1e10) == pytest.approx(0.4)
    assert utilization(8e9, 2.0, None) is None
    assert utilization(8e9, 2.0, 0.0) is None


# ---- llama: RoPE, RMSNorm, SwiGLU and GQA are element-wise or reshapes; the matmuls count ----

LLAMA = dict(arch="llama", n_head=4, n_kv_head=2, intermediate_size=96, tie_embeddings=False)


@pytest.mark.parametrize("kv, tie", [(2, False), (4, True), (1, False)])
def test_llama_flops_per_token_matches_flop_counter(kv, tie):
    cfg = tiny(**{**LLAMA, "n_kv_head": kv, "tie_embeddings": tie})
    C, L, T, I = cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.intermediate_size  # noqa: E741
    kvd = kv * C // cfg.n_head
    got = count(cfg)
    # q, o (C x C), k, v (C x kv*hd), gate, up, down (C x I): 6 N per token, plus the head
    assert got["mm"] == 6 * (L * (2 * C * C + 2 * C * kvd + 3 * C * I) + V * C) * B * T
    assert got["bmm"] == 12 * L * T * C * B * T  # GQA's shared keys still meet every query
    assert got["total"] == flops_per_token(cfg, V) * B * T


@pytest.mark.parametrize("spec", ["full", "every:2"])
def test_llama_hfu_counts_exactly_the_recomputation(spec):
    cfg = tiny(**LLAMA, n_layer=3, activation_checkpointing=spec)
    got = count(cfg)
    assert got["total"] == hardware_flops_per_token(cfg, V) * B * cfg.block_size
    assert hardware_flops_per_token(cfg, V) > flops_per_token(cfg, V)
