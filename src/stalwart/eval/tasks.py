"""Multiple-choice task files -> examples, read exactly as lm-evaluation-harness reads them.

Two formats, one JSON object per line:

- `hellaswag`: the published HellaSwag jsonl (`ctx_a`, `ctx_b`, `activity_label`, `endings`,
  `label`). The text is prepared as lm-eval's `hellaswag` task does (lm_eval 0.4.13,
  tasks/hellaswag/utils.py): ctx = ctx_a + " " + ctx_b.capitalize(); the query is
  preprocess(activity_label + ": " + ctx), each choice preprocess(ending), and the scored
  continuation is " " + choice (the default target delimiter).
- `mc`: any multiple-choice file (`context`, `choices`, `label`, and optionally
  `target_delimiter`, default " " as in lm-eval). The built-in next-line task is in this format.

A line that is not in the format is refused with its line number and the missing field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from stalwart.errors import UserError

TASKS = ("hellaswag", "mc")
HELLASWAG_FIELDS = ("ctx_a", "ctx_b", "activity_label", "endings", "label")
MC_FIELDS = ("context", "choices", "label")


@dataclass(frozen=True)
class Example:
    """One question: the context, the choices, the index of the right one, and the text put
    between the context and each choice (lm-eval's `target_delimiter`)."""

    context: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = " "


def preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`, character for character."""
    text = text.strip()
    # NOTE (lm-eval): brackets are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_example(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Example(
        context=preprocess(doc["activity_label"] + ": " + ctx),
        choices=tuple(preprocess(e) for e in doc["endings"]),
        label=int(doc["label"]),
    )


def mc_example(doc: dict) -> Example:
    return Example(
        context=doc["context"],
        choices=tuple(doc["choices"]),
        label=int(doc["label"]),
        delimiter=doc.get("target_delimiter", " "),
    )


def _check(doc, where: str, task: str) -> None:
    """Raise a UserError naming the line and the field that is missing or malformed."""
    if not isinstance(doc, dict):
        raise UserError(f"{where}: not a JSON object (a {task} line is one object per line)")
    fields = HELLASWAG_FIELDS if task == "hellaswag" else MC_FIELDS
    for name in fields:
        if name not in doc:
            raise UserError(
                f"{where}: missing field {name!r} (a {task} line has {', '.join(fields)})"
            )
    choices = doc["endings" if task == "hellaswag" else "choices"]
    texts = [k for k in fields if k not in ("endings", "choices", "label")]
    texts += ["target_delimiter"] if "target_delimiter" in doc else []
    for name in texts:
        if not isinstance(doc[name], str):
            raise UserError(f"{where}: field {name!r} must be a string")
    key = "endings" if task == "hellaswag" else "choices"
    if not (isinstance(choices, list) and len(choices) >= 2):
        raise UserError(f"{where}: field {key!r} must be a list of at least 2 strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: field {key!r} must hold non-empty strings")
    label = doc["label"]
    ok = isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit())
    if isinstance(label, bool) or not ok or not 0 <= int(label) < len(choices):
        raise UserError(
            f"{where}: field 'label' must be a choice index 0..{len(choices) - 1}, got {label!r}"
        )


def load_task(task: str, path: str | Path) -> list[Example]:
    """Every example of a `hellaswag` or `mc` jsonl file (blank lines skipped)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"task file {p} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (byte {e.start}): a task file is jsonl") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        _check(doc, where, task)
        out.append(hellaswag_example(doc) if task == "hellaswag" else mc_example(doc))
    if not out:
        raise UserError(f"{p} holds no examples")
    return out
