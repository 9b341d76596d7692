"""Reading and tokenizing one piece of the input: the work a prepare worker does by itself.

A piece (sources.Piece) is a run of parts of files (or, for a streamed dataset, a batch of
documents the main process read). `piece_chunks` reads it (readers.py), cuts its documents into
chunks of about `CHUNK_BYTES` and tokenizes each into an `Encoded`: token ids + end-of-text,
per-document counts, the split decision, byte counts and a digest. A chunk depends only on the
piece's documents (never on which process ran it or what ran before), and the main process
consumes pieces in input order, so the output is byte-identical for any number of workers.

Each document's held-out membership is decided here, by a stable rule: the first 8 bytes of
blake2b(its UTF-8 text), read as a fraction of 2^64, below `val_frac`. Adding or removing
other documents never changes which side a document is on.

In a pool (`run_piece`) the chunks go to a spill file in the work directory, one at a time, and
the main process streams them back from there: memory holds one chunk per process whatever the
size of a piece (a 10 GB .jsonl.gz is one piece), and the workers never wait for the main
process to catch up.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stalwart.data.readers import Block, merge, read_part
from stalwart.data.tokenizer import ByteTokenizer, build_tokenizer

CHUNK_BYTES = 1 << 20
# the unigram baseline's byte counts come from the train documents of the pieces that start in
# the first UNIGRAM_BYTES of the input (on disk): plenty for 256 numbers, and counting every
# byte of a big corpus cost ~10% of prepare
UNIGRAM_BYTES = 256 << 20
_state: dict = {}


@dataclass
class Encoded:
    """One chunk, tokenized. tokens: every document's ids followed by end-of-text, concatenated."""

    tokens: np.ndarray
    doc_tokens: np.ndarray  # (docs,) tokens of each document, end-of-text included
    doc_bytes: np.ndarray  # (docs,) UTF-8 bytes of each document's text
    val: np.ndarray  # (docs,) bool: held out by the stable rule
    byte_counts: np.ndarray  # (256,) byte histogram of the chunk's train documents (unigram)
    digest: bytes  # sha256 of the documents' lengths and bytes: the corpus fingerprint
    heldout: list = field(default_factory=list)  # [index, name, text] of held-out documents


def init_worker(spec: str, tok_dir: str | None, dtype: str, val_frac: float,
                text_field: str = "text", heldout_bytes: int | None = None, tok=None) -> None:  # fmt: skip
    """Per process: build the tokenizer once (a pool's initializer; also used in-process, where
    `tok` passes the one already built). heldout_bytes: how much held-out text each piece keeps
    for the baselines sample (None: all of it)."""
    tok = tok or build_tokenizer(spec, tok_dir)
    _state.update(tok=tok, dtype=np.dtype(dtype), threshold=int(val_frac * 2**64),
                  field=text_field, heldout_bytes=heldout_bytes)  # fmt: skip


def is_held_out(data, threshold: int) -> bool:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") < threshold


def piece_chunks(piece, skipped: list[str]) -> Iterator[Encoded]:
    """The chunks of a piece, in order; files that are not UTF-8 text inside a directory are
    appended to `skipped`."""
    room = [_state["heldout_bytes"]]  # held-out text this piece still keeps for the sample
    want_texts = not isinstance(_state["tok"], ByteTokenizer)
    count = piece.offset < UNIGRAM_BYTES
    blocks = (
        [Block.from_texts([n for n, _ in piece.docs], [t for _, t in piece.docs])]
        if piece.docs is not None
        else (
            b for part in piece.parts for b in read_part(part, _state["field"], want_texts, skipped)
        )
    )
    pending, size = [], 0
    for block in blocks:
        if not len(block.lengths):
            continue
        pending.append(block)
        size += len(block.data)
        if size >= CHUNK_BYTES:
            yield encode_block(merge(pending), room, count)
            pending, size = [], 0
    if pending:
        yield encode_block(merge(pending), room, count)


def encode_block(b: Block, room: list, count_bytes: bool = True) -> Encoded:
    tok, dtype, threshold = _state["tok"], _state["dtype"], _state["threshold"]
    n = len(b.lengths)
    ends = np.cumsum(b.lengths)
    bounds = list(zip((ends - b.lengths).tolist(), ends.tolist()))
    view = memoryview(b.data)
    hashes = b"".join([hashlib.blake2b(view[s:e], digest_size=8).digest() for s, e in bounds])
    val = np.frombuffer(hashes, "<u8") < np.uint64(threshold)  # is_held_out, for the chunk
    # the chunk's fingerprint: every document's length and its 8-byte hash (hashing the text
    # once, for the split rule and the fingerprint alike)
    digest = hashlib.sha256(b.lengths.astype("<i8").tobytes() + hashes).digest()
    if isinstance(tok, ByteTokenizer):  # bytes are their own ids: no per-document tokenizer
        sizes, tokens = b.lengths, _with_eot(b.data, ends, dtype, tok.eot_id)
    else:
        texts = b.texts if b.texts is not None else [b.text(i) for i in range(n)]
        ids = token_arrays(tok, texts, dtype)
        sizes = np.array([len(x) for x in ids], dtype=np.int64)
        tokens = np.empty(int(sizes.sum()) + n, dtype=dtype)
        tok_ends = np.cumsum(sizes + 1)
        for x, end in zip(ids, tok_ends):
            tokens[end - 1 - len(x) : end - 1] = x
        tokens[tok_ends - 1] = tok.eot_id
    counts = np.zeros(256, np.int64)
    if count_bytes:
        counts = byte_histogram(b.data[np.repeat(~val, b.lengths)] if val.any() else b.data)
    heldout = []
    for i in np.flatnonzero(val).tolist():
        s, e = bounds[i]
        if room[0] is None or room[0] > 0:
            heldout.append([i, b.names[i], b.text(i)])
            if room[0] is not None:
                room[0] -= e - s
    return Encoded(tokens, sizes + 1, b.lengths, val, counts, digest, heldout)


def token_arrays(tok, texts: list[str], dtype) -> list[np.ndarray]:
    """Each text's ids as an array. tiktoken (gpt2): `encode_to_numpy` with no special token
    allowed or checked, which is `encode_ordinary` straight into an array: 26% less CPU than
    `encode_ordinary_batch(num_threads=1)` and its lists of ints (13.1 vs 10.4 MB/s measured;
    the ids are tested equal to tiktoken's `encode_ordinary`)."""
    enc = getattr(tok, "_enc", None)  # the tiktoken.Encoding inside TiktokenGPT2
    if enc is not None and hasattr(enc, "encode_to_numpy"):
        return [enc.encode_to_numpy(t, disallowed_special=()).astype(dtype) for t in texts]
    return [np.asarray(x, dtype=dtype) for x in tok.encode_batch(texts)]


def _with_eot(data: np.ndarray, ends: np.ndarray, dtype, eot: int) -> np.ndarray:
    """The bytes as ids with end-of-text after each document (which ends at `ends`): one slice
    copy per document when documents are long, one masked copy when they are many and short."""
    n = len(ends)
    tokens = np.empty(len(data) + n, dtype=dtype)
    at = ends + np.arange(n)  # where each end-of-text goes
    if n * 256 <= len(data):
        prev = 0
        for e, a in zip(ends.tolist(), at.tolist()):
            tokens[a - (e - prev) : a] = data[prev:e]
            prev = e
    else:
        mask = np.ones(len(tokens), bool)
        mask[at] = False
        tokens[mask] = data
    tokens[at] = eot
    return tokens


def byte_histogram(data: np.ndarray) -> np.ndarray:
    """(256,) int64 counts of the bytes; pairs of bytes are counted as uint16 values (half the
    elements for np.bincount, which is what costs), then folded."""
    pairs = data[: len(data) // 2 * 2].view(np.uint16)
    folded = np.bincount(pairs, minlength=1 << 16).reshape(256, 256)
    counts = folded.sum(axis=0) + folded.sum(axis=1)  # little-endian: low byte, high byte
    if len(data) % 2:
        counts[data[-1]] += 1
    return counts.astype(np.int64)


# ---- in a pool: through a spill file -------------------------------------------------------


def run_piece(piece, skip: int, spill: str) -> tuple[list, list[str]]:
    """A worker's task: read and tokenize the piece, write its chunks (the first `skip` left
    out: already consumed before a resume) to `spill` as raw arrays, each 8-byte aligned;
    returns the index of the chunks [(offset, tokens, documents, heldout bytes)] and the
    skipped files."""
    skipped: list[str] = []
    index, offset = [], 0
    with open(spill, "wb") as f:
        for k, enc in enumerate(piece_chunks(piece, skipped)):
            if k < skip:
                continue
            held = json.dumps(enc.heldout).encode()
            index.append((offset, len(enc.tokens), len(enc.val), len(held)))
            for part in (enc.tokens, enc.doc_tokens, enc.doc_bytes, enc.val.view(np.uint8),
                         enc.byte_counts, np.frombuffer(enc.digest + held, np.uint8)):  # fmt: skip
                f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
                f.write(b"\0" * (-part.nbytes % 8))
                offset += part.nbytes + (-part.nbytes % 8)
    return index, skipped


def _layout(dtype, n_tok: int, n_doc: int, n_held: int) -> list[tuple]:
    return [(dtype, n_tok), (np.int64, n_doc), (np.int64, n_doc), (np.bool_, n_doc),
            (np.int64, 256), (np.uint8, 32 + n_held)]  # fmt: skip


def read_spill(spill: Path, index: list, dtype) -> Iterator[Encoded]:
    """The chunks a worker wrote, each as views of a memory map of its own bytes (no copy, and
    only one chunk mapped at a time; plain arrays, nothing in the file is executed)."""
    dtype = np.dtype(dtype)
    for offset, n_tok, n_doc, n_held in index:
        layout = [(np.dtype(dt), n) for dt, n in _layout(dtype, n_tok, n_doc, n_held)]
        sizes = [dt.itemsize * n for dt, n in layout]
        data = np.memmap(spill, np.uint8, mode="r", offset=offset,
                         shape=(sum(z + (-z % 8) for z in sizes),))  # fmt: skip
        parts, at = [], 0
        for (dt, _), size in zip(layout, sizes):
            parts.append(data[at : at + size].view(dt))
            at += size + (-size % 8)
        tail = parts[-1].tobytes()
        yield Encoded(*parts[:5], tail[:32], json.loads(tail[32:]))
        del data, parts
