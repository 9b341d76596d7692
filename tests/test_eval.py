"""Downstream evaluation: lm-eval's HellaSwag / multiple-choice scoring, by hand and against a
`transformers` reference on the export; the built-in next-line task; tasks and samples in the
loop; bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stalwart.errors import UserError
from stalwart.eval import mc
from stalwart.eval.builtin_task import make_next_line_task
from stalwart.eval.intask import parse_tasks, task_lines
from stalwart.eval.tasks import Example, load_task, preprocess
from stalwart.logs.metrics import read_metrics
from tests.conftest import STDLIB, run_cli, tiny_config

HS_DOC = {
    "activity_label": "Home and Garden",
    "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
    "ctx_b": "then, put the tree in",
    "endings": [" the hole [step]  and water it.", "the sky.", "a [title] box", "it  again "],
    "label": "0",
}


def test_hellaswag_text_is_prepared_as_lm_eval_does(tmp_path):
    # ctx = ctx_a + " " + ctx_b.capitalize(); query = preprocess(label + ": " + ctx), where
    # preprocess strips, turns " [title]" into ". ", drops [...] and collapses double spaces
    f = tmp_path / "hs.jsonl"
    f.write_text(json.dumps(HS_DOC) + "\n")
    (ex,) = load_task("hellaswag", f)
    assert ex.context == "Home and Garden: How to plant a tree. Dig a hole. Then, put the tree in"
    # one pass of "  " -> " ": three spaces become two, as in lm-eval (a quirk kept on purpose)
    assert ex.choices == ("the hole  and water it.", "the sky.", "a. box", "it again")
    assert ex.label == 0 and ex.delimiter == " "
    assert preprocess("  a  [x]b ") == "a b"


class WindowBigram(torch.nn.Module):
    """logits at position t = table[x_t] + pos[t]: log-probabilities known in closed form,
    and they depend on where a token sits in the window, so truncation shows."""

    def __init__(self, table: np.ndarray, pos: np.ndarray, block_size: int):
        super().__init__()
        self.table, self.pos = torch.tensor(table), torch.tensor(pos)
        self.lm_head = torch.nn.Linear(1, table.shape[1])
        self.cfg = type("Cfg", (), {"block_size": block_size})()

    def forward(self, idx):
        return self.table[idx] + self.pos[: idx.shape[1]].unsqueeze(0), None


class Bytes:
    eot_id = None

    def encode(self, text):
        return list(text.encode("utf-8"))


def by_hand(table, pos, block, context, choice, delim):
    """Summed log-probability of delim + choice after context, computed token by token."""
    cont_text = delim + choice
    stripped = context.rstrip()  # lm-eval moves the context's trailing spaces to the choice
    cont_text = context[len(stripped) :] + cont_text
    ctx, cont = list(stripped.encode()), list(cont_text.encode())
    window = (ctx + cont)[-(block + 1) :][:-1]  # lm-eval: keep the last block+1, drop the last
    total = 0.0
    for j, tok in enumerate(cont):
        p = len(window) - len(cont) + j  # the position whose logits predict cont[j]
        row = table[window[p]] + pos[p]
        total += row[tok] - (math.log(np.exp(row - row.max()).sum()) + row.max())
    return total


def test_acc_and_acc_norm_by_hand_including_truncation():
    rng = np.random.default_rng(0)
    block = 12
    table = rng.normal(0, 2, (256, 256)).astype(np.float32)
    pos = rng.normal(0, 2, (block, 256)).astype(np.float32)
    model = WindowBigram(table, pos, block)
    examples = [
        Example("the cat sat on", ("the mat", "a red hat", "it"), 0),
        Example("a very long context that is truncated ", ("ok", "fine then"), 1),
        Example("x", ("abc", "zz"), 1, delimiter="\n"),
        Example("short", ("a", "bb", "ccc", "dddd"), 3),
    ] * 3  # 12 examples: two chunks of 8 and 4
    scored = mc.score_examples(model, Bytes(), examples, block)
    preds, norms = [], []
    for ex, s in zip(examples, scored):
        lls = [by_hand(table, pos, block, ex.context, c, ex.delimiter) for c in ex.choices]
        assert s.lls == pytest.approx(lls, abs=1e-4)
        preds.append(int(np.argmax(lls)))
        norms.append(int(np.argmax(np.array(lls) / [len(c) for c in ex.choices])))
    assert [s.pred for s in scored] == preds and [s.pred_norm for s in scored] == norms
    assert preds != norms  # the example exercises both metrics, not one twice
    summary = mc.summarize(scored)
    labels = [e.label for e in examples]
    assert summary["acc"] == np.mean(np.array(preds) == labels)
    assert summary["acc_norm"] == np.mean(np.array(norms) == labels)
    # the second example's context (38 bytes + 3 of choice) does not fit in 12: truncated
    assert len(mc.encode_pair(Bytes(), examples[1].context, " fine then")[0]) > block


def test_sharding_takes_whole_chunks_and_covers_every_example():
    n = 8 * 5 + 3
    got = sorted(i for r in range(3) for c in mc.my_chunks(n, r, 3) for i in c)
    assert got == list(range(n))
    assert mc.n_rounds(n, 3) == 2


def test_next_line_task_is_deterministic_and_fair(tmp_path):
    files = sorted((STDLIB / "json").glob("*.py")) + [STDLIB / "textwrap.py"]
    docs = [(p.name, p.read_text()) for p in files]
    a = make_next_line_task(docs, tmp_path / "a.jsonl", n=50, seed=1)
    make_next_line_task(docs, tmp_path / "b.jsonl", n=50, seed=1)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a["examples"] == 50 and a["chance"] == 0.25
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    texts = dict(docs)
    labels = set()
    for r in rows:
        name, line = r["source"].rsplit(":", 1)
        truth = r["choices"][r["label"]]
        assert texts[name].splitlines()[int(line) - 1] == truth
        assert r["context"].endswith(texts[name].splitlines()[int(line) - 2])
        indent = {c[: len(c) - len(c.lstrip())] for c in r["choices"]}
        assert len(indent) == 1 and len(set(r["choices"])) == 4  # same indentation, distinct
        labels.add(r["label"])
    assert labels == {0, 1, 2, 3}
    assert len(load_task("mc", tmp_path / "a.jsonl")) == 50
    with pytest.raises(ValueError, match="at least 2"):
        make_next_line_task(docs[:1], tmp_path / "c.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, tiny_text_dir):
    """A tiny run with the next-line task and samples in the loop, and its HF export."""
    from stalwart.train import train

    root = tmp_path_factory.mktemp("evalrun")
    docs = [(p.name, p.read_text()) for p in sorted(tiny_text_dir.iterdir())]
    make_next_line_task(docs, root / "nl.jsonl", n=40, seed=0)
    cfg = tiny_config(
        root / "run", tiny_data, "--eval.tasks", f"mc:{root / 'nl.jsonl'}",
        "--eval.task_interval", "10", "--train.sample_interval", "10",
        "--train.precision", "fp32", "--train.dashboard", "false",
    )  # fmt: skip
    train(cfg, progress=False)
    r = run_cli("export", root / "run", "--format", "hf", "--out", root / "hf")
    assert r.returncode == 0, r.stderr
    return root


def test_tasks_and_samples_in_the_loop(trained):
    recs = [r for r in read_metrics(trained / "run" / "metrics.jsonl") if "task/nl/acc" in r]
    assert [r["step"] for r in recs] == [10, 20]
    assert all(0 <= r["task/nl/acc"] <= 1 and 0 <= r["task/nl/acc_norm"] <= 1 for r in recs)
    samples = [json.loads(x) for x in (trained / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10] * 6 + [20] * 6
    assert {(s["prompt"], s["temperature"]) for s in samples if s["step"] == 20} == {
        (p, t) for p in ("def ", "class ", "import ") for t in (0.0, 0.8)
    }
    (line,) = task_lines(trained / "run")  # the end-of-run summary's line
    assert line.startswith("task nl (step 20): acc ") and line.endswith("chance 0.250")
    # the loop's accuracy at the last step is `stalwart eval` of the last checkpoint
    r = run_cli("eval", trained / "run", "--task", "mc", "--data", trained / "nl.jsonl", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["acc"], out["acc_norm"]) == (recs[-1]["task/nl/acc"], recs[-1]["task/nl/acc_norm"])


def test_scores_equal_a_transformers_reference_on_the_export(trained, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hs = tmp_path / "hs.jsonl"
    long_ctx = dict(HS_DOC, ctx_b="then " + "put the tree in the hole " * 3)  # > 32 tokens
    hs.write_text("\n".join(json.dumps(d) for d in [HS_DOC, long_ctx] * 5) + "\n")
    for task, data in (("mc", trained / "nl.jsonl"), ("hellaswag", hs)):
        out = tmp_path / f"{task}.jsonl"
        r = run_cli("eval", trained / "hf", "--task", task, "--data", data, "--out", out)
        assert r.returncode == 0, r.stderr
        mine = [json.loads(x) for x in out.read_text().splitlines()]
        hf = GPT2LMHeadModel.from_pretrained(trained / "hf").eval()
        tok = AutoTokenizer.from_pretrained(trained / "hf")
        block = hf.config.n_positions
        for ex, m in zip(load_task(task, data), mine):
            lls = []
            for c in ex.choices:  # the plain way: encode whole, split, truncate left, one by one
                ctx = tok.encode(ex.context.rstrip())  # lm-eval: trailing spaces join the choice
                cont = tok.encode(ex.context + ex.delimiter + c)[len(ctx) :]
                if len(cont) > block:  # longer than the window: its last `block` tokens count
                    ctx, cont = ctx + cont[:-block], cont[-block:]
                ids = (ctx + cont)[-(block + 1) :][:-1]
                with torch.no_grad():
                    logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
                lls.append(
                    sum(float(logp[len(ids) - len(cont) + j, t]) for j, t in enumerate(cont))
                )
            assert m["lls"] == pytest.approx(lls, abs=1e-4)
            assert m["pred"] == int(np.argmax(lls))
            assert m["pred_norm"] == int(np.argmax(np.array(lls) / [len(c) for c in ex.choices]))


def test_bad_input_names_the_line_and_the_field(trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    doc = {k: v for k, v in HS_DOC.items() if k != "ctx_b"}
    bad.write_text(json.dumps(HS_DOC) + "\n\n" + json.dumps(doc) + "\n")
    r = run_cli("eval", trained / "hf", "--task", "hellaswag", "--data", bad)
    assert r.returncode == 2 and r.stderr.startswith("error:")
    assert f"{bad}:3" in r.stderr and "'ctx_b'" in r.stderr and "Traceback" not in r.stderr
    bad.write_text('{"context": "a", "choices": ["b", "c"], "label": 2}\n')
    r = run_cli("eval", trained / "hf", "--task", "mc", "--data", bad)
    assert r.returncode == 2 and f"{bad}:1" in r.stderr and "'label'" in r.stderr
    bad.write_text("not json\n")
    r = run_cli("eval", trained / "hf", "--task", "mc", "--data", bad)
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    with pytest.raises(UserError, match="KIND:PATH"):
        parse_tasks("nl.jsonl", ".")


def test_an_export_without_a_tokenizer_says_so(trained, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained / "hf", bare)
    for name in ("tokenizer.json", "stalwart.json"):
        (bare / name).unlink(missing_ok=True)
    r = run_cli("eval", bare, "--task", "mc", "--data", trained / "nl.jsonl")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_dashboard_shows_task_accuracy_and_samples(trained):
    from stalwart.health.dashboard import write_dashboard

    _, page, _ = write_dashboard(trained / "run")
    text = page.read_text()
    assert "Downstream tasks" in text and "<svg" in text and "chance 0.25" in text
    assert "<h2>Samples</h2>" in text and "steps 10, 20" in text


def test_bits_per_byte_of_a_text_file(trained, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text((STDLIB / "bisect.py").read_text())
    r = run_cli("eval", trained / "hf", "--task", "bpb", "--data", text, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bytes"] == len(text.read_bytes()) and out["tokens"] == len(text.read_bytes())
    assert 0 < out["bits_per_byte"] < 8  # better than uniform over 256 bytes after 20 steps
    text.write_bytes(b"\xff\xfe\x00")
    r = run_cli("eval", trained / "hf", "--task", "bpb", "--data", text)
    assert r.returncode == 2 and "not UTF-8" in r.stderr


def test_tasks_and_samples_leave_the_training_unchanged(trained, tmp_path, tiny_data):
    from stalwart.train import train

    cfg = tiny_config(tmp_path / "plain", tiny_data, "--eval.tasks", "none",
                      "--train.precision", "fp32", "--train.dashboard", "false")  # fmt: skip
    train(cfg, progress=False)

    def losses(run):
        recs = read_metrics(run / "metrics.jsonl")
        return [(r["step"], repr(r["train_loss"]), repr(r.get("val_loss"))) for r in recs
                if "train_loss" in r]  # fmt: skip

    assert losses(tmp_path / "plain") == losses(trained / "run")


def test_samples_of_replayed_steps_are_written_once(tmp_path, tiny_data):
    """A crash after step 15 and a resume from the step-10 checkpoint: samples.jsonl, like
    metrics.jsonl, drops what the killed attempt wrote after its checkpoint."""
    from collections import Counter

    from stalwart.train import AfterStep, train

    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 15:
            raise Crash

    over = ("--train.sample_interval", "5", "--train.max_steps", "20")
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(tiny_config(run, tiny_data, *over), progress=False, callbacks=[AfterStep(crash)])
    before = Counter(json.loads(line)["step"] for line in open(run / "samples.jsonl"))
    assert set(before) == {5, 10, 15}
    train(tiny_config(run, tiny_data, *over), progress=False)
    after = Counter(json.loads(line)["step"] for line in open(run / "samples.jsonl"))
    assert set(after) == {5, 10, 15, 20} and len(set(after.values())) == 1  # each step once
