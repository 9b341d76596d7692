"""The lesson's model-scale table, recomputed by the planner (`stalwart plan --lesson-table`).

LLaMA is not GPT-2: RMSNorm, SwiGLU (3 matrices of C x 11008 instead of 2 of C x 4C), rotary
positions, untied embeddings, and (70B) grouped-query attention. Per block those come to about
the same 12 C^2 weights (7B: 4 C^2 + 3 x 4096 x 11008 = 12.06 C^2), so a GPT-2-style block of
the same width and depth is a fair stand-in: our "LLaMA-7B" has 6.6B parameters (the real one
6.7B), our "LLaMA-70B" 64.7B (the real one 69B: GQA shrinks attention but its MLP is 28672 wide).
"""

from __future__ import annotations

import json

from stalwart.config import Config, with_overrides
from stalwart.memory.planner import plan_inference, plan_training

# name, (n_layer, n_embd, n_head, vocab, context), the lesson's GB: inference, training, + ckpt
ROWS = [
    ("GPT-2 small", (12, 768, 12, 50257, 1024), (0.25, 3.5, 2.5)),
    ("GPT-2 XL", (48, 1600, 25, 50257, 1024), (3, 24, 18)),
    ("LLaMA-7B (GPT-2-style)", (32, 4096, 32, 32000, 2048), (14, 112, 80)),
    ("LLaMA-70B (GPT-2-style)", (80, 8192, 64, 32000, 4096), (140, 1100, 800)),
]
GB = 1e9  # the lesson's GB are decimal (124M params x 2 bytes = 0.25 GB)

EXPLANATION = """\
Training is fp32 weights + fp32 gradients + AdamW's two fp32 moments (16 bytes/parameter) plus
the activations of one sequence (micro-batch 1) at full context; "+ ckpt" checkpoints every
block. Inference is the bf16 weights alone, as in the lesson (the KV cache for one full-context
sequence is shown separately). Where the numbers differ from the lesson's:
- Training: the lesson's column is 16 bytes/parameter (its "activations excluded"), except GPT-2
  small: 3.5 GB is more than 16 x 124M = 2.0 GB, so it must count some activations, as ours do.
  Ours add one sequence's activations, which are large next to the weights for small models:
  the fp32 log-softmax over a 50257-word vocabulary and the two gradients backward starts with
  are 3 x 1024 x 50257 x 4 bytes = 0.6 GB on their own.
- With checkpointing: the lesson's column is ~0.72 x its training column. Checkpointing only
  shrinks activations; weights, gradients and optimizer state (16 bytes/parameter) stay, so with
  one sequence the saving is the activations minus one block's recomputation, and the 16
  bytes/parameter floor is the 7B/70B answer: ~106 GB and ~1.04 TB, not 80 GB and 800 GB. To get
  below it you shard the state (ZeRO / FSDP: `stalwart plan --zero 3 --world-size N`) or keep
  fewer bytes per parameter (8-bit optimizers, bf16 moments).
- LLaMA rows use GPT-2-style blocks of LLaMA's width and depth (see the note above), so their
  parameter counts are 2-6% below the real models'.
"""


def _config(shape) -> Config:
    L, C, h, V, T = shape
    cfg = Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.block_size = L, C, h, V, T
    cfg.train.precision = "fp32"
    return cfg


def lesson_rows() -> list[dict]:
    rows = []
    for name, shape, lesson in ROWS:
        cfg = _config(shape)
        kw = {"micro_batch": 1, "device_type": "cuda", "grad_accum": 1}
        train = plan_training(cfg, **kw)
        full = with_overrides(cfg, {"model.activation_checkpointing": "full"})
        ckpt = plan_training(full, **kw)
        inf = plan_inference(full)
        rows.append(
            {
                "model": name,
                "params": train.params,
                "context": shape[4],
                "inference_bf16_bytes": inf.weights_bytes,
                "kv_cache_bytes": inf.kv_cache_bytes,
                "training_fp32_adamw_bytes": train.total_bytes,
                "training_ckpt_bytes": ckpt.total_bytes,
                "lesson_gb": {"inference": lesson[0], "training": lesson[1], "ckpt": lesson[2]},
            }
        )
    return rows


def lesson_table(as_json: bool = False) -> str:
    rows = lesson_rows()
    if as_json:
        return json.dumps({"rows": rows, "explanation": EXPLANATION}, indent=2)
    head = (
        "| Model | Params | Inference bf16 (lesson) | KV cache | Training fp32 AdamW (lesson) "
        "| Training + ckpt (lesson) |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        les = r["lesson_gb"]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.3g}B "
            f"| {r['inference_bf16_bytes'] / GB:.3g} GB ({les['inference']:g}) "
            f"| {r['kv_cache_bytes'] / GB:.3g} GB "
            f"| {r['training_fp32_adamw_bytes'] / GB:.4g} GB ({les['training']:g}) "
            f"| {r['training_ckpt_bytes'] / GB:.4g} GB ({les['ckpt']:g}) |"
        )
    return "\n".join(lines) + "\n\n" + EXPLANATION
