"""prepare's output (shards, split, formats, determinism across workers) and the loader over it."""

import gzip
import json

import numpy as np
import pytest
import torch

from stalwart.data.loader import BatchLoader, EpochOrder, eval_batches, open_dataset
from stalwart.data.prepare import check_ids, prepare, stdlib_sources
from stalwart.data.tokenizer import ByteTokenizer, load_tokenizer
from stalwart.errors import UserError
from tests.conftest import TINY, run_cli

EOT = 256


def _split_docs(stream) -> list[bytes]:
    """A split's documents, decoded from the byte tokens (each ends with end-of-text)."""
    ids = stream[:]
    assert ids[-1] == EOT
    ends = np.flatnonzero(ids == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e].astype(np.uint8).tobytes() for s, e in zip(starts, ends)]


def _docs_of(ds) -> list[bytes]:
    return _split_docs(ds.train) + _split_docs(ds.val)


def _write_docs(d, docs):
    d.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(text)
    return d


DOCS = [
    f"def f{i}(x):\n    return x * {i}  # é✓ {'z' * (i % 7)}\n" * (1 + i % 5) for i in range(60)
]


def test_prepare_round_trip(tmp_path):
    src = _write_docs(tmp_path / "src", DOCS)
    meta = prepare([str(src)], "byte", tmp_path / "ds", progress=False)
    ds = open_dataset(tmp_path / "ds")
    # every document comes back whole and exactly, each followed by end-of-text
    assert sorted(_docs_of(ds)) == sorted(d.encode() for d in DOCS)
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(d.encode()) for d in DOCS)
    assert meta["train_tokens"] + meta["val_tokens"] == meta["train_bytes"] + meta["val_bytes"] + 60
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["eot_id"] == EOT
    assert meta["documents_by_split"]["val"] > 0 and len(meta["source"]["sha256"]) == 64
    assert meta["baseline_sample_bytes"] == meta["val_bytes"]  # small: the whole held-out text
    tok = load_tokenizer(tmp_path / "ds", meta["tokenizer"])
    assert tok.decode([104, 105, EOT, 33]) == "hi<|endoftext|>!"


def test_split_is_stable_when_data_is_added(tmp_path):
    """The held-out split is chosen per document by a hash of its text: adding documents does
    not move any existing one to the other side."""
    a = prepare(
        [str(_write_docs(tmp_path / "a", DOCS[:40]))], "byte", tmp_path / "da", progress=False
    )
    more = DOCS[:40] + [f"extra document {i}\n" * 9 for i in range(50)]
    prepare([str(_write_docs(tmp_path / "b", more))], "byte", tmp_path / "db", progress=False)
    val_a = set(_split_docs(open_dataset(tmp_path / "da").val))
    val_b = set(_split_docs(open_dataset(tmp_path / "db").val))
    assert val_a and val_a == {d for d in val_b if d in set(x.encode() for x in DOCS[:40])}
    assert a["split"]["moved_to_train_by_cap"] == 0


def test_val_tokens_cap(tmp_path):
    src = _write_docs(tmp_path / "src", DOCS)
    meta = prepare(
        [str(src)], "byte", tmp_path / "ds", val_frac=0.5, val_tokens=300, progress=False
    )
    assert 0 < meta["val_tokens"] <= 300 and meta["split"]["moved_to_train_by_cap"] > 0


def test_output_is_byte_identical_for_1_and_2_workers(tmp_path, tiny_text_dir):
    """Several shards per split, byte and gpt2-free BPE-free path: the files, token for token."""
    for w in (1, 2):
        prepare([str(tiny_text_dir)], "byte", tmp_path / f"w{w}", workers=w, shard_tokens=20_000,
                progress=False)  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len([f for f in files if f.startswith("train-")]) > 5
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f


def test_mixed_directory_gives_exactly_its_documents(tmp_path):
    """jsonl.gz + jsonl.zst + parquet + text + txt.gz, with a hidden file and a binary file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    docs = {f"doc {i}: " + "ab✓ " * (i + 3) for i in range(12)}
    texts = sorted(docs)
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t, "id": 1}) + "\n" for t in texts[:3])
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts[3:5]).encode()
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"text": texts[5:9], "n": [1, 2, 3, 4]}), d / "sub" / "c.parquet")
    (d / "sub" / "d.txt").write_text(texts[9])
    with gzip.open(d / "e.txt.gz", "wt") as f:
        f.write(texts[10])
    (d / "f.py").write_text(texts[11])
    (d / ".hidden.txt").write_text("never read")
    (d / "sub" / "blob.bin").write_bytes(bytes(range(256)) * 4)  # not UTF-8: skipped, counted
    meta = prepare([str(d)], "byte", tmp_path / "ds", val_frac=0.3, progress=False)
    assert sorted(_docs_of(open_dataset(tmp_path / "ds"))) == sorted(t.encode() for t in texts)
    assert meta["documents"] == 12 and meta["skipped_files"] == 1


def test_never_overwrites_without_force(tmp_path, tiny_text_dir):
    prepare([str(tiny_text_dir)], "byte", tmp_path / "a", progress=False)
    before = (tmp_path / "a/train-000000.bin").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        prepare([str(tiny_text_dir)], "byte", tmp_path / "a", progress=False)
    assert (tmp_path / "a/train-000000.bin").read_bytes() == before
    prepare([str(tiny_text_dir)], "byte", tmp_path / "a", force=True, shard_tokens=10**5,
            progress=False)  # fmt: skip
    assert (tmp_path / "a/train-000001.bin").is_file()
    assert not list(tmp_path.glob(".a.*"))  # no partial or old directory left behind


def test_old_single_file_dataset_opens(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    ids = np.arange(1000, dtype=np.uint16) % 256
    ids.tofile(d / "train.bin")
    ids[:300].tofile(d / "val.bin")
    meta = {"format": 1, "tokenizer": "byte", "vocab_size": 256, "dtype": "uint16",
            "train_tokens": 1000, "val_tokens": 300, "train_bytes": 1000, "val_bytes": 300}  # fmt: skip
    (d / "meta.json").write_text(json.dumps(meta))
    ds = open_dataset(d)
    assert len(ds.train) == 1000 and np.array_equal(ds.val[:], ids[:300])
    batches = BatchLoader(ds.train, 16, 4, 1, seed=0).next()
    assert batches[0][0].shape == (4, 16)
    # and `stalwart train` trains on it to the end-of-run report (no end-of-text id there)
    run = tmp_path / "run"
    r = run_cli(
        "train", *TINY, "--model.block_size", "16", "--train.max_steps", "6",
        "--schedule.warmup_steps", "1", "--train.dashboard", "false",
        "--data.dir", d, "--run.dir", run,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out, whole split:" in r.stdout


def test_open_dataset_errors(tmp_path, tiny_data):
    with pytest.raises(UserError, match="meta.json missing"):
        open_dataset(tmp_path / "nothing")
    d = tmp_path / "trunc"
    d.mkdir()
    for f in tiny_data.iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    shard = d / "train-000000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        open_dataset(d)
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(UserError, match="meta.json says"):
        open_dataset(d)
    shard.write_bytes(b"")
    with pytest.raises(UserError, match="missing or empty"):
        open_dataset(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed"):
        open_dataset(d)


def test_check_ids():
    with pytest.raises(UserError, match="outside the vocabulary"):
        check_ids(np.array([1, 2, 300]), 257, "x")
    check_ids(np.array([0, 256]), 257, "x")


def _rows(batches):
    return torch.cat([x for x, _ in batches])


@pytest.fixture(scope="module")
def sharded(tiny_text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "ds"
    prepare([str(tiny_text_dir)], "byte", out, shard_tokens=7_919, progress=False)
    return out


def test_windows_straddle_shards(sharded):
    ds = open_dataset(sharded)
    assert len(ds.train.maps) > 10
    whole = np.concatenate([np.asarray(m) for m in ds.train.maps]).astype(np.int64)
    offsets = np.array([0, 7_900, 7_919 * 3 - 5, len(whole) - 41])
    assert np.array_equal(
        ds.train.windows(offsets, 41), np.stack([whole[o : o + 41] for o in offsets])
    )


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_global_batch_is_independent_of_split(sharded, sampling):
    ds = open_dataset(sharded)
    kw = {"sampling": sampling}
    one = BatchLoader(ds.train, 32, micro_batch=32, grad_accum=1, seed=7, **kw)
    acc = BatchLoader(ds.train, 32, micro_batch=8, grad_accum=4, seed=7, prefetch=True, **kw)
    ranks = [BatchLoader(ds.train, 32, 8, 2, 7, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(3):
        a = _rows(one.next())
        b = _rows(acc.next())
        c = torch.cat([_rows(r.next()) for r in ranks])
        assert torch.equal(a, b) and torch.equal(a, c)
    x, y = acc.next()[0]
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one


@pytest.mark.parametrize("prefetch", [False, True])
def test_loader_state_resumes_exact_sequence(sharded, prefetch):
    ds = open_dataset(sharded)
    a = BatchLoader(ds.train, 32, 4, 2, seed=1, prefetch=prefetch)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    expected = [_rows(a.next()) for _ in range(3)]
    b = BatchLoader(ds.train, 32, 4, 2, seed=1, prefetch=prefetch)
    b.next()  # a batch built ahead for position 1 must not leak into the resumed sequence
    b.load_state_dict(state)
    assert all(torch.equal(e, _rows(b.next())) for e in expected)
    c = BatchLoader(ds.train, 32, 4, 2, seed=2)  # another seed, another order
    c.load_state_dict(state)
    assert not torch.equal(expected[0], _rows(c.next()))


def test_epoch_sampling_visits_every_window_once(sharded):
    ds = open_dataset(sharded)
    block = 64
    n = (len(ds.train) - 1) // block
    loader = BatchLoader(ds.train, block, 16, 2, seed=3, sampling="epoch", prefetch=True)
    seen = []
    while len(seen) < 2 * n:
        assert loader.epoch == len(seen) // n
        seen += [int(o) for o in loader._offsets(loader.position)]
        loader.next()
    first, second = seen[:n], seen[n : 2 * n]
    assert sorted(first) == sorted(second) == [i * block for i in range(n)]
    assert first != second  # each epoch in its own seeded order
    order = EpochOrder(n, 3)  # the loader's state is one integer: any sample, recomputed
    assert order.windows(n - 2, 4).tolist() == [s // block for s in seen[n - 2 : n + 2]]


def test_eval_batches_fixed_and_sharded(sharded):
    ds = open_dataset(sharded)
    a = eval_batches(ds.val, 32, 4, 6, seed=3)
    b = eval_batches(ds.val, 32, 4, 6, seed=3)
    assert len(a) == 6 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    shards = [eval_batches(ds.val, 32, 4, 6, seed=3, rank=r, world_size=2) for r in range(2)]
    assert sum(len(s) for s in shards) == 6


def test_block_size_larger_than_data(tmp_path):
    d = tmp_path / "small"
    prepare([str(_write_docs(tmp_path / "s", DOCS))], "byte", d, progress=False)
    ds = open_dataset(d)
    with pytest.raises(UserError, match="block_size"):
        BatchLoader(ds.train, len(ds.train), 1, 1, 0)
    with pytest.raises(UserError, match="block_size"):
        eval_batches(ds.val, len(ds.val), 1, 1, 0)


def test_stdlib_corpus_sources():
    files = stdlib_sources()
    assert len(files) > 300
    assert not any("/test/" in str(f) or "site-packages" in str(f) for f in files)
    assert ByteTokenizer().decode(ByteTokenizer().encode("é✓")) == "é✓"


def test_a_single_file_holds_out_its_tail(tmp_path):
    """One document cannot be split per document: the last val_frac of its tokens are held out."""
    text = "".join(DOCS) * 3
    (tmp_path / "one.txt").write_text(text)
    meta = prepare([str(tmp_path / "one.txt")], "byte", tmp_path / "ds", progress=False)
    ds = open_dataset(tmp_path / "ds")
    assert meta["split"]["tail_held_out"] and meta["documents"] == 1
    assert meta["val_tokens"] == round(0.1 * (len(text.encode()) + 1))
    joined = np.concatenate([ds.train[:], ds.val[:]])
    assert joined[:-1].astype(np.uint8).tobytes() == text.encode() and joined[-1] == EOT
    assert meta["train_bytes"] + meta["val_bytes"] == len(text.encode())
    assert meta["train_tokens"] == len(ds.train) and meta["shards"]["train"][0]["tokens"] == len(
        ds.train
    )


def test_sampling_flag_is_checked():
    from stalwart.config import load_config

    assert load_config(None, ["--data.sampling", "epoch"]).data.sampling == "epoch"
    with pytest.raises(UserError, match="--data.sampling must be one of random, epoch"):
        load_config(None, ["--data.sampling", "shuffle"])
