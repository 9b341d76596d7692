"""`stalwart prepare`: documents -> token shards + meta.json, streaming, parallel, resumable.

The input is cut into pieces (sources.py: files, parquet row groups, byte ranges of big .jsonl
files, about `piece_bytes` each); `workers` processes each read, decode and tokenize whole
pieces by themselves (encode.py), while this process only routes their results, in input order,
into token shards (shards.py) and hashes them. Nothing proportional to the corpus is held:
memory is one chunk of ~1 MB of text per process (a worker's results wait in a spill file).
Each document ends with end-of-text and goes to the train or held-out split by a hash of its
text, capped at `val_tokens`.

Atomic and resumable: everything is written into `.OUT.partial/` beside OUT, which holds no
meta.json (so it never opens as a dataset) until the end, when it is renamed to OUT. At every
finished shard (and every 30 s) the shards are synced and `progress.json` records the piece
and chunk reached; a rerun of the same command after a crash continues from there (a changed
command or changed inputs start over). A user error removes the partial output.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from stalwart.data import encode
from stalwart.data.job import Job
from stalwart.data.sources import PIECE_BYTES, Corpus, stdlib_sources
from stalwart.data.stats import say
from stalwart.data.tokenizer import GPT2_FILE, HFTokenizer, parse_spec
from stalwart.errors import UserError

__all__ = ["prepare", "bits_per_byte", "check_ids", "stdlib_sources"]


def prepare(
    inputs: list[str],
    tokenizer: str,
    out: str | Path,
    val_frac: float = 0.1,
    force: bool = False,
    *,
    val_tokens: int = 10_000_000,
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    text_field: str = "text",
    hf_dataset: str | None = None,
    bpe_sample_bytes: int = 100_000_000,
    baseline_bytes: int = 2_000_000,
    progress: bool = True,
    piece_bytes: int = PIECE_BYTES,
) -> dict:
    """Build a dataset directory; returns its meta.json contents. piece_bytes: the on-disk size
    of the pieces the workers read (not a CLI flag: tests make it small to get many pieces)."""
    kind, _, vocab_file = parse_spec(tokenizer)
    _check_numbers(val_frac, val_tokens, workers, shard_tokens, bpe_sample_bytes, baseline_bytes)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty: choose another --out or --force")
    corpus = Corpus(inputs, text_field, hf_dataset)
    workers = workers or len(os.sched_getaffinity(0))
    settings = {
        "tokenizer": tokenizer, "val_frac": val_frac, "val_tokens": val_tokens,
        "shard_tokens": shard_tokens, "bpe_sample_bytes": bpe_sample_bytes,
        "baseline_bytes": baseline_bytes, "piece_bytes": piece_bytes,
        "corpus": corpus.fingerprint(),
    }  # fmt: skip
    work = out.parent / f".{out.name}.partial"
    state = _resume_state(work, settings)
    try:
        tok = _tokenizer(
            kind, tokenizer, vocab_file, corpus, work, state, val_frac, bpe_sample_bytes
        )
        job = Job(work, corpus, tok, settings, state, progress)
        job.run(workers, piece_bytes)
        meta = job.finish()
        _publish(work, out)
    except UserError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise UserError(
                f"the disk filled up while writing {work} ({os.strerror(e.errno)}): free space "
                "or choose an --out on a larger disk; nothing was kept"
            ) from None
        raise
    say(f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens")
    return meta


def _check_numbers(val_frac, val_tokens, workers, shard_tokens, bpe_sample, baseline) -> None:
    if not 0.0 < val_frac < 1.0:
        raise UserError(f"--val-frac must be between 0 and 1, got {val_frac}")
    for flag, value in (("--val-tokens", val_tokens), ("--shard-tokens", shard_tokens),
                        ("--bpe-sample-bytes", bpe_sample), ("--workers", workers or 1)):  # fmt: skip
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if baseline < 0:
        raise UserError(f"baseline_bytes must be >= 0, got {baseline}")


def _resume_state(work: Path, settings: dict) -> dict | None:
    """The progress of an interrupted run of the same command, or None (and a clean start)."""
    try:
        state = json.loads((work / "progress.json").read_text())
    except (OSError, ValueError):
        state = None
    if state and state.get("settings") == json.loads(json.dumps(settings)):
        say(f"resuming {work}: from piece {state['piece']:,}, chunk {state['chunk']:,}")
        return state
    if work.exists():
        say(f"starting over: {work} is from another command or other inputs")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return None


def _tokenizer(kind, spec, vocab_file, corpus, work, state, val_frac, sample_bytes):
    """Built once here (failing fast, e.g. offline) and recreated the same way in each worker
    from (spec, work dir): BPE's tokenizer.json and GPT-2's vocabulary live in the work dir."""
    if kind == "gpt2" and vocab_file and not (work / GPT2_FILE).is_file():
        if not Path(vocab_file).is_file():
            raise UserError(f"--tokenizer {spec}: no such file (a .tiktoken vocabulary)")
        shutil.copyfile(vocab_file, work / GPT2_FILE)
    if kind == "bpe" and not (state and (work / "tokenizer.json").is_file()):
        texts = _bpe_sample(corpus, val_frac, sample_bytes)
        say(f"training a byte-level BPE of {parse_spec(spec)[1]} tokens on train documents")
        HFTokenizer.train(texts, parse_spec(spec)[1]).save(work / "tokenizer.json")
    encode.init_worker(spec, str(work), "uint32", val_frac)  # fails fast here, not in a worker
    return encode._state["tok"]


def _bpe_sample(corpus: Corpus, val_frac: float, limit: int):
    """The first `limit` bytes of *train* documents: held-out ones never shape the vocabulary."""
    threshold, seen = int(val_frac * 2**64), 0
    for _, text in corpus:
        data = text.encode("utf-8")
        if seen >= limit:
            return
        if text and not encode.is_held_out(data, threshold):
            seen += len(data)
            yield text


def _publish(work: Path, out: Path) -> None:
    """The finished dataset takes OUT's place; an old one (only with --force) goes after."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """Every token id must index the embedding table; an out-of-range id is a NaN waiting."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise UserError(
            f"{what} holds token id {int(ids.max())} outside the vocabulary of {vocab_size}: "
            "the data and tokenizer do not match; re-run prepare"
        )


def bits_per_byte(loss_nats: float, meta: dict) -> float:
    """Per-token cross-entropy (nats) -> bits per byte of the held-out text."""
    return loss_nats * meta["val_tokens"] / meta["val_bytes"] / math.log(2)
