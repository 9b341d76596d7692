import pytest

from stalwart.data.prepare import prepare
from stalwart.data.tokenizer import ByteTokenizer, TiktokenGPT2, load_tokenizer, parse_spec
from stalwart.errors import UserError


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("aé") == [97, 195, 169]
    assert tok.decode([97, 195, 169]) == "aé"


def test_bpe_trained_round_trip(tmp_path, tiny_text_dir):
    meta = prepare([str(tiny_text_dir)], "bpe:512", tmp_path / "bpe")
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


def test_bad_specs():
    for bad in ("bpe:10", "bpe:x", "wordpiece"):
        with pytest.raises(UserError, match="--tokenizer"):
            parse_spec(bad)


def test_gpt2_offline_is_a_clear_error(tmp_path, monkeypatch):
    """This machine has no internet: tiktoken cannot download the vocabulary."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    try:
        tok = TiktokenGPT2()
    except UserError as e:
        assert "offline" in str(e) and "--tokenizer byte" in str(e)
    else:  # a machine with a cached vocabulary or internet: the real path works
        assert tok.vocab_size == 50257 and tok.decode(tok.encode("hello")) == "hello"
