"""prepare's workers read their own pieces of the input: parquet row groups, byte ranges of an
uncompressed .jsonl, whole compressed files, batches of small files. Whatever the pieces and the
number of workers, the output is the same bytes, every document is read exactly once, an error
inside a worker is the user's one line, and an interrupted run resumes from any point."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from stalwart.data import job as job_module
from stalwart.data.loader import open_dataset
from stalwart.data.prepare import prepare
from stalwart.data.readers import read_part
from stalwart.data.sources import Corpus
from stalwart.errors import UserError
from tests.conftest import STDLIB

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _texts(n: int, seed: int) -> list[str]:
    """Real text of varied lengths (stdlib source lines), none alike."""
    lines = (STDLIB / "textwrap.py").read_text().splitlines(keepends=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        start = int(rng.integers(0, len(lines) - 40))
        out.append(
            f"# doc {seed}-{i} é✓\n" + "".join(lines[start : start + int(rng.integers(1, 40))])
        )
    return out


def _corpus(d):
    """Every kind of piece: a plain .jsonl cut into byte ranges, a .jsonl.gz read whole, a
    parquet file of several row groups (a large_string column with nulls and empty strings),
    small text files batched together, and a binary file that is skipped."""
    d.mkdir()
    docs = {k: _texts(60, k) for k in range(4)}
    with open(d / "a.jsonl", "w") as f:
        for t in docs[0]:
            f.write(json.dumps({"text": t}) + "\n" + ("\n" if len(t) % 3 == 0 else ""))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t, "n": 1}) + "\n" for t in docs[1])
    col = docs[2] + [None, ""]
    table = pa.table({"text": pa.array(col, pa.large_string()), "i": list(range(len(col)))})
    pq.write_table(table, d / "c.parquet", row_group_size=7)
    for i, t in enumerate(docs[3]):
        (d / f"t{i:02d}.txt").write_text(t)
    (d / "z.bin").write_bytes(bytes(range(256)) * 8)
    return d, [t for k in range(4) for t in docs[k]]


def _tree(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _documents(ds_dir) -> list[bytes]:
    ds = open_dataset(ds_dir)
    out = []
    for stream in (ds.train, ds.val):
        ids = stream[:]
        ends = np.flatnonzero(ids == 256)
        out += [ids[s:e].astype(np.uint8).tobytes() for s, e in zip([0, *(ends[:-1] + 1)], ends)]
    return out


KW = {"piece_bytes": 2_000, "shard_tokens": 3_000, "val_frac": 0.2, "val_tokens": 4_000,
      "progress": False}  # fmt: skip


def test_same_bytes_for_1_2_3_workers_and_every_document_once(tmp_path):
    src, texts = _corpus(tmp_path / "src")
    pieces = list(Corpus([str(src)]).pieces(KW["piece_bytes"]))
    kinds = {(p.kind, p.end >= 0) for piece in pieces for p in piece.parts}
    assert len(pieces) > 20 and ("jsonl", True) in kinds and ("parquet", False) in kinds
    trees = []
    for w in (1, 2, 3):
        meta = prepare([str(src)], "byte", tmp_path / f"w{w}", workers=w, **KW)
        trees.append(_tree(tmp_path / f"w{w}"))
    assert trees[0] == trees[1] == trees[2]  # every shard and meta.json, byte for byte
    assert sorted(_documents(tmp_path / "w1")) == sorted(t.encode() for t in texts)
    assert meta["documents"] == len(texts) and meta["skipped_files"] == 1
    assert meta["split"]["moved_to_train_by_cap"] > 0 and len(meta["shards"]["train"]) > 5
    assert meta["baseline_sample_bytes"] > 0


@pytest.mark.parametrize("piece_bytes", [1, 97, 1000, 10**9])
def test_byte_ranges_give_every_line_once(tmp_path, piece_bytes):
    """A line belongs to the range its first byte is in: ranges cut anywhere (even inside a
    multi-byte character) read each line exactly once, blank lines included."""
    texts = _texts(40, 7)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n\n" for t in texts))
    corpus = Corpus([str(path)])
    parts = [p for piece in corpus.pieces(piece_bytes) for p in piece.parts]
    got = [t for p in parts for b in read_part(p, "text", True, []) for t in b.texts]
    assert got == texts
    assert len(parts) == (
        1 if piece_bytes >= path.stat().st_size else -(-path.stat().st_size // piece_bytes)
    )


def test_a_workers_error_names_the_line_of_the_whole_file(tmp_path):
    """A malformed line deep inside a byte range read by a worker: the same one error, with the
    line number counted from the start of the file."""
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": t}) for t in _texts(50, 3)]
    lines[41] = '{"text": "cut'
    path.write_text("\n".join(lines) + "\n")
    for w in (1, 2):
        with pytest.raises(UserError, match=r"big.jsonl:42 is not valid JSON$"):
            prepare([str(path)], "byte", tmp_path / f"o{w}", workers=w, piece_bytes=500,
                    progress=False)  # fmt: skip
        assert not list(tmp_path.glob(f".o{w}*")) and not (tmp_path / f"o{w}").exists()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_anywhere_then_rerun_gives_the_same_bytes(
    tmp_path, monkeypatch, capfd, workers
):
    """The run stops after k chunks (mid-piece, mid-shard); the rerun, with the other worker
    count, resumes from the last sync (piece, chunk) and ends byte-identical to an
    uninterrupted run (a killed pool's spill files included: none is left in the dataset)."""
    src, _ = _corpus(tmp_path / "src")
    prepare([str(src)], "byte", tmp_path / "ref", workers=1, **KW)
    ref = _tree(tmp_path / "ref")
    consume = job_module.Job._consume
    for stop_after in (9, 23, 40):
        seen = [0]

        def stopping(self, enc, seen=seen, stop_after=stop_after):
            seen[0] += 1
            if seen[0] > stop_after:
                raise _Stop
            consume(self, enc)

        monkeypatch.setattr(job_module.Job, "_consume", stopping)
        out = tmp_path / f"o{stop_after}"
        with pytest.raises(_Stop):
            prepare([str(src)], "byte", out, workers=workers, **KW)
        state = json.loads((tmp_path / f".o{stop_after}.partial" / "progress.json").read_text())
        assert state["piece"] > 0
        monkeypatch.setattr(job_module.Job, "_consume", consume)
        capfd.readouterr()
        prepare([str(src)], "byte", out, workers=3 - workers, **KW)  # the other count
        assert f"from piece {state['piece']}, chunk {state['chunk']}" in capfd.readouterr().err
        assert _tree(out) == ref, stop_after


def test_a_streamed_dataset_is_read_here_and_tokenized_by_workers(tmp_path, monkeypatch):
    """--hf-dataset has no files to split: this process reads the stream and hands batches of
    documents to the workers; still the same bytes for 1 and 2 workers, every document once."""
    pytest.importorskip("datasets")
    from stalwart.data import sources

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sources, "BLOCK_BYTES", 5_000)  # many batches
    src = tmp_path / "local"
    src.mkdir()
    texts = _texts(80, 11)
    (src / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for w in (1, 2):
        prepare([], "byte", tmp_path / f"w{w}", workers=w, hf_dataset=str(src), **KW)
    assert _tree(tmp_path / "w1") == _tree(tmp_path / "w2")
    assert sorted(_documents(tmp_path / "w1")) == sorted(t.encode() for t in texts)


def test_a_parquet_column_that_is_not_text_is_one_clear_error(tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    for w in (1, 2):
        with pytest.raises(UserError, match="column 'text' is int64, not text"):
            prepare([str(tmp_path / "ints.parquet")], "byte", tmp_path / f"o{w}", workers=w,
                    progress=False)  # fmt: skip
