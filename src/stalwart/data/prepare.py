"""`stalwart prepare`: text -> tokens -> train.bin / val.bin / meta.json.

Inputs are text files, directories of them, `.jsonl` files with a `text` field, or nothing: the
built-in corpus, the Python standard library's own source, which exists wherever Python does.
Documents are shuffled with a fixed seed (so the held-out 10% is representative, not the
alphabetical tail), concatenated, and split 90/10 on the token stream. The output directory is
written to a temporary sibling and renamed into place, so a failed prepare never leaves half a
dataset and never touches an existing one.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import random
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

from stalwart.data.tokenizer import ByteTokenizer, HFTokenizer, TiktokenGPT2, parse_spec
from stalwart.errors import UserError

SPLIT_SEED = 1337


def stdlib_sources() -> list[Path]:
    """`*.py` of the standard library, without tests and site-packages (about 12 MB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in skip_dirs for part in rel[:-1]) or rel[-1].startswith("test_"):
            continue
        out.append(p)
    return out


def _read_documents(inputs: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """(name, text) pairs plus a description of the sources for meta.json."""
    if not inputs:
        paths = stdlib_sources()
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [(str(p.relative_to(root)), p.read_text("utf-8", errors="replace")) for p in paths]
        source = {
            "kind": "python-stdlib",
            "python_version": sys.version.split()[0],
            "root": str(root),
        }
        return docs, source
    docs: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not _hidden(f, p))
            for f in files:
                text = _read_text(f, strict=False)
                if text is not None:
                    docs.append((str(f), text))
        elif p.is_file():
            if p.suffix == ".jsonl":
                docs.extend(_read_jsonl(p))
            else:
                docs.append((str(p), _read_text(p, strict=True)))
        else:
            raise UserError(f"input {item} does not exist: pass text files or directories")
        _progress(f"read {len(docs)} documents")
    return docs, {"kind": "files", "inputs": [str(Path(i).resolve()) for i in inputs]}


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def _read_text(path: Path, strict: bool) -> str | None:
    data = path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise UserError(f"{path} is not UTF-8 text: convert it or leave it out") from None
        return None  # binary files inside a directory are skipped


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno} is not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f'{path}:{lineno} has no string "text" field')
            docs.append((f"{path}:{lineno}", obj["text"]))
    return docs


_last_progress = [0.0]


def _progress(msg: str, force: bool = False) -> None:
    """A status line on stderr at most every 2 s: big inputs show that work is happening."""
    now = time.monotonic()
    if force or now - _last_progress[0] > 2.0:
        _last_progress[0] = now
        print(f"prepare: {msg}", file=sys.stderr, flush=True)


def _tokenize(docs: list[str], tok) -> np.ndarray:
    """Concatenate the documents' tokens (separated by <|endoftext|> where the vocab has it)."""
    parts: list[np.ndarray] = []
    eot = [] if tok.eot_id is None else [tok.eot_id]
    chunk = 256
    for i in range(0, len(docs), chunk):
        batch = docs[i : i + chunk]
        if isinstance(tok, ByteTokenizer):
            ids = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8) for d in batch]
        elif isinstance(tok, HFTokenizer):
            ids = [np.asarray(x + eot, dtype=np.int64) for x in tok.encode_batch(batch)]
        else:
            ids = [np.asarray(tok.encode(d) + eot, dtype=np.int64) for d in batch]
        parts.extend(ids)
        _progress(f"tokenized {min(i + chunk, len(docs))}/{len(docs)} documents")
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """Every token id must index the embedding table; an out-of-range id is a NaN waiting."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise UserError(
            f"{what} holds token id {int(ids.max())} outside the vocabulary of {vocab_size}: "
            "the data and tokenizer do not match; re-run prepare"
        )


def _as_bytes(ids: np.ndarray, tok) -> bytes:
    if isinstance(tok, ByteTokenizer):
        return ids.astype(np.uint8).tobytes()
    return tok.decode(ids.tolist()).encode("utf-8")


def compressor_baselines(train_bytes: bytes, val_bytes: bytes) -> dict[str, float]:
    """Bits per byte that general compressors (and a unigram model) reach on the held-out text."""
    n = max(len(val_bytes), 1)
    counts = np.bincount(np.frombuffer(train_bytes, dtype=np.uint8), minlength=256) + 1
    logp = np.log2(counts / counts.sum())
    val_counts = np.bincount(np.frombuffer(val_bytes, dtype=np.uint8), minlength=256)
    return {
        "gzip-9": 8 * len(zlib.compress(val_bytes, 9)) / n,
        "xz-9": 8 * len(lzma.compress(val_bytes, preset=9)) / n,
        "unigram": float(-(val_counts * logp).sum() / n),
    }


def prepare(
    inputs: list[str],
    tokenizer: str,
    out: str | Path,
    val_frac: float = 0.1,
    force: bool = False,
) -> dict:
    """Build a dataset directory; returns its meta.json contents."""
    kind, vocab = parse_spec(tokenizer)
    out = Path(out)
    if not 0.0 < val_frac < 1.0:
        raise UserError(f"--val-frac must be between 0 and 1, got {val_frac}")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty: choose another --out or --force")
    tok = TiktokenGPT2() if kind == "gpt2" else None  # fail fast offline, before reading
    named_docs, source = _read_documents(inputs)
    named_docs = [(n, t) for n, t in named_docs if t]
    if not named_docs:
        raise UserError("the inputs hold no text: pass non-empty text files")
    digest = hashlib.sha256()
    for name, text in sorted(named_docs):
        digest.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
    random.Random(SPLIT_SEED).shuffle(named_docs)
    docs = [t for _, t in named_docs]
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "bpe":
        _progress(f"training a byte-level BPE of {vocab} tokens", force=True)
        tok = HFTokenizer.train(docs, vocab)

    ids = _tokenize(docs, tok)
    check_ids(ids, tok.vocab_size, "the tokenized text")
    n_val = max(1, int(round(len(ids) * val_frac)))
    if len(ids) - n_val < 2:
        raise UserError(f"the inputs are too small to split ({len(ids)} tokens): add more text")
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    train_text, val_text = _as_bytes(train_ids, tok), _as_bytes(val_ids, tok)

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train_ids.astype(dtype).tofile(tmp / "train.bin")
        val_ids.astype(dtype).tofile(tmp / "val.bin")
        if isinstance(tok, HFTokenizer):
            tok.save(tmp / "tokenizer.json")
        meta = {
            "format": 1,
            "tokenizer": tok.spec,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": np.dtype(dtype).name,
            "train_tokens": int(len(train_ids)),
            "val_tokens": int(len(val_ids)),
            "train_bytes": len(train_text),
            "val_bytes": len(val_text),
            "documents": len(docs),
            "val_frac": val_frac,
            "split_seed": SPLIT_SEED,
            "source": {**source, "sha256": digest.hexdigest()},
            "baselines_bits_per_byte": compressor_baselines(train_text, val_text),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # only reached with --force
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress(
        f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens",
        force=True,
    )
    return meta


def bits_per_byte(loss_nats: float, meta: dict) -> float:
    """Per-token cross-entropy (nats) -> bits per byte of the held-out text."""
    return loss_nats * meta["val_tokens"] / meta["val_bytes"] / math.log(2)
