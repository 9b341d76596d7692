"""Where documents come from: files, directories, compressed JSON lines, parquet, a Hugging Face
dataset, or the built-in corpus, cut into *pieces* that prepare's workers read by themselves.

The inputs are listed in a fixed order (sorted paths) and cut into parts (readers.py: a whole
file, a parquet row group, or a byte range of an uncompressed .jsonl file), and consecutive
parts are grouped into pieces of about `piece_bytes` on disk (a part is never cut further: a
compressed file is one part however large). Listing reads only file sizes and parquet footers;
the documents themselves are read by the worker that gets the piece. A Hugging Face dataset is a
stream with no files to split: this process reads it, and each piece is a batch of its
documents. The pieces depend only on the inputs and `piece_bytes`, never on the worker count.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stalwart.data.readers import BLOCK_BYTES, Part, open_parquet, read_part
from stalwart.errors import UserError

PIECE_BYTES = 32 << 20


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources() -> list[Path]:
    """`*.py` of the standard library, without tests and site-packages (about 12 MB)."""
    root = stdlib_root()
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in skip_dirs for part in rel[:-1]) or rel[-1].startswith("test_"):
            continue
        out.append(p)
    return out


@dataclass
class Piece:
    """The unit of work of one prepare worker: parts of files, or a batch of documents."""

    index: int
    parts: list[Part] = field(default_factory=list)
    docs: list[tuple[str, str]] | None = None
    size: int = 0  # bytes on disk
    offset: int = 0  # bytes on disk before it (a streamed dataset: ~1 MB per piece)


class Corpus:
    """The documents of the inputs, in a fixed order (sorted paths), as pieces or one by one.

    `bytes_total`: on-disk bytes of all the files (for the ETA; None for a streamed dataset).
    """

    def __init__(self, inputs: list[str], text_field: str = "text", hf_dataset: str | None = None):
        self.text_field, self.hf_dataset = text_field, hf_dataset
        if hf_dataset:
            if inputs:
                raise UserError("pass either INPUT files or --hf-dataset, not both")
            self.files: list[tuple[Path, bool]] = []
            self.bytes_total = None
            self.source = {"kind": "hf-dataset", "name": hf_dataset, "text_field": text_field}
        elif not inputs:
            self.root = stdlib_root()
            self.files = [(p, True) for p in stdlib_sources()]
            self.source = {
                "kind": "python-stdlib",
                "python_version": sys.version.split()[0],
                "root": str(self.root),
            }
        else:
            self.files = _expand(inputs)
            self.source = {"kind": "files", "inputs": [str(Path(i).resolve()) for i in inputs]}
            if text_field != "text":
                self.source["text_field"] = text_field
        if not hf_dataset:
            self.bytes_total = sum(p.stat().st_size for p, _ in self.files)

    @property
    def builtin(self) -> bool:
        return self.source["kind"] == "python-stdlib"

    def fingerprint(self) -> list:
        """What a resumed prepare must find unchanged: every file's path, size and mtime."""
        files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p, _ in self.files]
        return [self.source, self.text_field, files]

    def pieces(self, piece_bytes: int = PIECE_BYTES) -> Iterator[Piece]:
        """The pieces in input order, listed lazily (a parquet footer is read when its file's
        turn comes)."""
        if self.hf_dataset:
            yield from _hf_pieces(self.hf_dataset, self.text_field)
            return
        piece = Piece(0)
        for part in self._parts(piece_bytes):
            if piece.parts and piece.size + part.size > piece_bytes:
                yield piece
                piece = Piece(piece.index + 1, offset=piece.offset + piece.size)
            piece.parts.append(part)
            piece.size += part.size
        if piece.parts:
            yield piece

    def _parts(self, piece_bytes: int) -> Iterator[Part]:
        for path, in_dir in self.files:
            name = str(path.relative_to(self.root)) if self.builtin else str(path)
            kind, size = _kind(path), path.stat().st_size
            if kind == "parquet":
                meta, row = open_parquet(path, self.text_field).metadata, 0
                for g in range(meta.num_row_groups):
                    rg = meta.row_group(g)
                    yield Part(kind, str(path), name, in_dir, rg.total_byte_size, g, row0=row)
                    row += rg.num_rows
            elif kind == "jsonl" and path.suffix.lower() == ".jsonl" and size > piece_bytes:
                for start in range(0, size, piece_bytes):  # byte ranges of an uncompressed file
                    end = min(start + piece_bytes, size)
                    yield Part(kind, str(path), name, in_dir, end - start, start, end)
            else:
                yield Part(kind, str(path), name, in_dir, size)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """The documents one by one, read in this process (the BPE sample, benchmarks)."""
        for piece in self.pieces():
            if piece.docs is not None:
                yield from ((n, t) for n, t in piece.docs if t)
                continue
            for part in piece.parts:
                for block in read_part(part, self.text_field, True, []):
                    yield from zip(block.names, block.texts or [])


def _hf_pieces(spec: str, field: str) -> Iterator[Piece]:
    """A streamed dataset in batches of about BLOCK_BYTES characters of documents."""
    rows, index = _read_hf(spec, field), 0
    while True:
        batch, size = [], 0
        for doc in rows:
            batch.append(doc)
            size += len(doc[1])
            if size >= BLOCK_BYTES:
                break
        if not batch:
            return
        yield Piece(index, docs=batch, offset=index * BLOCK_BYTES)
        index += 1


def _expand(inputs: list[str]) -> list[tuple[Path, bool]]:
    """(file, found inside a directory) for every input, directories recursively, hidden
    files and directories skipped, each directory's files in sorted order."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith(".") for part in rel):
                    out.append((f, True))
        elif p.is_file():
            out.append((p, False))
        else:
            raise UserError(f"input {item} does not exist: pass text files or directories")
    return out


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    if ".jsonl" in suffixes:
        return "jsonl"
    return "text"


def _read_hf(spec: str, field: str) -> Iterator[tuple[str, str]]:
    """NAME[:SPLIT] of the Hugging Face hub, streamed (nothing downloaded up front)."""
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError("--hf-dataset needs the datasets library: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # offline, unknown name, no such split: many exception types
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"--hf-dataset {spec} could not be opened ({msg})") from None
    if first is None:
        return
    if not isinstance(first.get(field), str):
        raise UserError(f"--hf-dataset {spec} has no string field {field!r}: pass --text-field")
    yield (f"{name}#0", first[field])
    for i, row in enumerate(rows, 1):
        yield (f"{name}#{i}", row[field])
