"""Downstream tasks and samples during training (eval.tasks, eval.task_interval,
train.sample_interval).

`eval.tasks` names multiple-choice files, `KIND:PATH` separated by commas (`hellaswag:DATA.jsonl,
mc:other.jsonl`); `auto` is the dataset's built-in task (`DATA/tasks/next-line.jsonl`, written
by `prepare` for the built-in corpus) when it exists. Every rank scores its slice of the chunks
(see mc.py) and the counts are summed with ONE all-reduce, so a sharded evaluation equals one
process's. The record gets `task/NAME/acc` and `task/NAME/acc_norm` (NAME: the file's stem).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stalwart import parallel
from stalwart.data.tokenizer import load_tokenizer
from stalwart.errors import UserError
from stalwart.eval import mc
from stalwart.eval.sample import generate
from stalwart.eval.tasks import TASKS, load_task

BUILTIN_TASK = "tasks/next-line.jsonl"
SAMPLE_PROMPTS = ("def ", "class ", "import ")
SAMPLE_TEMPERATURE = 0.8


def parse_tasks(spec: str, data_dir: str | Path) -> list[tuple[str, str, Path]]:
    """`eval.tasks` -> [(name, kind, path)]. Paths are checked when the run is built."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "auto":
        builtin = Path(data_dir) / BUILTIN_TASK
        return [("next-line", "mc", builtin)] if builtin.is_file() else []
    out = []
    for item in spec.split(","):
        kind, sep, path = item.strip().partition(":")
        if not sep or kind not in TASKS or not path:
            raise UserError(
                f"--eval.tasks: {item.strip()!r} is not KIND:PATH with KIND one of "
                f"{', '.join(TASKS)} (e.g. hellaswag:data/hellaswag_val.jsonl)"
            )
        out.append((Path(path).stem, kind, Path(path)))
    return out


class TaskSuite:
    """The run's tasks, read once when the run is built (a bad file stops the run at once)."""

    def __init__(self, tasks: list[tuple[str, str, Path]], tok, block_size: int):
        self.tok, self.block_size = tok, block_size
        self.tasks = [(name, load_task(kind, path)) for name, kind, path in tasks]

    @torch.no_grad()
    def run(self, model, prec, ctx) -> dict:
        """{'task/NAME/acc': ..., 'task/NAME/acc_norm': ...}, equal on every rank."""
        was_training = model.training
        model.eval()
        counts = []
        for _, examples in self.tasks:
            scored = mc.score_examples(
                model, self.tok, examples, self.block_size, prec.device, prec.autocast,
                ctx.rank, ctx.world_size,
            )  # fmt: skip
            counts += [sum(s.pred == s.label for s in scored),
                       sum(s.pred_norm == s.label for s in scored), len(scored)]  # fmt: skip
        model.train(was_training)
        # one all-reduce for every task: (correct, correct_norm, n) per task, summed over ranks
        total = parallel.sum_across_ranks(torch.tensor(counts, dtype=torch.float64), ctx)
        record = {}
        for k, (name, examples) in enumerate(self.tasks):
            right, right_norm, n = (float(v) for v in total[3 * k : 3 * k + 3])
            record[f"task/{name}/acc"] = right / n
            record[f"task/{name}/acc_norm"] = right_norm / n
            record[f"task/{name}/chance"] = sum(1 / len(e.choices) for e in examples) / n
        return record


class Downstream:
    """What the loop evaluates beyond the held-out loss: tasks and samples, at their intervals.

    Under FSDP a forward is a collective, so every rank scores every example (the same
    forwards everywhere, no all-reduce); otherwise each rank scores its slice."""

    def __init__(self, eval_cfg, train_cfg, data_dir, meta: dict, block_size: int, ctx, run_dir):
        tasks = parse_tasks(eval_cfg.tasks, data_dir)
        needed = tasks or train_cfg.sample_interval
        tok = load_tokenizer(data_dir, meta.get("tokenizer", "byte")) if needed else None
        self.suite = TaskSuite(tasks, tok, block_size) if tasks else None
        self.tok, self.ctx, self.every = tok, ctx, eval_cfg.task_interval
        self.sample_every, self.seed = train_cfg.sample_interval, 0
        self.sample_tokens = min(train_cfg.sample_tokens or 64, 64)
        self.samples_path = Path(run_dir) / "samples.jsonl"

    def tasks(self, model, prec, step: int, last: bool) -> dict:
        if self.suite is None or not (last or (self.every and step % self.every == 0)):
            return {}
        sharded = self.ctx.mode != "fsdp"
        return self.suite.run(model, prec, self.ctx if sharded else parallel.DistContext())

    def samples(self, model, step: int, last: bool) -> bool:
        if not self.sample_every or not (last or step % self.sample_every == 0):
            return False
        if self.ctx.is_main or self.ctx.mode == "fsdp":  # FSDP: every rank runs the forwards
            path = self.samples_path if self.ctx.is_main else None
            write_samples(model, self.tok, step, path, self.sample_tokens, self.seed)
        return True


@torch.no_grad()
def write_samples(model, tok, step: int, path: Path | None, max_new_tokens: int, seed: int) -> None:
    """A few fixed prompts, greedy and at a temperature, appended to samples.jsonl."""
    was_training = model.training
    device = next(model.parameters()).device
    lines = []
    for prompt in SAMPLE_PROMPTS:
        for temp in (0.0, SAMPLE_TEMPERATURE):
            idx = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
            gen = torch.Generator(device=device).manual_seed(seed)
            ids = generate(model, idx, max_new_tokens, temp, 50, gen)[0, idx.shape[1] :]
            text = tok.decode(ids.tolist())
            rec = {"step": step, "prompt": prompt, "temperature": temp, "text": text}
            lines.append(json.dumps(rec, ensure_ascii=False))
    model.train(was_training)
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def task_lines(run_dir: Path) -> list[str]:
    """The end-of-run summary's lines: each task's latest accuracy against its chance level."""
    latest: dict = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        if '"task/' in line:
            try:
                latest = json.loads(line)
            except json.JSONDecodeError:
                continue
    out = []
    for key, acc in latest.items():
        if key.startswith("task/") and key.endswith("/acc"):
            name = key[len("task/") : -len("/acc")]
            norm, chance = latest.get(f"task/{name}/acc_norm"), latest.get(f"task/{name}/chance")
            out.append(f"task {name} (step {latest['step']}): acc {acc:.3f}, acc_norm {norm:.3f}, "
                       f"chance {chance:.3f}")  # fmt: skip
    return out
