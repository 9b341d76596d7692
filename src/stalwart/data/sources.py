"""Where documents come from: files, directories, compressed JSON lines, parquet, a Hugging Face
dataset, or the built-in corpus. Every reader streams: one document at a time (parquet: one
record batch), so a corpus of any size flows through in bounded memory.

A document is a `(name, text)` pair. Formats, by file name:
  *.jsonl, *.jsonl.gz, *.jsonl.zst  one JSON object per line, text in `text_field`
  *.parquet                         the `text_field` column (pyarrow, record batch by record batch)
  *.gz, *.zst (other)               one text document, decompressed
  anything else                     one UTF-8 text document
A text file larger than `MAX_DOC_CHARS` is cut at line ends into several documents, so that no
single file has to be held whole.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from stalwart.errors import UserError

MAX_DOC_CHARS = 16 << 20
PARQUET_BATCH_ROWS = 1024


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


class Corpus:
    """The documents of the inputs, in a fixed order (sorted paths), streamed.

    `bytes_done` / `bytes_total`: on-disk bytes of the files read so far and of all of them (for
    the ETA; None when unknown, e.g. a streamed dataset). `skipped`: files inside a directory
    that are not UTF-8 text (skipped and counted, not fatal).
    """

    def __init__(self, inputs: list[str], text_field: str = "text", hf_dataset: str | None = None):
        self.text_field, self.hf_dataset = text_field, hf_dataset
        self.skipped: list[str] = []
        self.bytes_done = 0
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

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self.bytes_done, self.skipped = 0, []
        if self.hf_dataset:
            yield from _read_hf(self.hf_dataset, self.text_field)
            return
        for path, in_dir in self.files:
            name = str(path.relative_to(self.root)) if self.builtin else str(path)
            yield from self._read(path, name, in_dir)
            self.bytes_done += path.stat().st_size

    def _read(self, path: Path, name: str, in_dir: bool) -> Iterator[tuple[str, str]]:
        kind = _kind(path)
        if kind == "jsonl":
            yield from _read_jsonl(path, self.text_field)
        elif kind == "parquet":
            yield from _read_parquet(path, self.text_field)
        else:
            try:
                yield from _read_text(path, name)
            except UnicodeDecodeError:
                if not in_dir:
                    raise UserError(
                        f"{path} is not UTF-8 text: convert it or leave it out"
                    ) from None
                self.skipped.append(str(path))  # binary files inside a directory are skipped


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


def _open_bytes(path: Path):
    """A binary stream of the file, decompressed by its suffix (gzip, zstandard)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(
                f"{path}: reading .zst needs zstandard: pip install 'stalwart[data]'"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _read_text(path: Path, name: str) -> Iterator[tuple[str, str]]:
    """One document, or several pieces of MAX_DOC_CHARS cut at line ends for a huge file."""
    with _open_bytes(path) as raw:
        reader = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        piece, size, part = [], 0, 0
        try:
            for line in reader:
                if "\0" in line:
                    raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte: a binary file")
                piece.append(line)
                size += len(line)
                if size >= MAX_DOC_CHARS:
                    yield (f"{name}#{part}", "".join(piece))
                    piece, size, part = [], 0, part + 1
        except (OSError, EOFError) as e:  # gzip.BadGzipFile, a truncated stream
            raise UserError(f"{path} cannot be read ({e}): a corrupt or truncated file") from None
        if piece:
            yield (f"{name}#{part}" if part else name, "".join(piece))


def _read_jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with _open_bytes(path) as raw:
        reader = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
        lineno = 0
        try:
            for lineno, line in enumerate(reader, 1):  # noqa: B007 (named in errors)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{lineno} is not valid JSON") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise UserError(
                        f'{path}:{lineno} has no string "{field}" field: pass --text-field NAME'
                    )
                yield (f"{path}:{lineno}", obj[field])
        except UnicodeDecodeError:
            raise UserError(f"{path}:{lineno + 1} is not UTF-8") from None
        except (OSError, EOFError) as e:
            raise UserError(f"{path} cannot be read ({e}): a corrupt or truncated file") from None


def _read_parquet(path: Path, field: str) -> Iterator[tuple[str, str]]:
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
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None:
                yield (f"{path}#{row - 1}", text)


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
