"""The single-process parts of the distributed code: launch checks, the per-step agreement,
and DCP metadata that is read without running anyone's code. No process group needed."""

from __future__ import annotations

import pickle

import pytest
import torch

from stalwart import parallel
from stalwart.checkpoint import format as ck
from stalwart.checkpoint.backend import DistributedBackend, LocalBackend, pick_backend
from stalwart.checkpoint.safe_dcp import load_shards
from stalwart.config import OptimConfig, ParallelConfig, TrainConfig
from stalwart.errors import UserError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for var in TORCHRUN_ENV:
        monkeypatch.delenv(var, raising=False)


def test_mode_none_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--parallel.mode ddp, fsdp or zero1"):
        parallel.init(ParallelConfig(mode="none"), "cpu")


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "zero1"])
def test_parallel_modes_need_torchrun(no_torchrun, mode):
    with pytest.raises(UserError, match=f"--parallel.mode {mode} needs a torchrun launch"):
        parallel.init(ParallelConfig(mode=mode), "cpu")


def test_one_process_is_a_plain_context(no_torchrun):
    ctx = parallel.init(ParallelConfig(), "cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)


def test_agreement_in_one_process_passes_values_through():
    ctx = parallel.DistContext()
    loss, norm = torch.tensor(2.5), torch.tensor(float("nan"))
    loss_f, norm_f, stop = parallel.agree_on_step(loss, norm, True, ctx)
    assert loss_f == 2.5 and norm_f != norm_f and stop is True


def test_eval_batches_round_up_to_the_world_size():
    ctx = parallel.DistContext(world_size=4)
    assert [parallel.eval_batches_total(n, ctx) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]


def test_dcp_metadata_of_a_real_save_is_read_and_a_forged_one_never_runs(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"optim": {"w": {"exp_avg": torch.arange(6.0).reshape(2, 3)}}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "ok"))
    target = {"optim": {"w": {"exp_avg": torch.zeros(2, 3)}}}
    load_shards(target, tmp_path / "ok")  # the restricted reader accepts DCP's own
    assert torch.equal(target["optim"]["w"]["exp_avg"], state["optim"]["w"]["exp_avg"])

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ck.CheckpointUnreadable, match="cannot be read safely"):
        load_shards(target, forged)
    assert not marker.exists()


def test_the_checkpoint_backend_is_chosen_once_from_the_context():
    facts = {"optim": OptimConfig(), "train": TrainConfig(), "seed": 0}
    assert isinstance(pick_backend(None, **facts), LocalBackend)
    assert isinstance(pick_backend(parallel.DistContext(), **facts), LocalBackend)
    # any torchrun launch, even of one process: every rank takes part in every save
    one_fsdp = parallel.DistContext(mode="fsdp")
    two_ddp = parallel.DistContext(world_size=2, mode="ddp")
    assert isinstance(pick_backend(one_fsdp, **facts), DistributedBackend)
    assert isinstance(pick_backend(two_ddp, **facts), DistributedBackend)
    assert not pick_backend(parallel.DistContext(rank=1, world_size=2), **facts).is_main


def test_collectives_of_one_process_are_the_identity():
    ctx = parallel.DistContext()
    assert parallel.any_rank(True, ctx) is True and parallel.any_rank(False, ctx) is False
    parallel.barrier(ctx)  # returns at once
