"""Tokenizers: `byte` (256 ids), `bpe:N` (byte-level BPE trained with HF tokenizers), `gpt2`.

All three share one small interface: `encode(str) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `eot_id` (None for bytes) and `spec` (the string that rebuilds it).
A prepared dataset records the spec in meta.json; a BPE tokenizer is saved as tokenizer.json
beside the data, so `load_tokenizer(data_dir)` always gets the one the data was made with.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from stalwart.errors import UserError

EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    spec: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, no training, no unknowns, exact bits-per-byte."""

    spec = "byte"
    vocab_size = 256
    eot_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A byte-level BPE from Hugging Face `tokenizers`, trained on the corpus (`bpe:N`)."""

    def __init__(self, tok, spec: str):
        self._tok = tok
        self.spec = spec
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = _Tok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, f"bpe:{vocab_size}")

    @classmethod
    def load(cls, path: Path, spec: str) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        return cls(_Tok.from_file(str(path)), spec)

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class TiktokenGPT2:
    """OpenAI's GPT-2 vocabulary (50257 ids) through tiktoken, which downloads it once."""

    spec = "gpt2"

    def __init__(self):
        try:
            import tiktoken
        except ImportError:
            raise UserError(
                "--tokenizer gpt2 needs tiktoken: pip install 'stalwart[gpt2]'"
            ) from None
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises requests/OS errors of several kinds offline
            raise UserError(
                "the GPT-2 vocabulary could not be loaded (tiktoken downloads it once and this "
                f"machine seems offline: {type(e).__name__}); use --tokenizer byte or bpe:N, or "
                "set TIKTOKEN_CACHE_DIR to a directory holding the cached vocabulary"
            ) from None
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


def parse_spec(spec: str) -> tuple[str, int]:
    """'byte' | 'gpt2' | 'bpe:N' -> (kind, N)."""
    if spec == "byte":
        return "byte", 256
    if spec == "gpt2":
        return "gpt2", 50257
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = 0
        if 257 <= n <= 1 << 20:
            return "bpe", n
    raise UserError(f"--tokenizer must be byte, gpt2 or bpe:N (257 <= N), got {spec!r}")


def load_tokenizer(data_dir: str | Path, spec: str) -> Tokenizer:
    """The tokenizer a dataset was prepared with (spec from its meta.json)."""
    kind, _ = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return TiktokenGPT2()
    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: the dataset was made with {spec}; re-run prepare")
    return HFTokenizer.load(path, spec)
