"""Llama with Muon across real processes (torchrun, gloo, CPU): DDP, FSDP2 and ZeRO-1 equal one process.

Muon orthogonalises each hidden matrix's whole update. Under DDP every rank holds the whole
all-reduced gradient; under FSDP2 a rank holds a shard, and Muon gathers the matrix, runs the
same Newton-Schulz on every rank and keeps its rows (optim/muon.py). Either way the run must
equal the single process up to float rounding (the same 16-sequence global batch a step).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from stalwart.train import train
from tests.conftest import tiny_config
from tests.test_distributed import (
    COMMON,
    ONE_RANK,
    TWO_RANKS,
    assert_close,
    assert_weights_close,
    final,
    launched,
    losses,
    torchrun_cmd,
)

pytestmark = pytest.mark.dist

LLAMA = ["--model.arch", "llama", "--model.n_kv_head", "1", "--model.tie_embeddings", "false"]
LLAMA += ["--train.fused_gelu", "false", "--optim.name", "muon"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-dist")
    train(tiny_config(root / "one", tiny_data, *COMMON, *ONE_RANK, *LLAMA), progress=False)
    jobs = {
        mode: torchrun_cmd(root / mode, tiny_data, *TWO_RANKS, *LLAMA, "--parallel.mode", mode)
        for mode in ("ddp", "fsdp", "zero1")
    }
    with ExitStack() as stack:
        procs = {m: stack.enter_context(launched(c, root / f"{m}.log")) for m, c in jobs.items()}
        rcs = {m: p.wait(timeout=600) for m, p in procs.items()}
    for mode, rc in rcs.items():
        assert rc == 0, (
            f"{mode}: torchrun exited {rc}:\n{(root / f'{mode}.log').read_text()[-4000:]}"
        )
    return root


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero1"])
def test_llama_muon_two_ranks_equal_one_process(runs, mode):
    assert_close(losses(runs / mode), losses(runs / "one"), tol=2e-5)
    assert_weights_close(final(runs / mode), final(runs / "one"), atol=1e-4)
