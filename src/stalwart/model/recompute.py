"""Selective activation checkpointing's policy, shared by GPT-2 (model/gpt.py) and Llama."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Selective activation checkpointing keeps what is expensive to recompute and cheap to store:
# the outputs of the matmuls (the Linears' addmm/mm) and of attention (SDPA's output and
# logsumexp, a few bytes a token). It recomputes what is cheap to recompute and costly to store:
# the layer norms, GELU (4C a token), the residual add, dropout (RNG state replayed). That keeps
# ~11 C of the 16 C bytes-per-token-per-element a block saves and repeats no matmul FLOPs; `full`
# keeps C but repeats 2/3 of the block's forward. (Megatron's "selective" recomputes the T x T
# attention core instead; SDPA's fused kernels never store it, so there is nothing to gain there.)
_aten = torch.ops.aten
_SAVE_OUTPUTS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OUTPUTS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    return create_selective_checkpoint_contexts(selective_policy)
