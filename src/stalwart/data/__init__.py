"""Data: prepare.py (documents -> token shards + meta.json; streaming, parallel, resumable) with
sources.py (the readers), encode.py (the workers' batch tokenization), shards.py (shard files and
the token stream over them) and stats.py; tokenizer.py and hf_tokenizer.py; loader.py (the
dataset on disk and the batch loader: the batch of step k is a pure function of seed and k)."""
