"""A synthetic corpus for benchmarks/prepare.py: documents that do not repeat each other.

Each document is a standard-library source file with its identifiers renamed at random (a seeded
RNG per document): real code's shape and byte statistics, no two documents alike, so neither a
tokenizer's cache nor a compressor can shortcut it. Shards alternate between `.jsonl.gz` (gzip
level 1) and `.parquet` (zstd, row groups of 1024 documents), about `--shard-mb` of text each,
until `--size-mb` is written.

    python benchmarks/prepare_corpus.py --out /tmp/corpus --size-mb 2000
"""

from __future__ import annotations

import argparse
import builtins
import gzip
import json
import keyword
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stalwart.data.sources import stdlib_sources  # noqa: E402

KEEP = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls"}
IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")
ROW_GROUP_ROWS = 1024  # as nanochat's shards: ~17 MB of text per row group here
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "ba", "de", "fi", "go"]


def renamed(text: str, rng: random.Random) -> str:
    names: dict[str, str] = {}

    def sub(m: re.Match) -> str:
        word = m.group(0)
        if word in KEEP:
            return word
        if word not in names:
            new = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
            names[word] = new.capitalize() if word[0].isupper() else new
        return names[word]

    return IDENT.sub(sub, text)


def documents(seed: int = 0):
    files = [p.read_text(errors="replace") for p in stdlib_sources()]
    rng = random.Random(seed)
    while True:
        for text in files:
            yield renamed(text, rng)


def write_corpus(out: Path, size_mb: int, shard_mb: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    docs, written, shard = documents(), 0, 0
    while written < size_mb * 1e6:
        batch, size = [], 0
        while size < shard_mb * 1e6:
            batch.append(next(docs))
            size += len(batch[-1].encode())
        if shard % 2 == 0:
            with gzip.open(out / f"shard-{shard:04d}.jsonl.gz", "wt", compresslevel=1) as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in batch)
        else:
            table = pa.table({"text": batch})
            pq.write_table(table, out / f"shard-{shard:04d}.parquet", compression="zstd",
                           row_group_size=ROW_GROUP_ROWS)  # fmt: skip
        written += size
        shard += 1
        print(f"corpus: {written / 1e6:,.0f} MB in {shard} shards", file=sys.stderr, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size-mb", type=int, default=2000)
    p.add_argument("--shard-mb", type=int, default=64)
    a = p.parse_args()
    write_corpus(Path(a.out), a.size_mb, a.shard_mb)
