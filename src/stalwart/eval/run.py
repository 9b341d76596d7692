"""`stalwart eval PATH --task hellaswag|mc|bpb --data FILE`: one model, one task, one report.

PATH is a run directory (its newest valid checkpoint), a checkpoint directory or an exported
directory (`stalwart export`, or any Hugging Face GPT-2 directory). The model runs in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stalwart.errors import UserError
from stalwart.eval import mc
from stalwart.eval.bpb import bits_per_byte
from stalwart.eval.sample import load_any
from stalwart.eval.tasks import load_task

EVAL_TASKS = ("hellaswag", "mc", "bpb")


def run_eval(path: str, task: str, data: str, out: str | None = None, device: str = "cpu") -> dict:
    """Score the model at `path` on `data`; per-example results to `out` (jsonl) when given."""
    if task not in EVAL_TASKS:
        raise UserError(f"--task {task!r}: use one of {', '.join(EVAL_TASKS)}")
    if task == "bpb":
        return _bpb(path, data, device)
    examples = load_task(task, data)  # a bad file is refused before the model is loaded
    model, tok = load_any(path, device)
    scored = mc.score_examples(model, tok, examples, model.cfg.block_size, device)
    result = {"task": task, "data": str(data), "model": str(path), **mc.summarize(scored)}
    result["chance"] = sum(1 / len(e.choices) for e in examples) / len(examples)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for s in scored:
                f.write(json.dumps(s.as_dict()) + "\n")
    return result


def _bpb(path: str, data: str, device: str) -> dict:
    """Bits per byte of a text file with the model's own tokenizer (eval/bpb.py): every token
    scored once, after the end-of-text token when the tokenizer has one, over the file's bytes."""
    p = Path(data)
    if not p.is_file():
        raise UserError(f"text file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (byte {e.start}): --task bpb reads text") from None
    model, tok = load_any(path, device)
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    if tok.eot_id is None:  # the first token is context only: its bytes are not scored
        n_bytes -= len(tok.decode(ids[:1]).encode("utf-8"))
    if len(ids) < 2 or n_bytes <= 0:
        raise UserError(f"{p} is too short to score (at least 2 tokens)")
    block = model.cfg.block_size
    r = bits_per_byte(model, np.asarray(ids), n_bytes, block, device=device, bos=tok.eot_id,
                      stride=max(1, block // 2))  # fmt: skip
    return {"task": "bpb", "data": str(data), "model": str(path), **r}


def format_result(r: dict) -> str:
    if r["task"] == "bpb":
        return (
            f"{r['data']}: {r['bits_per_byte']:.4f} bits/byte ({r['tokens']:,} tokens scored, "
            f"{r['bytes']:,} bytes)"
        )
    return (
        f"{r['task']} on {r['data']} ({r['n']} examples): acc {r['acc']:.4f}, "
        f"acc_norm {r['acc_norm']:.4f} (chance {r['chance']:.4f})"
    )
