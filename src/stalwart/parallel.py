"""torch.distributed: process-group setup and model wrapping (one process: a no-op)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from stalwart.config import ParallelConfig
from stalwart.errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"--run.device {name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--run.device cuda: no CUDA device is available; use cpu or auto")
    return device


def init(cfg: ParallelConfig, device_name: str) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.mode != "none" or world > 1:
        raise UserError(f"--parallel.mode {cfg.mode} is not available yet: use none")
    return DistContext(device=pick_device(device_name))


def no_sync_unless(model: torch.nn.Module, ctx: DistContext, last: bool):
    """DDP's no_sync() on all but the last micro-batch (gradients all-reduced once per step)."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def mean_across_ranks_tensor(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world_size == 1:
        return t
    t = t.detach().clone()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t / ctx.world_size


def clip_grad_norm(model: torch.nn.Module, max_norm: float, ctx: DistContext) -> torch.Tensor:
    """Clip the global grad norm to max_norm; return the norm *before* clipping."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def shutdown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_model(model: torch.nn.Module, cfg: ParallelConfig, ctx: DistContext) -> torch.nn.Module:
    return model
