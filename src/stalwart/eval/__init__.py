"""Evaluation: loss.py (held-out loss on fixed batches), sample.py (generation from a checkpoint
or an export), report.py (the end-of-run summary: bits per byte beside gzip / xz)."""
