"""One prepare run: pieces of the input -> workers that read and tokenize them -> token shards,
in input order.

`Job` holds the counters, the two shard writers and the held-out sample; `run()` hands the
pieces (sources.py) to worker processes, at most 2 per worker in flight, each of which reads its
piece itself and writes the chunks to a spill file (encode.py), and consumes the results in
input order; `finish()` writes meta.json. prepare.py decides what to run and where (settings,
resume, the tokenizer, publishing the result).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from stalwart.data import encode
from stalwart.data.shards import BackgroundWriter, ShardWriter, cut_tail
from stalwart.data.sources import Corpus
from stalwart.data.stats import Meter, compressor_baselines, say
from stalwart.data.tokenizer import ByteTokenizer
from stalwart.errors import UserError
from stalwart.eval.builtin_task import make_next_line_task

FORMAT = 2
SYNC_EVERY_S = 30.0
HELDOUT = "heldout.jsonl"  # held-out documents kept for the baselines (and the built-in task)
TASK_FILE = "tasks/next-line.jsonl"
SPILL = "spill"


class Job:
    """One prepare run: the counters, the two shard writers and the held-out sample."""

    def __init__(self, work: Path, corpus: Corpus, tok, settings: dict, state, progress: bool):
        self.work, self.corpus, self.tok, self.settings = work, corpus, tok, settings
        self.dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
        s = state or {}
        # where the input resumes: the next piece to consume, and its chunks already consumed
        self.piece, self.chunk = s.get("piece", 0), s.get("chunk", 0)
        self.skipped: list[str] = s.get("skipped", [])  # files that are not UTF-8 text
        self.disk_done = s.get("disk_done", 0)
        self.counts = s.get("counts", {"train_docs": 0, "val_docs": 0, "train_bytes": 0,
                                       "val_bytes": 0, "moved_by_cap": 0})  # fmt: skip
        self.byte_counts = np.array(s.get("byte_counts", [0] * 256), dtype=np.int64)
        self.chain = s.get("chain", "")  # sha256 chained over chunk digests: the corpus id
        self.heldout_limit = None if corpus.builtin else settings["baseline_bytes"]
        self.heldout_size = s.get("heldout_size", 0)
        with open(work / HELDOUT, "ab") as f:
            f.truncate(self.heldout_size)
        shard = settings["shard_tokens"]
        self.train = BackgroundWriter(ShardWriter(work, "train", self.dtype, shard, s.get("train")))
        self.val = BackgroundWriter(ShardWriter(work, "val", self.dtype, shard, s.get("val")))
        self.meter = Meter(corpus.bytes_total, enabled=progress)
        self.last_sync = time.monotonic()

    def run(self, workers: int, piece_bytes: int) -> None:
        pieces = islice(self.corpus.pieces(piece_bytes), self.piece, None)
        spec, s = self.settings["tokenizer"], self.settings
        args = (spec, str(self.work), self.dtype.name, s["val_frac"], self.corpus.text_field,
                self.heldout_limit)  # fmt: skip
        spill = self.work / SPILL
        shutil.rmtree(spill, ignore_errors=True)  # a killed run's, even when this one has no pool
        if workers == 1:  # in this process, with the tokenizer prepare.py already built
            encode.init_worker(*args, tok=self.tok)
            for piece in pieces:
                skipped: list[str] = []
                chunks = encode.piece_chunks(piece, skipped)
                for enc in islice(chunks, self.chunk, None):
                    self._consume(enc)
                self._end_piece(piece, skipped)
            return
        spill.mkdir()
        ctx = get_context("spawn")  # no fork of a process that may hold threads (torch, arrow)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=args)
        ok = False
        try:
            pending: deque = deque()  # in input order, at most 2 per worker: bounded memory
            for piece in pieces:
                path = spill / f"{piece.index}.npy"
                skip = self.chunk if not pending and piece.index == self.piece else 0
                pending.append((piece, path, pool.submit(encode.run_piece, piece, skip, str(path))))
                if len(pending) >= 2 * workers:
                    self._collect(*pending.popleft())
            while pending:
                self._collect(*pending.popleft())
            ok = True
        finally:
            _stop(pool, wait=ok)
        shutil.rmtree(spill, ignore_errors=True)

    def _collect(self, piece, path: Path, fut) -> None:
        """One piece's results, from the spill file its worker wrote."""
        index, skipped = fut.result()  # a worker's UserError / OSError is raised here, as it was
        for enc in encode.read_spill(path, index, self.dtype):
            self._consume(enc)
        path.unlink()
        self._end_piece(piece, skipped)

    def _end_piece(self, piece, skipped: list[str]) -> None:
        self.skipped += skipped
        self.piece, self.chunk = piece.index + 1, 0
        self.disk_done += piece.size

    def _consume(self, enc: encode.Encoded) -> None:
        """Route one chunk's documents to the splits, in order; sync at shard ends."""
        val = enc.val.copy()
        cap, c = self.settings["val_tokens"], self.counts
        room = cap - self.val.tokens
        for i in np.flatnonzero(val):  # the cap: past it, held-out documents train instead
            if enc.doc_tokens[i] > room:
                val[i] = False
                c["moved_by_cap"] += 1
            else:
                room -= int(enc.doc_tokens[i])
        ends = np.cumsum(enc.doc_tokens)
        starts = ends - enc.doc_tokens
        if val.any():
            texts = {i: (name, text) for i, name, text in enc.heldout}
            for i in np.flatnonzero(val):
                self.val.write(enc.tokens[starts[i] : ends[i]])
                if int(i) in texts:
                    self._keep_heldout(*texts[int(i)])
            # the runs of train documents between held-out ones, written as they are (no copy)
            edges = np.flatnonzero(np.diff(np.concatenate([[True], val, [True]]).astype(np.int8)))
            for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
                self.train.write(enc.tokens[starts[a] : ends[b - 1]])
        else:
            self.train.write(enc.tokens)
        c["val_docs"] += int(val.sum())
        c["train_docs"] += len(val) - int(val.sum())
        c["val_bytes"] += int(enc.doc_bytes[val].sum())
        c["train_bytes"] += int(enc.doc_bytes[~val].sum())
        self.byte_counts += enc.byte_counts
        self.chain = _sha256((self.chain + enc.digest.hex()).encode())
        self.chunk += 1
        self.meter.add(int(enc.doc_bytes.sum()), len(val), len(enc.tokens), self.disk_done)
        if (
            self.train.finished_since_sync
            or self.val.finished_since_sync
            or (time.monotonic() - self.last_sync > SYNC_EVERY_S)
        ):
            self._sync()

    def _keep_heldout(self, name: str, text: str) -> None:
        if self.heldout_limit is not None and self.heldout_size >= self.heldout_limit:
            return
        line = (json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n").encode()
        with open(self.work / HELDOUT, "ab") as f:
            f.write(line)
        self.heldout_size += len(line)

    def _sync(self) -> None:
        """Make the shards durable, then record how far they go (atomically: tmp + rename)."""
        state = {
            "settings": self.settings, "piece": self.piece, "chunk": self.chunk,
            "skipped": self.skipped, "disk_done": self.disk_done, "counts": self.counts,
            "byte_counts": self.byte_counts.tolist(), "chain": self.chain,
            "heldout_size": self.heldout_size, "train": self.train.sync(), "val": self.val.sync(),
        }  # fmt: skip
        tmp = self.work / "progress.json.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.work / "progress.json")
        self.last_sync = time.monotonic()

    def finish(self) -> dict:
        train, val = self.train.close(), self.val.close()
        if self.skipped:
            say(f"skipped {len(self.skipped)} files that are not UTF-8 text, e.g. "
                f"{self.skipped[0]}")  # fmt: skip
        n_train, n_val = self.train.tokens, self.val.tokens
        if n_train + n_val == 0:
            raise UserError("the inputs hold no text: pass non-empty text files")
        if n_val == 0 and n_train >= 4:  # e.g. one big file: hold out the tail of the stream
            val = self._hold_out_tail(train)
            n_train, n_val = self.train.tokens, self.val.tokens
        if n_val == 0 or n_train < 2:
            raise UserError(
                f"the inputs are too small to split ({self.counts['train_docs'] + self.counts['val_docs']} "
                f"documents, {n_train + n_val} tokens; held out: {n_val}): add more documents "
                "or raise --val-frac"
            )
        heldout = _read_heldout(self.work / HELDOUT)
        sample = "".join(t for _, t in heldout).encode()[: self.settings["baseline_bytes"]]
        meta = self._meta(train, val, sample)
        if self.corpus.builtin:
            meta["tasks"] = {"next-line": self._task(heldout)}
        (self.work / HELDOUT).unlink()
        (self.work / "progress.json").unlink(missing_ok=True)
        with open(self.work / "meta.json", "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return meta

    def _hold_out_tail(self, train: list) -> list:
        """Too few documents for the per-document rule to pick any (a single file, say): the
        last val_frac of the train tokens (capped) are held out instead, as nanoGPT's
        shakespeare does. Their bytes are counted by decoding them, end-of-text excluded."""
        s, c, eot = self.settings, self.counts, self.tok.eot_id
        n = min(max(1, round(self.train.tokens * s["val_frac"])), s["val_tokens"])
        tail = cut_tail(self.work, train, self.dtype, n)  # the train writer's shards, in place
        self.val = ShardWriter(self.work, "val", self.dtype, s["shard_tokens"])
        self.val.write(tail)
        text = self.tok.decode(tail[tail != eot].tolist())
        exact = isinstance(self.tok, ByteTokenizer)  # a cut may split a character: count ids
        nbytes = int((tail != eot).sum()) if exact else len(text.encode("utf-8"))
        c["val_bytes"], c["train_bytes"] = nbytes, c["train_bytes"] - nbytes
        c["tail_held_out"] = True
        self._keep_heldout("tail", text[: s["baseline_bytes"]])
        return self.val.close()

    def _meta(self, train: list, val: list, sample: bytes) -> dict:
        c, s = self.counts, self.settings
        return {
            "format": FORMAT, "tokenizer": self.tok.spec, "vocab_size": self.tok.vocab_size,
            "eot_id": self.tok.eot_id, "dtype": self.dtype.name,
            "train_tokens": self.train.tokens, "val_tokens": self.val.tokens,
            "train_bytes": c["train_bytes"], "val_bytes": c["val_bytes"],
            "documents": c["train_docs"] + c["val_docs"],
            "documents_by_split": {"train": c["train_docs"], "val": c["val_docs"]},
            "skipped_files": len(self.skipped),
            "shards": {"train": train, "val": val},
            "split": {
                "rule": "blake2b-64(utf-8 text) / 2**64 < val_frac, then the val_tokens cap",
                "val_frac": s["val_frac"], "val_tokens_cap": s["val_tokens"],
                "moved_to_train_by_cap": c["moved_by_cap"],
                "tail_held_out": c.get("tail_held_out", False),
            },
            "source": {**self.corpus.source, "sha256": self.chain},
            "baselines_bits_per_byte": compressor_baselines(sample, self.byte_counts),
            "baseline_sample_bytes": len(sample),
        }  # fmt: skip

    def _task(self, heldout: list) -> dict:
        try:
            info = make_next_line_task(heldout, self.work / TASK_FILE, n=500, seed=0)
        except ValueError as e:
            raise UserError(f"the built-in task could not be written: {e}") from None
        return {"file": TASK_FILE, "examples": info["examples"], "chance": info["chance"]}


def _init(*args) -> None:
    """A worker process: die with the parent (a SIGKILLed prepare leaves no orphans), then
    build the tokenizer."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass
    encode.init_worker(*args)


def _stop(pool: ProcessPoolExecutor, wait: bool) -> None:
    """Shut the pool down; after an error, kill the workers rather than wait for their pieces."""
    if not wait:
        for proc in list(getattr(pool, "_processes", {}).values()):  # no public kill before 3.14
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_heldout(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [(d["name"], d["text"]) for d in map(json.loads, f)]
