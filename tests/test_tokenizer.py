import numpy as np
import pytest

from stalwart.data.loader import open_dataset
from stalwart.data.prepare import prepare
from stalwart.data.tokenizer import ByteTokenizer, TiktokenGPT2, load_tokenizer, parse_spec
from stalwart.errors import UserError
from tests.conftest import ROOT, STDLIB

# The real GPT-2 vocabulary, offline: ../shared/data/gpt2.tiktoken beside the clone (its README
# says where it comes from: tiktoken's r50k_base file, the ranks of the `gpt2` encoding)
GPT2_FILE = ROOT.parent / "shared" / "data" / "gpt2.tiktoken"
needs_gpt2 = pytest.mark.skipif(
    not GPT2_FILE.is_file(), reason=f"the real GPT-2 vocabulary is not at {GPT2_FILE}"
)

TRICKY = [
    "Hello world! It's 2024; they'll say  'hi'\n\n\tdone.",
    "héllo wörld ✓ 日本語のテキスト 🙂 — «quotes»   trailing spaces   \n",
    "x=1\r\n  y = [a+b for a,b in zip(s, t)]  # comment\n\n\n",
    "<|endoftext|> is ordinary text here, not the special token",
]


def reference_gpt2():
    """tiktoken's own `gpt2` encoding, built from the same file as tiktoken documents."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(GPT2_FILE)),
        special_tokens={"<|endoftext|>": 50256},
    )


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("aé") == [97, 195, 169]
    assert tok.decode([97, 195, 169]) == "aé"
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode([97, 256, 98]) == "a<|endoftext|>b"


@needs_gpt2
def test_gpt2_file_ids_equal_tiktoken_on_real_documents():
    ref = reference_gpt2()
    tok = TiktokenGPT2(GPT2_FILE)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    docs = TRICKY + [p.read_text() for p in sorted(STDLIB.glob("*.py"))[:40]]
    for text in docs:
        assert tok.encode(text) == ref.encode_ordinary(text)
    assert tok.encode_batch(docs) == [ref.encode_ordinary(t) for t in docs]
    assert tok.decode(tok.encode(TRICKY[1])) == TRICKY[1]


@needs_gpt2
def test_prepare_with_gpt2_file_writes_tiktokens_ids(tmp_path):
    """Every document of a prepared dataset is tiktoken's ids followed by <|endoftext|>, and the
    dataset carries its vocabulary (it decodes offline, with no cache)."""
    src = tmp_path / "src"
    src.mkdir()
    texts = [p.read_text() for p in sorted(STDLIB.glob("*.py"))[:30]] + TRICKY
    for i, t in enumerate(texts):
        (src / f"{i:02d}.txt").write_text(t)
    meta = prepare([str(src)], f"gpt2:{GPT2_FILE}", tmp_path / "ds", val_frac=0.3, progress=False)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    ds = open_dataset(tmp_path / "ds")
    ref = reference_gpt2()
    expected = {tuple(ref.encode_ordinary(t) + [50256]) for t in texts}
    got = set()
    for split in (ds.train, ds.val):
        ids = split[:]
        for doc in np.split(ids, np.flatnonzero(ids == 50256) + 1)[:-1]:
            got.add(tuple(doc.tolist()))
    assert got == expected
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode()) for t in texts)
    tok = load_tokenizer(tmp_path / "ds", "gpt2")
    assert tok.path == tmp_path / "ds" / "gpt2.tiktoken"


def test_bpe_trained_round_trip(tmp_path, tiny_text_dir):
    meta = prepare([str(tiny_text_dir)], "bpe:512", tmp_path / "bpe", progress=False)
    assert meta["vocab_size"] == 512 and meta["tokenizer"] == "bpe:512"
    assert (tmp_path / "bpe/tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "bpe", "bpe:512")
    text = "def parse(self, text):\n    return [t.strip() for t in text.split(',')]  # ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE compresses
    assert tok.eot_id is not None
    # fewer tokens than bytes, and the bytes per token are recorded for bits-per-byte
    assert meta["val_bytes"] > meta["val_tokens"]


def test_bpe_never_trains_on_held_out_documents(tmp_path):
    """A word that appears only in held-out documents never becomes a token."""
    from stalwart.data.encode import is_held_out

    src = tmp_path / "src"
    src.mkdir()
    secret = "zqxjvwk"
    n_val = 0
    for i in range(80):
        text = f"document {i}: " + "common words here and there " * 20
        if is_held_out((text + f" {secret}" * 200).encode(), int(0.2 * 2**64)):
            text += f" {secret}" * 200  # held out by the rule: the secret is only held out
            n_val += 1
        (src / f"{i}.txt").write_text(text)
    assert n_val > 0
    prepare([str(src)], "bpe:300", tmp_path / "ds", val_frac=0.2, progress=False)
    tok = load_tokenizer(tmp_path / "ds", "bpe:300")
    assert len(tok.encode(" " + secret)) >= len(secret)  # never merged: bytes only
    assert len(tok.encode(" common")) == 1


def test_bad_specs(tmp_path):
    for bad in ("bpe:10", "bpe:x", "wordpiece"):
        with pytest.raises(UserError, match="--tokenizer"):
            parse_spec(bad)
    with pytest.raises(UserError, match="no such file"):
        TiktokenGPT2(tmp_path / "missing.tiktoken")
    (tmp_path / "junk.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(UserError, match="not a .tiktoken vocabulary"):
        TiktokenGPT2(tmp_path / "junk.tiktoken")


def test_gpt2_offline_is_a_clear_error(tmp_path, monkeypatch):
    """This machine has no internet: tiktoken cannot download the vocabulary by itself."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    try:
        tok = TiktokenGPT2()
    except UserError as e:
        assert "offline" in str(e) and "gpt2:FILE" in str(e)
    else:  # a machine with a cached vocabulary or internet: the real path works
        assert tok.vocab_size == 50257 and tok.decode(tok.encode("hello")) == "hello"
