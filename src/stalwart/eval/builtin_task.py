"""The built-in task: given a few lines of a held-out file, pick its true next line among four.

Written by `prepare` from the held-out documents of the built-in corpus, so the main job reports
an accuracy against a known chance level (1/4) with no download. The three distractors come from
*other* held-out files and have the same indentation as the true line, so neither the indent
nor byte frequencies give the answer away: a model must have learned something about code.

The file is the `mc` format (`stalwart eval --task mc`): one JSON object per line with
`context`, `choices`, `label`, and `target_delimiter` = "\\n" (the context ends where the line
before the answer ends; the answer starts on a new line).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

CONTEXT_LINES = 6  # lines shown before the one to guess
# a line shorter than MIN_CHARS (`pass`, `else:`, `)`) is too easy to guess or to confuse; a
# line longer than MAX_CHARS would not fit a small byte-level model's window
MIN_CHARS, MAX_CHARS = 12, 100
N_CHOICES = 4
CHANCE = 1.0 / N_CHOICES


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _usable(line: str) -> bool:
    return MIN_CHARS <= len(line.strip()) and len(line) <= MAX_CHARS and line.strip()[0] != "#"


def _candidates(docs: list[list[str]]) -> list[tuple[int, int]]:
    """(document, line) positions worth asking about: a real line after enough real context."""
    out = []
    for d, lines in enumerate(docs):
        for i in range(CONTEXT_LINES, len(lines)):
            if not _usable(lines[i]):
                continue
            context = lines[i - CONTEXT_LINES : i]
            if sum(1 for c in context if c.strip()) >= CONTEXT_LINES // 2:
                out.append((d, i))
    return out


def _by_indent(docs: list[list[str]]) -> dict[str, list[tuple[int, str]]]:
    pool: dict[str, list[tuple[int, str]]] = {}
    for d, lines in enumerate(docs):
        for line in lines:
            if _usable(line):
                pool.setdefault(_indent(line), []).append((d, line))
    return pool


def _distractors(rng, pool, doc: int, truth: str, k: int) -> list[str] | None:
    """k distinct lines of the same indentation from other documents, or None if too few."""
    same = pool.get(_indent(truth), [])
    picked: list[str] = []
    for _ in range(40 * k):
        if len(picked) == k or not same:
            break
        d, line = same[rng.randrange(len(same))]
        if d != doc and line.strip() != truth.strip() and line not in picked:
            picked.append(line)
    return picked if len(picked) == k else None


def make_next_line_task(
    documents: Iterable[tuple[str, str]], out_path: str | Path, n: int = 500, seed: int = 0
) -> dict:
    """Write up to n examples to out_path (jsonl, `mc` format); return a summary.

    documents: (name, text) pairs of HELD-OUT files (never trained on). The same documents and
    seed give the same file, byte for byte. Raises ValueError when fewer than 2 documents
    have usable lines (distractors must come from other files).
    """
    named = [(name, text.splitlines()) for name, text in documents]
    names = [nm for nm, _ in named]
    docs = [lines for _, lines in named]
    rng = random.Random(seed)
    cands = _candidates(docs)
    if len({d for d, _ in cands}) < 2:
        raise ValueError("the next-line task needs at least 2 held-out documents with code lines")
    rng.shuffle(cands)
    pool = _by_indent(docs)
    rows = []
    for d, i in cands:
        if len(rows) == n:
            break
        truth = docs[d][i]
        wrong = _distractors(rng, pool, d, truth, N_CHOICES - 1)
        if wrong is None:
            continue
        label = rng.randrange(N_CHOICES)
        choices = wrong[:label] + [truth] + wrong[label:]
        context = "\n".join(docs[d][i - CONTEXT_LINES : i])
        rows.append(
            {
                "context": context,
                "choices": choices,
                "label": label,
                "target_delimiter": "\n",
                "source": f"{names[d]}:{i + 1}",
            }
        )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return {"path": str(out), "examples": len(rows), "choices": N_CHOICES, "chance": CHANCE}
