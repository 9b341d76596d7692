"""Tokenizers: `byte` (256 bytes + end-of-text), `bpe:N` (byte-level BPE trained with HF
tokenizers), `gpt2[:FILE]` (OpenAI's GPT-2 vocabulary through tiktoken, from a local file).

All three share one small interface: `encode(str) -> list[int]` (ordinary text: no special
tokens), `decode(ids) -> str`, `vocab_size`, `eot_id` (the end-of-text id that `prepare` puts
after every document) and `spec` (the string that rebuilds it).
A prepared dataset records the spec in meta.json; a BPE tokenizer is saved as tokenizer.json
and a GPT-2 vocabulary file is copied beside the data, so `load_tokenizer(data_dir)` always gets
the one the data was made with, offline.
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
    """UTF-8 bytes as tokens: id b is byte b, and id 256 is end-of-text (vocabulary 257).

    The separator cannot be a byte: every byte value occurs in some UTF-8 text (NUL included),
    so it is a 257th id, as GPT-2's <|endoftext|> is the id after its 50,256 merges. Documents
    are separated by it in prepared data; `encode` never produces it (ordinary text only).
    """

    spec = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # end-of-text is shown as GPT-2 shows its own; the bytes between are decoded as UTF-8
        out, run = [], bytearray()
        for i in ids:
            if int(i) == self.eot_id:
                out += [run.decode("utf-8", errors="replace"), EOT]
                run = bytearray()
            else:
                run.append(int(i))
        return "".join([*out, run.decode("utf-8", errors="replace")])


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
    """OpenAI's GPT-2 vocabulary (50257 ids) through tiktoken.

    `path`: a local `.tiktoken` file (the r50k_base/gpt2 ranks, e.g. ../shared/data/gpt2.tiktoken)
    -> the same ids as `tiktoken.get_encoding("gpt2")` with no network; None: tiktoken's own
    download/cache.
    """

    spec = "gpt2"

    def __init__(self, path: str | Path | None = None):
        try:
            import tiktoken
        except ImportError:
            raise UserError(
                "--tokenizer gpt2 needs tiktoken: pip install 'stalwart[gpt2]'"
            ) from None
        self.path = Path(path) if path else None
        self._enc = _local_gpt2(tiktoken, self.path) if self.path else _cached_gpt2(tiktoken)
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


def _local_gpt2(tiktoken, path: Path):
    from tiktoken.load import load_tiktoken_bpe

    if not path.is_file():
        raise UserError(f"--tokenizer gpt2:{path}: no such file (a .tiktoken vocabulary)")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:  # a wrong file: base64 or int parse errors of several kinds
        raise UserError(f"{path} is not a .tiktoken vocabulary ({type(e).__name__})") from None
    if len(ranks) != 50256:
        raise UserError(f"{path} has {len(ranks)} ranks, GPT-2's has 50256: pass gpt2.tiktoken")
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


def _cached_gpt2(tiktoken):
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OS errors of several kinds offline
        raise UserError(
            "the GPT-2 vocabulary could not be loaded (tiktoken downloads it once and this "
            f"machine seems offline: {type(e).__name__}); pass a local file with "
            "--tokenizer gpt2:FILE (e.g. ../shared/data/gpt2.tiktoken), or use --tokenizer byte "
            "or bpe:N"
        ) from None


# GPT-2's pre-tokenizer split (tiktoken's r50k_pat_str)
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_FILE = "gpt2.tiktoken"  # the vocabulary's copy inside a dataset prepared with gpt2:FILE


def parse_spec(spec: str) -> tuple[str, int, str | None]:
    """'byte' | 'gpt2' | 'gpt2:FILE' | 'bpe:N' -> (kind, vocabulary size, FILE or None)."""
    if spec == "byte":
        return "byte", 257, None
    if spec == "gpt2" or spec.startswith("gpt2:"):
        return "gpt2", 50257, spec[5:] or None
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = 0
        if 257 <= n <= 1 << 20:
            return "bpe", n, None
    raise UserError(
        f"--tokenizer must be byte, gpt2, gpt2:FILE (.tiktoken) or bpe:N (257 <= N), got {spec!r}"
    )


def build_tokenizer(spec: str, data_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a spec; `bpe:N` needs the dataset (or work) dir holding tokenizer.json."""
    kind, _, path = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        local = Path(data_dir) / GPT2_FILE if data_dir else None
        return TiktokenGPT2(local if local and local.is_file() else path)
    path = Path(data_dir or ".") / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: the dataset was made with {spec}; re-run prepare")
    return HFTokenizer.load(path, spec)


def load_tokenizer(data_dir: str | Path, spec: str) -> Tokenizer:
    """The tokenizer a dataset was prepared with (spec from its meta.json)."""
    return build_tokenizer(spec, data_dir)
