"""stalwart: a production pretraining loop for GPT-style language models."""

__version__ = "0.1.0"
