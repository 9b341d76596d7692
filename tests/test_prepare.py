"""`stalwart prepare` as a user runs it: real subprocesses, real bad inputs, a real SIGKILL, a
real full disk (a file-size limit), and the training run on a sharded dataset killed and resumed.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stalwart.data.loader import open_dataset
from tests.conftest import ROOT, STDLIB, run_cli, tiny_config
from tests.test_tokenizer import GPT2_FILE, needs_gpt2


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_clean_failure(r, out: Path, match: str, before: dict | None = None):
    """exit 2, one `error:` line, no partial output, an existing dataset untouched."""
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not list(out.parent.glob(f".{out.name}.*")), "partial output left behind"
    if before is not None:
        assert _tree(out) == before


@pytest.fixture(scope="module")
def existing(tmp_path_factory, tiny_text_dir):
    """A dataset the failing commands below must leave exactly as it is (they run with --force)."""
    out = tmp_path_factory.mktemp("existing") / "ds"
    r = run_cli("prepare", tiny_text_dir, "--out", out, "--workers", "1")
    assert r.returncode == 0, r.stderr
    return out


def test_bad_inputs_fail_cleanly(tmp_path, existing):
    before = _tree(existing)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    (bad / "nofield.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"body": "x"}\n'))
    (bad / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (bad / "empty.txt").write_text("")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), bad / "nocol.parquet")
    cases = [
        (bad / "broken.jsonl", "broken.jsonl:2 is not valid JSON"),
        (bad / "nofield.jsonl.gz", 'nofield.jsonl.gz:2 has no string "text" field'),
        (bad / "latin1.txt", "is not UTF-8"),
        (bad / "empty.txt", "hold no text"),
        (bad / "nocol.parquet", "has no column 'text'"),
        (bad / "missing.txt", "does not exist"),
    ]
    for path, match in cases:
        r = run_cli("prepare", path, "--out", existing, "--force", "--workers", "2")
        _assert_clean_failure(r, existing, match, before)
    r = run_cli("prepare", bad / "nofield.jsonl.gz", "--out", tmp_path / "x", "--text-field", "b")
    _assert_clean_failure(r, tmp_path / "x", '"b" field')


def test_hf_dataset_offline_is_one_clear_line(tmp_path):
    pytest.importorskip("datasets")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = run_cli("prepare", "--hf-dataset", "nobody/nothing:train", "--out", tmp_path / "o", env=env)
    _assert_clean_failure(
        r, tmp_path / "o", "--hf-dataset nobody/nothing:train could not be opened"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_mid_prepare_removes_partial_output(tmp_path, tiny_text_dir, workers):
    """A real write failure: RLIMIT_FSIZE makes a write past 150 KB of a file fail (EFBIG), as a
    full disk does (ENOSPC), in the middle of the train shard (~230 KB); with 2 workers it is a
    worker's spill file that fails first, and its error is the same one line."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "stalwart", "prepare", str(tiny_text_dir), "--out", str(out),
           "--workers", workers]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=limit, timeout=120)
    _assert_clean_failure(r, out, "the disk filled up")
    assert not out.exists()


def _big_corpus(d: Path) -> Path:
    """~6 MB of real text in jsonl.gz shards: long enough to be killed in the middle."""
    d.mkdir()
    files = sorted(STDLIB.rglob("*.py"))[:900]
    for k in range(3):
        with gzip.open(d / f"part-{k}.jsonl.gz", "wt") as f:
            for p in files[k::3]:
                f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return d


@pytest.mark.slow
@needs_gpt2
def test_sigkill_during_prepare_then_rerun_finishes_identically(tmp_path):
    corpus = _big_corpus(tmp_path / "corpus")
    args = [str(corpus), "--tokenizer", f"gpt2:{GPT2_FILE}", "--shard-tokens", "50000",
            "--workers", "2"]  # fmt: skip
    ref = tmp_path / "ref"
    assert run_cli("prepare", *args, "--out", ref).returncode == 0
    out = tmp_path / "ds"
    progress = tmp_path / ".ds.partial" / "progress.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "stalwart", "prepare", *args, "--out", str(out)],
                         cwd=ROOT, env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (
        progress.is_file() and len(json.loads(progress.read_text())["train"]["shards"]) >= 3
    ):
        assert p.poll() is None and time.monotonic() < deadline, "finished before the kill"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()  # nothing that opens as a dataset
    r = run_cli("prepare", *args, "--out", out)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    assert _tree(out) == _tree(ref)  # every shard and meta.json, byte for byte
    assert not progress.parent.exists()


@pytest.mark.slow
def test_training_on_shards_with_prefetch_resumes_bit_exact_after_sigkill(tmp_path, tiny_text_dir):
    """Many small shards (windows straddle them), epoch sampling, prefetch on: a training run
    killed for real resumes into the uninterrupted run's exact losses and tensors."""
    from stalwart.train import train
    from tests.test_resume import Trainer, assert_same_run, cli_args, wait_for_record

    small = tmp_path / "text"  # ~40 KB: 20 steps of 16 windows of 128 pass an epoch's end
    small.mkdir()
    size = 0
    for f in sorted(tiny_text_dir.iterdir()):
        if size < 40_000:
            (small / f.name).write_bytes(f.read_bytes())
            size += f.stat().st_size
    data = tmp_path / "data"
    r = run_cli("prepare", small, "--out", data, "--shard-tokens", "997", "--val-frac", "0.3")
    assert r.returncode == 0, r.stderr
    assert len(open_dataset(data).train.maps) > 20
    extra = ("--data.sampling", "epoch", "--data.prefetch", "on", "--model.block_size", "128",
             "--train.grad_accum", "2")  # fmt: skip
    ref = tmp_path / "ref"
    train(tiny_config(ref, data, *extra), progress=False)
    run = tmp_path / "run"
    p = Trainer(cli_args(run, data, *extra))
    wait_for_record(run, 13, p)
    assert p.kill() == -signal.SIGKILL
    train(tiny_config(run, data, *extra), progress=False)
    assert_same_run(run, ref, 20)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if "train_loss" in r]
    assert epochs[0] == 0 and epochs[-1] >= 1  # the records say which epoch
