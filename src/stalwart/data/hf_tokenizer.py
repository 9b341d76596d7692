"""stalwart's tokenizers as Hugging Face tokenizer files (`tokenizer.json` + its config).

`AutoTokenizer.from_pretrained(DIR)` must give the same ids as stalwart for every text:
- `bpe:N` is already a `tokenizers` model: its tokenizer.json is copied as is.
- `byte` has no file of its own. We build one with the `tokenizers` library: a BPE model with no
  merges whose 256 tokens are GPT-2's byte-to-unicode characters, id b for byte b, behind a
  ByteLevel pre-tokenizer (text -> UTF-8 bytes -> those characters) and decoder. Encoding is then
  exactly `list(text.encode("utf-8"))` and decoding exactly `bytes(ids).decode("utf-8")`, for any
  text, non-ASCII included; `<|endoftext|>` is the special token 256, as in stalwart.
- `gpt2` (tiktoken) is converted from tiktoken's merge ranks when they can be loaded.
Only `tokenizers` is needed here (a core dependency); transformers is not imported.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from stalwart.data.tokenizer import EOT, HFTokenizer, Tokenizer


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses internally)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:  # control and whitespace bytes move above 255 so they stay printable
            out[b] = chr(256 + n)
            n += 1
    return out


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` whose id b is the byte b: stalwart's `byte` tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    # no regex split: with no merges it would change nothing, and it costs time
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def tiktoken_to_tokenizers(enc):
    """A tiktoken BPE (ranks of byte strings) as an equivalent `tokenizers` byte-level BPE.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank.
    Listing every split (left, right) of every token, ordered by the rank of the token, gives
    the HF BPE model the same priorities, hence the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    ranks: dict[bytes, int] = enc._mergeable_ranks

    def u(bs: bytes) -> str:
        return "".join(b2u[b] for b in bs)

    vocab = {u(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], u(left), u(right)))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges]))
    # GPT-2's split pattern is ByteLevel's default regex
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(enc._special_tokens))
    return tok


def to_tokenizers(tok: Tokenizer):
    """The `tokenizers.Tokenizer` equivalent of a stalwart tokenizer."""
    if tok.spec == "byte":
        out = byte_level_tokenizer()
        out.add_special_tokens([EOT])  # id 256: the separator prepare writes between documents
        return out
    if isinstance(tok, HFTokenizer):
        return tok._tok
    return tiktoken_to_tokenizers(tok._enc)  # gpt2 via tiktoken


def write_tokenizer_files(out: Path, tok: Tokenizer, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    out = Path(out)
    to_tokenizers(tok).save(str(out / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT} if tok.eot_id is not None else {}
    config = {
        # the generic fast tokenizer: it loads tokenizer.json as is, with no slow-tokenizer files
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        # decode must return exactly the text, not "cleaned" spacing around punctuation
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
