"""Data: prepare.py (text -> token files + meta.json), tokenizer.py and hf_tokenizer.py, loader.py
(the dataset on disk and the batch loader: the batch of step k is a pure function of seed and k)."""
