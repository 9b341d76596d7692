"""Optimizers: build.py (decay / no-decay groups, build_optimizer, state sizes), reference.py
(SGD, momentum, Adam, AdamW from first principles), muon.py, schedule.py (warmup + cosine / WSD)."""
