"""The model: gpt.py (GPT-2 blocks, activation checkpointing, FLOPs per token), kernels.py (the
fused CPU GELU), gpt2_weights.py (Hugging Face / nanoGPT weight layouts)."""
