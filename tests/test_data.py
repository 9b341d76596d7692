import json

import numpy as np
import pytest
import torch

from stalwart.data.loader import BatchLoader, eval_batches, open_dataset
from stalwart.data.prepare import check_ids, prepare, stdlib_sources
from stalwart.data.tokenizer import ByteTokenizer, load_tokenizer
from stalwart.errors import UserError


def test_prepare_round_trip(tmp_path):
    docs = ["def f(x):\n    return x + 1\n", "print('héllo wörld ✓')\n" * 40, "z = 3\n" * 50]
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_text(d)
    meta = prepare([str(src)], "byte", tmp_path / "ds")
    ds = open_dataset(tmp_path / "ds")
    tok = load_tokenizer(tmp_path / "ds", meta["tokenizer"])
    text = tok.decode(np.concatenate([ds.train, ds.val]).tolist())
    # shuffled document order, but every document comes back whole and exactly
    assert sorted(text.split("\n")) == sorted("".join(docs).split("\n"))
    assert len(text.encode()) == meta["train_bytes"] + meta["val_bytes"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256
    assert meta["val_tokens"] == pytest.approx(
        0.1 * (meta["train_tokens"] + meta["val_tokens"]), abs=1
    )
    assert len(meta["source"]["sha256"]) == 64


def test_prepare_is_deterministic_and_never_overwrites(tmp_path, tiny_text_dir):
    a = prepare([str(tiny_text_dir)], "byte", tmp_path / "a")
    b = prepare([str(tiny_text_dir)], "byte", tmp_path / "b")
    assert (tmp_path / "a/train.bin").read_bytes() == (tmp_path / "b/train.bin").read_bytes()
    assert a["source"]["sha256"] == b["source"]["sha256"]
    before = (tmp_path / "a/train.bin").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        prepare([str(tiny_text_dir)], "byte", tmp_path / "a")
    assert (tmp_path / "a/train.bin").read_bytes() == before


def test_jsonl_input_and_bad_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i} " * 30}) for i in range(20)) + "\n")
    meta = prepare([str(f)], "byte", tmp_path / "ds")
    assert meta["documents"] == 20
    f.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2"):
        prepare([str(f)], "byte", tmp_path / "ds2")
    with pytest.raises(UserError, match="does not exist"):
        prepare([str(tmp_path / "nope.txt")], "byte", tmp_path / "ds3")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no text"):
        prepare([str(tmp_path / "empty.txt")], "byte", tmp_path / "ds4")


def test_out_of_range_ids_rejected(tmp_path, tiny_data):
    with pytest.raises(UserError, match="outside the vocabulary"):
        check_ids(np.array([1, 2, 300]), 256, "x")
    check_ids(np.array([0, 255]), 256, "x")
    # a dataset whose file holds ids the vocabulary does not have is refused at open
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("meta.json", "train.bin"):
        (bad / name).write_bytes((tiny_data / name).read_bytes())
    meta = json.loads((tiny_data / "meta.json").read_text())
    np.full(meta["val_tokens"], 999, dtype=np.uint16).tofile(bad / "val.bin")
    with pytest.raises(UserError, match="outside the vocabulary"):
        open_dataset(bad)


def test_open_dataset_errors(tmp_path, tiny_data):
    with pytest.raises(UserError, match="meta.json missing"):
        open_dataset(tmp_path / "nothing")
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "meta.json").write_text((tiny_data / "meta.json").read_text())
    (d / "train.bin").write_bytes((tiny_data / "train.bin").read_bytes()[:-1])
    (d / "val.bin").write_bytes((tiny_data / "val.bin").read_bytes())
    with pytest.raises(UserError, match="truncated"):
        open_dataset(d)
    (d / "train.bin").write_bytes(b"")
    with pytest.raises(UserError, match="missing or empty"):
        open_dataset(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed"):
        open_dataset(d)


def _rows(batches):
    return torch.cat([x for x, _ in batches])


def test_global_batch_is_independent_of_split(tiny_data):
    ds = open_dataset(tiny_data)
    one = BatchLoader(ds.train, 32, micro_batch=32, grad_accum=1, seed=7)
    acc = BatchLoader(ds.train, 32, micro_batch=8, grad_accum=4, seed=7)
    ranks = [BatchLoader(ds.train, 32, 8, 2, 7, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        a = _rows(one.next())
        b = _rows(acc.next())
        c = torch.cat([_rows(r.next()) for r in ranks])
        assert torch.equal(a, b) and torch.equal(a, c)
    x, y = acc.next()[0]
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one


def test_loader_state_resumes_exact_sequence(tiny_data):
    ds = open_dataset(tiny_data)
    a = BatchLoader(ds.train, 32, 4, 2, seed=1)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    expected = [_rows(a.next()) for _ in range(3)]
    b = BatchLoader(ds.train, 32, 4, 2, seed=1)
    b.load_state_dict(state)
    assert all(torch.equal(e, _rows(b.next())) for e in expected)
    c = BatchLoader(ds.train, 32, 4, 2, seed=2)  # another seed, another order
    c.load_state_dict(state)
    assert not torch.equal(expected[0], _rows(c.next()))


def test_eval_batches_fixed_and_sharded(tiny_data):
    ds = open_dataset(tiny_data)
    a = eval_batches(ds.val, 32, 4, 6, seed=3)
    b = eval_batches(ds.val, 32, 4, 6, seed=3)
    assert len(a) == 6 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    shards = [eval_batches(ds.val, 32, 4, 6, seed=3, rank=r, world_size=2) for r in range(2)]
    assert sum(len(s) for s in shards) == 6


def test_block_size_larger_than_data(tiny_data):
    ds = open_dataset(tiny_data)
    with pytest.raises(UserError, match="block_size"):
        BatchLoader(ds.train[:100], 200, 1, 1, 0)
    with pytest.raises(UserError, match="block_size"):
        eval_batches(ds.val[:100], 200, 1, 1, 0)


def test_stdlib_corpus_sources():
    files = stdlib_sources()
    assert len(files) > 300
    assert not any("/test/" in str(f) or "site-packages" in str(f) for f in files)
    assert ByteTokenizer().decode(ByteTokenizer().encode("é✓")) == "é✓"
