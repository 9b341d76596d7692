"""The unigram byte baseline on the built-in next-line task: does byte frequency give it away?

    .venv/bin/python benchmarks/next_line_baseline.py [DATA_DIR]   # default data/stdlib-byte

Scores every choice of DATA_DIR/tasks/next-line.jsonl with a unigram model of the train split's
token counts (add-one smoothed), tokenized and split as `stalwart eval --task mc` does, and prints
acc and acc_norm beside chance. Byte-level datasets only (a unigram over BPE ids means little).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from stalwart.data.loader import open_dataset
from stalwart.data.tokenizer import load_tokenizer
from stalwart.eval.mc import _argmax, encode_pair
from stalwart.eval.tasks import load_task


def main() -> None:
    data_dir = sys.argv[1] if len(sys.argv) > 1 else "data/stdlib-byte"
    data = open_dataset(data_dir)
    tok = load_tokenizer(data_dir, data.meta.get("tokenizer", "byte"))
    train = np.asarray(data.train[: len(data.train)])
    counts = np.bincount(train, minlength=data.meta["vocab_size"]).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    examples = load_task("mc", f"{data_dir}/tasks/next-line.jsonl")
    acc = acc_norm = 0
    for ex in examples:
        conts = [encode_pair(tok, ex.context, ex.delimiter + c)[1] for c in ex.choices]
        lls = [float(logp[c].sum()) for c in conts]
        acc += _argmax(lls) == ex.label
        acc_norm += _argmax([v / len(c) for v, c in zip(lls, ex.choices)]) == ex.label
    n = len(examples)
    chance = sum(1 / len(e.choices) for e in examples) / n
    print(json.dumps({"n": n, "acc": acc / n, "acc_norm": acc_norm / n, "chance": chance}))


if __name__ == "__main__":
    main()
