"""In-loop task evaluation sharded over 2 data-parallel ranks (torchrun, gloo, CPU) equals one
process scoring every example of the same weights."""

from __future__ import annotations

import json
import sys

import pytest

from stalwart.eval.builtin_task import make_next_line_task
from stalwart.logs.metrics import read_metrics
from tests.conftest import TINY, run_cli
from tests.test_distributed import run_torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sharded_task_eval_equals_one_process(tmp_path, tiny_data, tiny_text_dir, mode):
    docs = [(p.name, p.read_text()) for p in sorted(tiny_text_dir.iterdir())]
    task = tmp_path / "nl.jsonl"
    make_next_line_task(docs, task, n=43, seed=0)  # 6 chunks of 8 (the last 3): uneven ranks
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "stalwart", "train", "--quiet", *TINY, "--run.dir", str(run),
           "--data.dir", str(tiny_data), "--parallel.mode", mode, "--train.max_steps", "6",
           "--schedule.warmup_steps", "2", "--ckpt.interval", "6", "--train.precision", "fp32",
           "--eval.tasks", f"mc:{task}", "--eval.task_interval", "3",
           "--train.sample_interval", "6", "--train.dashboard", "false"]  # fmt: skip
    run_torchrun(cmd, tmp_path / "train.log", timeout=240)
    recs = [r for r in read_metrics(run / "metrics.jsonl") if "task/nl/acc" in r]
    assert [r["step"] for r in recs] == [3, 6]
    # one process, every example, the weights of the last step (its checkpoint)
    r = run_cli("eval", run, "--task", "mc", "--data", task, "--json")
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)
    assert one["n"] == 43
    assert (one["acc"], one["acc_norm"]) == (recs[-1]["task/nl/acc"], recs[-1]["task/nl/acc_norm"])
    samples = (run / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6  # written once (rank 0), 3 prompts x (greedy, T=0.8)
