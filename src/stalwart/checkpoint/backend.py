"""Where a checkpoint's state comes from and goes to: this one process, or every rank of a
distributed run. `pick_backend` chooses once, from the parallel context; the saver and the
resumer use the same object, through the same small interface:

    capture(parts, config, extra)   in the training thread: the state to write (Captured)
    write(captured, final, info)    the checkpoint directory `final`, committed (maybe on the
                                    writer thread: only where `asynchronous`)
    restore(path, model_state, state, model, optimizer)
                                    the weights into `model`; `state` made ready for
                                    state.restore on this rank (optimizer layout, RNG)

LocalBackend (one process) captures the state itself and refuses weights that hold NaN/Inf;
its write may run on the writer thread. DistributedBackend (any torchrun launch) makes every
rank take part in the save (FSDP: its shards; distributed.py), synchronously, and has no NaN
guard (a sharded model's weights are not all on one rank). Both restore any layout: restoring
through distributed.py reshards (FSDP shards into one process, a full checkpoint into shards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stalwart.checkpoint import distributed as dist_checkpoint
from stalwart.checkpoint import format as ck
from stalwart.checkpoint import state as trainstate
from stalwart.checkpoint.state import TrainParts
from stalwart.config import OptimConfig, TrainConfig
from stalwart.parallel import DistContext


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors that hold NaN/Inf. The save path calls this before
    writing: no NaN weight ever reaches a checkpoint. One host sync per device, per save."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append((name, t))
    bad = []
    for items in by_device.values():
        # max and min propagate NaN and show +-Inf: two reductions per tensor, no tensor-sized
        # bool mask (isfinite(t).all() allocated one per weight: seconds per save at 124M)
        extremes = torch.stack([torch.stack([t.amax(), t.amin()]) for _, t in items])
        flags = torch.isfinite(extremes).all(dim=1)
        bad += [items[i][0] for i in (~flags).nonzero().flatten().tolist()]
    return bad


@dataclass
class Captured:
    """A checkpoint's content as the training thread took it."""

    snapshot: ck.Snapshot | None = None  # local: tensors and tree (copies, for a background write)
    nonfinite: list[str] = field(default_factory=list)  # weights with NaN/Inf: not to be written
    deferred: tuple | None = None  # distributed: (parts, config, extra), captured collectively


class _Backend:
    asynchronous = False  # may `write` run on the writer thread?

    def __init__(self, ctx: DistContext, *, optim: OptimConfig, train: TrainConfig, seed: int):
        self.ctx = ctx
        self.optim, self.train, self.seed = optim, train, seed

    @property
    def is_main(self) -> bool:
        """The rank that commits checkpoints, moves them, and writes the records."""
        return self.ctx.is_main

    def restore(self, path: Path, model_state: dict, state: dict, model, optimizer) -> list[str]:
        """Every rank: the weights into `model` (unwrapped), `state` ready for state.restore.
        Returns what differs from the saved run (parallel layout, RNG streams, data order)."""
        return dist_checkpoint.restore(
            path, model_state, state, model, optimizer, self.ctx,
            optim=self.optim, train=self.train, seed=self.seed,
        )  # fmt: skip


class LocalBackend(_Backend):
    """One process: it captures, checks and writes everything itself."""

    asynchronous = True

    def capture(
        self, parts: TrainParts, config: dict, extra: dict, *, copy: bool = False, pool=None
    ) -> Captured:
        """The state now; `copy` (an asynchronous save) takes private copies, into the buffers
        of `pool` where it has them. Weights holding NaN/Inf are named, not captured."""
        p = parts
        model_state, state = trainstate.capture(
            config, p.model, p.optimizer, p.scaler, p.loader, p.monitor, p.loop, extra
        )
        bad = nonfinite_tensors(model_state)
        if bad:
            return Captured(nonfinite=bad)
        return Captured(snapshot=ck.snapshot(model_state, state, copy=copy, pool=pool))

    def write(
        self,
        captured: Captured,
        final: Path,
        info: dict,
        files: dict[str, Path] | None = None,
        pause: Callable[[Path], None] | None = None,
    ) -> Path:
        """`pause(tmp)` runs once the files are written, before the commit (debug)."""
        return ck.write_snapshot(final, captured.snapshot, info, files, pause)


class DistributedBackend(_Backend):
    """Every rank of a torchrun launch takes part in each save, synchronously; rank 0 commits."""

    def capture(
        self, parts: TrainParts, config: dict, extra: dict, *, copy: bool = False, pool=None
    ) -> Captured:
        """Nothing yet: the state is captured by every rank together, inside `write`."""
        return Captured(deferred=(parts, config, extra))

    def write(
        self,
        captured: Captured,
        final: Path,
        info: dict,
        files: dict[str, Path] | None = None,
        pause: Callable[[Path], None] | None = None,
    ) -> Path:
        p, config, extra = captured.deferred  # (no `pause`: the debug window is a local save's)
        return dist_checkpoint.save(
            final, config, p.model, p.optimizer, p.scaler, p.loader, p.monitor, p.loop,
            extra, info, self.ctx, files,
        )  # fmt: skip


def pick_backend(
    ctx: DistContext | None, *, optim: OptimConfig, train: TrainConfig, seed: int
) -> LocalBackend | DistributedBackend:
    """The one choice: distributed for any torchrun launch (several ranks, or a parallel mode
    on one), local otherwise. `optim`, `train`, `seed`: what a restore needs of this run's
    config (the optimizer's parameter order, the global batch, fresh RNG streams)."""
    ctx = ctx if ctx is not None else DistContext()
    distributed = ctx.world_size > 1 or ctx.mode != "none"
    cls = DistributedBackend if distributed else LocalBackend
    return cls(ctx, optim=optim, train=train, seed=seed)
