"""Reading one part of the input: what a prepare worker does with the files it is handed.

A *part* is a whole file, one row group of a parquet file, or a byte range of an uncompressed
`.jsonl` file (a line belongs to the range its first byte is in, so ranges cut anywhere give
every line exactly once). A reader yields `Block`s: documents as their UTF-8 bytes concatenated
plus each one's length (empty documents dropped), so that the byte tokenizer, the split rule and
the hashes work on whole arrays. A parquet text column becomes a block straight from its Arrow
buffers (no Python string per document unless the tokenizer needs one).

Formats, by file name:
  *.jsonl, *.jsonl.gz, *.jsonl.zst  one JSON object per line, text in `text_field`
  *.parquet                         the `text_field` column, one row group per part
  *.gz, *.zst (other)               one text document, decompressed
  anything else                     one UTF-8 text document
A text file larger than `MAX_DOC_CHARS` is cut at line ends into several documents.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stalwart.errors import UserError

MAX_DOC_CHARS = 16 << 20
BLOCK_BYTES = 1 << 20  # documents are read and tokenized in blocks of about this many bytes
PARQUET_BATCH_ROWS = 1024


@dataclass
class Part:
    """A part of one input file. kind: jsonl | parquet | text. jsonl: bytes [start, end) of an
    uncompressed file (end -1: the whole stream); parquet: row group `start`, whose first row
    is `row0`. size: bytes on disk (for the ETA and for sizing pieces)."""

    kind: str
    path: str
    name: str
    in_dir: bool
    size: int
    start: int = 0
    end: int = -1
    row0: int = 0


@dataclass
class Block:
    data: np.ndarray  # uint8: the documents' UTF-8 bytes, concatenated
    lengths: np.ndarray  # int64: bytes of each document (none is empty)
    names: list[str]
    texts: list[str] | None  # the documents as str, where the reader had them

    @classmethod
    def from_texts(cls, names: list[str], texts: list[str]) -> Block:
        keep = [i for i, t in enumerate(texts) if t]
        raw = [texts[i].encode("utf-8") for i in keep]
        return cls(np.frombuffer(b"".join(raw), np.uint8),
                   np.array([len(r) for r in raw], np.int64),
                   [names[i] for i in keep], [texts[i] for i in keep])  # fmt: skip

    def text(self, i: int) -> str:
        if self.texts is not None:
            return self.texts[i]
        end = int(self.lengths[: i + 1].sum())
        return self.data[end - int(self.lengths[i]) : end].tobytes().decode("utf-8")


def merge(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    texts = None
    if all(b.texts is not None for b in blocks):
        texts = [t for b in blocks for t in b.texts]
    return Block(np.concatenate([b.data for b in blocks]),
                 np.concatenate([b.lengths for b in blocks]),
                 [n for b in blocks for n in b.names], texts)  # fmt: skip


def read_part(part: Part, field: str, want_texts: bool, skipped: list[str]) -> Iterator[Block]:
    if part.kind == "jsonl":
        yield from _read_jsonl(part, field)
    elif part.kind == "parquet":
        yield from _read_parquet(part, field, want_texts)
    else:
        try:
            yield from _read_text(part)
        except UnicodeDecodeError:
            if not part.in_dir:
                raise UserError(
                    f"{part.path} is not UTF-8 text: convert it or leave it out"
                ) from None
            skipped.append(part.path)  # binary files inside a directory are skipped


def open_bytes(path: Path):
    """A binary stream of the file, decompressed by its suffix (gzip, zstandard)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        try:
            from isal import igzip  # ISA-L: the same gzip, decompressed ~2.7x faster
        except ImportError:
            return gzip.open(path, "rb")
        return igzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(
                f"{path}: reading .zst needs zstandard: pip install 'stalwart[data]'"
            ) from None
        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(stream, 1 << 20)  # lines: the stream reader has no readline
    return open(path, "rb")


def _corrupt() -> tuple:
    """What a corrupt or truncated compressed file raises while it is read."""
    try:
        from isal.isal_zlib import error
    except ImportError:
        return (OSError, EOFError)
    return (OSError, EOFError, error)


def _read_text(part: Part) -> Iterator[Block]:
    """One document, or several pieces of MAX_DOC_CHARS cut at line ends for a huge file."""
    path, name = Path(part.path), part.name
    with open_bytes(path) as raw:
        reader = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        piece, size, n = [], 0, 0
        try:
            for line in reader:
                if "\0" in line:
                    raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte: a binary file")
                piece.append(line)
                size += len(line)
                if size >= MAX_DOC_CHARS:
                    yield Block.from_texts([f"{name}#{n}"], ["".join(piece)])
                    piece, size, n = [], 0, n + 1
        except _corrupt() as e:  # gzip.BadGzipFile, a truncated stream
            raise UserError(f"{path} cannot be read ({e}): a corrupt or truncated file") from None
        if piece:
            yield Block.from_texts([f"{name}#{n}" if n else name], ["".join(piece)])


def _range_lines(f, start: int, end: int) -> Iterator[bytes]:
    """The lines of binary file f that start in bytes [start, end)."""
    if start:
        f.seek(start - 1)
        f.readline()  # the rest of the line that started before `start` (or just its newline)
    pos = f.tell()
    while pos < end:
        line = f.readline()
        if not line:
            return
        pos += len(line)
        yield line


def _line_number(part: Part, k: int) -> int:
    """The 1-based line number of the k-th line (0-based) of the part, for error messages: the
    newlines before a range's first line are counted only when an error needs them."""
    if part.end < 0 or part.start == 0:
        return k + 1
    with open(part.path, "rb") as f:
        f.seek(part.start - 1)
        f.readline()
        first, before, done = f.tell(), 0, 0
        f.seek(0)
        while done < first:
            chunk = f.read(min(1 << 24, first - done))
            before, done = before + chunk.count(b"\n"), done + len(chunk)
    return before + k + 1


def _read_jsonl(part: Part, field: str) -> Iterator[Block]:
    path = Path(part.path)
    tag = part.name if part.end < 0 else f"{part.name}@{part.start}"
    with open_bytes(path) as raw:
        lines = _range_lines(raw, part.start, part.end) if part.end >= 0 else raw
        names, texts, size, k = [], [], 0, -1
        try:
            for k, line in enumerate(lines):  # noqa: B007 (named in errors)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{_line_number(part, k)} is not UTF-8") from None
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{_line_number(part, k)} is not valid JSON") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise UserError(f'{path}:{_line_number(part, k)} has no string "{field}" '
                                    "field: pass --text-field NAME")  # fmt: skip
                names.append(f"{tag}:{k + 1}")
                texts.append(obj[field])
                size += len(texts[-1])
                if size >= BLOCK_BYTES:
                    yield Block.from_texts(names, texts)
                    names, texts, size = [], [], 0
        except _corrupt() as e:
            raise UserError(f"{path} cannot be read ({e}): a corrupt or truncated file") from None
    if texts:
        yield Block.from_texts(names, texts)


def open_parquet(path: Path, field: str):
    """The ParquetFile, checked to have the text column (one clear line otherwise)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{path}: reading parquet needs pyarrow: pip install 'stalwart[data]'"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise UserError(f"{path} is not a readable parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(
            f"{path} has no column {field!r} (it has {', '.join(pf.schema_arrow.names)}): "
            "pass --text-field NAME"
        )
    return pf


def _read_parquet(part: Part, field: str, want_texts: bool) -> Iterator[Block]:
    """Row group `part.start`, in record batches of PARQUET_BATCH_ROWS: a row group of any size
    is never decoded whole (a 192 MB one: 243 MiB peak instead of 533 with read_row_group)."""
    path = Path(part.path)
    try:
        batches = open_parquet(path, field).iter_batches(
            batch_size=PARQUET_BATCH_ROWS, row_groups=[part.start], columns=[field]
        )
        row = part.row0
        for batch in batches:
            chunk = _text_column(batch.column(0), path, field)
            offsets = _offsets(chunk)
            i = 0
            while i < len(chunk):
                j = int(np.searchsorted(offsets, offsets[i] + BLOCK_BYTES, side="left"))
                j = min(max(j, i + 1), len(chunk))
                yield _arrow_block(chunk.slice(i, j - i), f"{part.name}#", row + i, want_texts)
                i = j
            row += len(chunk)
    except UserError:
        raise
    except Exception as e:  # a corrupt row group (pyarrow raises several kinds)
        raise UserError(f"{path} is not a readable parquet file ({e})") from None


def _text_column(col, path: Path, field: str):
    import pyarrow as pa

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col
    if str(col.type) == "string_view":  # text too, in another layout
        return col.cast(pa.large_string())
    raise UserError(f"{path}: column {field!r} is {col.type}, not text: pass --text-field NAME")


def _offsets(arr) -> np.ndarray:
    """The (len + 1) int64 offsets of an Arrow (large_)string array, slices respected."""
    import pyarrow as pa

    dtype = np.dtype(np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros(len(arr) + 1, np.int64)
    width = dtype.itemsize
    return np.frombuffer(buf, dtype, count=len(arr) + 1, offset=arr.offset * width).astype(np.int64)


def _arrow_block(arr, prefix: str, row0: int, want_texts: bool) -> Block:
    """A block straight from the column's buffers; null and empty strings are no documents."""
    import pyarrow.compute as pc

    lengths = np.diff(_offsets(arr))
    valid = lengths > 0
    if arr.null_count:
        valid &= np.asarray(arr.is_valid())
    rows = np.flatnonzero(valid)
    if len(rows) < len(arr):
        arr = pc.filter(arr, valid)  # a copy with only the documents
    offsets = _offsets(arr)
    data = arr.buffers()[2]
    data = (
        np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] if data else np.zeros(0, np.uint8)
    )
    names = [f"{prefix}{row0 + r}" for r in rows.tolist()]
    return Block(data, np.diff(offsets), names, arr.to_pylist() if want_texts else None)
