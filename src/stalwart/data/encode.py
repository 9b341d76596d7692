"""Tokenizing a batch of documents: the work `prepare` hands to its worker processes.

A batch result depends only on the batch's documents (never on which process ran it or what
ran before), and results are consumed in submission order, so the output is byte-identical for
any number of workers. Each document's held-out membership is decided here, by a stable rule:
the first 8 bytes of blake2b(its UTF-8 text), read as a fraction of 2^64, below `val_frac`.
Adding or removing other documents never changes which side a document is on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from stalwart.data.tokenizer import ByteTokenizer, build_tokenizer

_state: dict = {}


@dataclass
class Encoded:
    """One batch, tokenized. tokens: every document's ids followed by end-of-text, concatenated."""

    tokens: np.ndarray
    doc_tokens: np.ndarray  # (docs,) tokens of each document, end-of-text included
    doc_bytes: np.ndarray  # (docs,) UTF-8 bytes of each document's text
    val: np.ndarray  # (docs,) bool: held out by the stable rule
    byte_counts: np.ndarray  # (256,) byte histogram of the batch's train documents (unigram)
    digest: bytes  # sha256 over the batch's (name, text) pairs: the corpus fingerprint


def init_worker(spec: str, tok_dir: str | None, dtype: str, val_frac: float, tok=None) -> None:
    """Per process: build the tokenizer once (a pool's initializer; also used in-process, where
    `tok` passes the one already built)."""
    tok = tok or build_tokenizer(spec, tok_dir)
    _state.update(tok=tok, dtype=np.dtype(dtype), threshold=int(val_frac * 2**64))


def is_held_out(data: bytes, threshold: int) -> bool:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") < threshold


def encode_batch(docs: list[tuple[str, str]]) -> Encoded:
    tok, dtype, threshold = _state["tok"], _state["dtype"], _state["threshold"]
    raw = [text.encode("utf-8") for _, text in docs]
    digest = hashlib.sha256()
    for (name, _), data in zip(docs, raw):
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0" + data + b"\0")
    val = np.array([is_held_out(d, threshold) for d in raw], dtype=bool)
    if isinstance(tok, ByteTokenizer):
        # bytes are their own ids: one join, with the end-of-text id written between documents
        sizes = np.array([len(d) for d in raw], dtype=np.int64)
        ids = [np.frombuffer(d, np.uint8) for d in raw]
    else:
        ids = [np.asarray(x, dtype=dtype) for x in tok.encode_batch([t for _, t in docs])]
        sizes = np.array([len(x) for x in ids], dtype=np.int64)
    tokens = np.empty(int(sizes.sum()) + len(docs), dtype=dtype)
    ends = np.cumsum(sizes + 1)
    for x, end in zip(ids, ends):
        tokens[end - 1 - len(x) : end - 1] = x
    tokens[ends - 1] = tok.eot_id
    byte_counts = np.zeros(256, dtype=np.int64)
    for data, held in zip(raw, val):
        if not held:
            byte_counts += np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    return Encoded(
        tokens, sizes + 1, np.array([len(d) for d in raw], np.int64), val, byte_counts,
        digest.digest(),
    )  # fmt: skip
