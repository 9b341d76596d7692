"""Records: metrics.py (metrics.jsonl, the progress line, the step timer, throughput and MFU
fields), loggers.py (TensorBoard and W&B mirrors of the records)."""
