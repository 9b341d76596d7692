"""torch.distributed: process-group setup, DDP / FSDP2 / ZeRO-1 wrapping, and the few collectives
the loop needs. One process (`parallel.mode none`) is a no-op everywhere.

Launch several processes with torchrun; each reads RANK / WORLD_SIZE / LOCAL_RANK from its
environment (torchrun sets them). The global batch of a step is
    micro_batch x grad_accum x world_size   sequences
(`train.grad_accum` is per process), and data.BatchLoader splits the same global batch whatever
the world size, so 1 process x accum 4 == 2 processes x accum 2 == 4 x 1 up to float rounding.

What each mode keeps on every rank (world size W):
    ddp    full weights, full gradients, full optimizer state; gradients all-reduced
    zero1  DDP + the optimizer state sharded: each rank updates 1/W of the parameters and
           broadcasts them (torch.distributed.optim.ZeroRedundancyOptimizer)
    fsdp   weights, gradients and optimizer state all sharded 1/W (FSDP2 `fully_shard`); a
           block's weights are all-gathered just before it runs and freed after
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stalwart.config import ParallelConfig
from stalwart.errors import UserError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"
    local_world_size: int = 1
    backend: str = ""  # "" = no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return bool(self.backend)


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
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process, by local rank
    return device


def init(cfg: ParallelConfig, device_name: str) -> DistContext:
    """Join the process group that torchrun set up (or stay a single process)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    mode = resolve_mode(cfg.mode, world)
    if mode == "none":
        if world > 1:
            raise UserError(
                f"WORLD_SIZE={world} (launched by torchrun) but --parallel.mode is none: "
                "use --parallel.mode ddp, fsdp or zero1 (or auto), or launch a single process"
            )
        return DistContext(device=pick_device(device_name))
    missing = [v for v in _TORCHRUN_VARS if v not in env]
    if missing:
        raise UserError(
            f"--parallel.mode {mode} needs a torchrun launch ({', '.join(missing)} not set): "
            f"run `torchrun --nproc_per_node=N -m stalwart train ... --parallel.mode {mode}`"
            ", or use --parallel.mode none for one process"
        )
    if cfg.mode == "auto" and int(env.get("RANK", "0")) == 0:
        print(
            f"parallel: WORLD_SIZE={world}, so --parallel.mode auto trains data parallel with "
            "DDP (every rank a full replica; fsdp or zero1 shard the state)",
            file=sys.stderr,
            flush=True,
        )
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    device = pick_device(device_name, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("--parallel.backend nccl needs CUDA devices: use gloo on CPU (or auto)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # a collective that waits longer than this fails instead of hanging forever: a dead
        # peer then ends the job, and torchrun --max-restarts can restart the group
        timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
            store=_restart_safe_store(timeout),
            rank=rank,
            world_size=world,
        )
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    return DistContext(rank, world, local_rank, device, mode, local_world, backend)


def resolve_mode(mode: str, world_size: int) -> str:
    """`auto`: DDP when torchrun started several processes, one plain process otherwise."""
    if mode != "auto":
        return mode
    return "ddp" if world_size > 1 else "none"


def _restart_safe_store(timeout: datetime.timedelta):
    """torchrun shares its rendezvous store with the workers and keeps it across restarts, so
    after a restart the keys of the failed attempt (every rank's old gloo address, NCCL's old
    unique id) are still there and the new group connects to dead ports (pytorch#135712).
    On one node every worker has the same restart count: a key prefix per attempt keeps the
    attempts apart. Several nodes count restarts separately; there, launch torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/distributed.md) and this returns None."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # None: init_process_group's own env:// rendezvous
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        if int(env["RANK"]) == 0:
            print(
                "warning: torchrun --max-restarts on several nodes: set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every torchrun, or a restarted group "
                "may try to reach the failed attempt's ports (pytorch#135712)",
                flush=True,
            )
        return None
    store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"stalwart/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)


def wrap_model(
    model: torch.nn.Module,
    cfg: ParallelConfig,
    ctx: DistContext,
    *,
    seed: int,
    compute_dtype: torch.dtype,
) -> torch.nn.Module:
    """DDP (ddp, zero1) or FSDP2 (fsdp, in place: `model`'s parameters become DTensor shards).

    seed: the run's seed; compute_dtype: the resolved precision's dtype (FSDP all-gathers and
    computes in it; float32: no mixed-precision policy).

    Every rank built the same weights from the same seed; after wrapping, each rank's torch RNG
    is re-seeded with its rank, so dropout masks differ between ranks (the same mask on every
    rank's different data would correlate the noise)."""
    if ctx.world_size > 1:
        torch.manual_seed(seed + 1_000_003 * ctx.rank)
    if ctx.mode in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # DDP also broadcasts rank 0's weights once, so replicas start identical
        return DDP(
            model,
            device_ids=ids,
            bucket_cap_mb=cfg.bucket_mb,
            # reduced gradients stay in the all-reduce buckets (p.grad is a view), no copy back.
            # The peak is unchanged: with zero_grad(set_to_none) backward still makes fresh
            # gradients before they land in the buckets (see BENCHMARKS.md, Distributed)
            gradient_as_bucket_view=True,
        )
    if ctx.mode == "fsdp":
        _fully_shard(model, cfg, ctx, compute_dtype)
    return model


def _mixed_precision(compute_dtype: torch.dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    # all-gather and compute in 16 bits (half the traffic), but reduce gradients in fp32: a sum
    # over many ranks in bf16 loses the low bits of every small gradient
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def _fully_shard(
    model: torch.nn.Module, cfg: ParallelConfig, ctx: DistContext, compute_dtype: torch.dtype
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mp = _mixed_precision(compute_dtype)
    reshard = cfg.reshard_after_forward
    # one FSDP unit per block: only one block's full weights exist at a time
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    # the root holds the rest: wte, wpe, ln_f and lm_head, which *is* wte (tied) and so must
    # stay in the same unit. Not resharded after forward: backward starts with lm_head anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def _rebuild(opt: torch.optim.Optimizer, **overrides):
    """The optimizer's class, groups and hyperparameters, for building a variant of it."""
    cls = type(opt)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
    kwargs.update(overrides)
    groups = [
        {"params": g["params"], **{k: v for k, v in g.items() if k in accepted}}
        for g in opt.param_groups
    ]
    return cls, groups, kwargs


def wrap_optimizer(opt, cfg: ParallelConfig, ctx: DistContext, fp16: bool = False):
    """zero1: the same optimizer (class, decay groups, hyperparameters), its state sharded."""
    if ctx.mode == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if not isinstance(opt, torch.optim.Optimizer):
            raise UserError(
                "--parallel.mode zero1 needs a torch.optim optimizer: --optim.impl torch"
            )
        cls, groups, kwargs = _rebuild(opt)
        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)
    if ctx.mode == "fsdp" and fp16 and opt.defaults.get("fused"):
        # torch's fused Adam kernels trip over DTensor step counters when the GradScaler
        # hands them found_inf; the foreach implementation computes the same update
        cls, groups, kwargs = _rebuild(opt, fused=None, foreach=True)
        return cls(groups, **kwargs)
    return opt


def wrap_scaler(scaler: torch.amp.GradScaler, ctx: DistContext) -> torch.amp.GradScaler:
    """fp16 under FSDP: each rank sees only its gradient shard, so an overflow found on one rank
    must be all-reduced or ranks would disagree about skipping the step (ShardedGradScaler)."""
    if ctx.mode != "fsdp" or not scaler.is_enabled():
        return scaler
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(ctx.device.type)


def no_sync_unless(model: torch.nn.Module, ctx: DistContext, last: bool):
    """DDP's no_sync() on all but the last micro-batch (gradients all-reduced once per step).

    FSDP has no no_sync here on purpose: deferring its reduce-scatter would keep full-size
    gradients on every rank between micro-batches, undoing the memory it saves."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def mean_across_ranks_tensor(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world_size == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world_size


def clip_grad_norm(model: torch.nn.Module, max_norm: float, ctx: DistContext) -> torch.Tensor:
    """Clip the global grad norm to max_norm; return the norm *before* clipping.

    DDP / ZeRO-1: every rank holds the full, already all-reduced gradients, so the local norm
    is the global one. FSDP: gradients are DTensor shards; torch's clip_grad_norm_ reduces the
    per-shard norms across ranks and returns a replicated DTensor of the full norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def agree_on_step(
    loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool, ctx: DistContext
) -> tuple[float, float, bool]:
    """The step's one host sync: (loss, grad norm, stop?) as every rank must see them.

    The health verdict and the decision to stop must be identical on every rank, or one rank
    would skip a step (or leave the loop) that the others take, and the replicas would drift
    apart or deadlock in the next collective. One all-reduce carries rank 0's loss and norm
    (the others add exact zeros, so the values are bit-for-bit rank 0's), whether any rank saw
    a non-finite loss or norm, and whether any rank was asked to stop (SIGTERM)."""
    if ctx.world_size == 1:
        loss_f, norm_f = torch.stack([loss.float(), grad_norm.float()]).tolist()
        return loss_f, norm_f, stop
    values = torch.stack([loss.float(), grad_norm.float()])
    if not ctx.is_main:
        values = torch.zeros_like(values)
    flags = torch.stack(
        [
            (~torch.isfinite(loss.float())).float(),
            (~torch.isfinite(grad_norm.float())).float(),
            torch.tensor(float(stop), device=values.device),
        ]
    )
    v = torch.cat([values, flags])
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    loss_f, norm_f, bad_loss, bad_norm, stops = v.tolist()  # host sync: once per step
    if bad_loss and loss_f == loss_f and abs(loss_f) != float("inf"):
        loss_f = float("nan")  # another rank's loss was not finite
    if bad_norm and norm_f == norm_f and abs(norm_f) != float("inf"):
        norm_f = float("nan")
    return loss_f, norm_f, stops > 0


def eval_batches_total(n: int, ctx: DistContext) -> int:
    """Held-out micro-batches, rounded up to a multiple of the world size: every rank must run
    the same number of forwards (FSDP all-gathers inside each) and average the same count."""
    return -(-n // ctx.world_size) * ctx.world_size


def devices_in_use(ctx: DistContext) -> int:
    """How many times the per-process peak the job's MFU divides by: every rank brings its own
    (its GPU; on CPU, the calibrated peak of one process at its thread count)."""
    return ctx.world_size


def local_model(model: torch.nn.Module, build, ctx: DistContext):
    """An ordinary, unsharded copy of an FSDP model on rank 0 (None elsewhere) for sampling
    after the run; other modes return the model itself."""
    if ctx.mode != "fsdp":
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not ctx.is_main:
        return None
    plain = build()
    plain.load_state_dict(full)
    return plain


def sum_across_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The element-wise sum of `t` over every rank, in one all-reduce (CPU tensors travel on the
    run's device: NCCL takes no CPU tensors). One process: `t` itself."""
    if ctx.world_size == 1:
        return t
    t = t.detach().to(ctx.device, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is True on any: a decision every rank must take alike
    (a collective on some ranks only would hang), from inputs that differ between ranks (their
    clocks). One small all-reduce; one process: `flag` itself."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    """Every rank waits here until all have arrived (one process: returns at once)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group together: a rank that tore its group down while a peer was
    still writing the last checkpoint could abort in gloo's teardown ('terminate called
    without an active exception', exit -6) and fail the whole torchrun job."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
