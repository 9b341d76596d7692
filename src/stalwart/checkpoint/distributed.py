"""Checkpoints of a distributed run, and resuming any checkpoint under any parallel mode.

One layout for every mode (format.py's, plus `dcp/` under FSDP):
    model.safetensors   the full weights (FSDP: gathered to rank 0), so sample/export just work
    state.safetensors   every other tensor; under FSDP the optimizer moments are in dcp/ instead
    state.json          the rest, with `dist` (mode, world size, global batch) and `rng_rank{R}`:
                        every rank's RNG state (`rng` stays rank 0's, as in a 1-process run)
    dcp/                FSDP only: torch.distributed.checkpoint shards of the weights and the
                        optimizer moments (`__R_0.distcp` per rank, `.metadata`), tensors only
    manifest.json       sha256 and size of every file, dcp/ included; written last, by rank 0
DDP writes from rank 0 only (every rank holds the same state); ZeRO-1 first consolidates the
optimizer state on rank 0. FSDP: all ranks write their shards into rank 0's staging directory,
then rank 0 writes the rest and commits it (manifest, rename) exactly as a 1-process save, and
every rank waits at a barrier until the checkpoint is complete.

Resuming reshards: DCP loads the saved shards into whatever layout this run has (FSDP on W ranks,
or one process), and a full checkpoint is sharded on load. The loader state is one integer, the
same on every rank. What cannot be identical after a world-size change is said in the resume
record: the per-rank RNG streams (they only drive dropout), and the data order if
micro_batch x grad_accum x world_size changed.

Safety: DCP's `.metadata` is a pickle; safe_dcp.py reads it with an unpickler that admits only
DCP's own metadata classes, and refuses shards that hold anything but tensors.

torch.distributed.checkpoint is imported inside the functions that use it: it takes ~0.4 s to
import, and most runs (one process, DDP) never do.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stalwart import parallel
from stalwart.checkpoint import format as ck
from stalwart.checkpoint import state as trainstate
from stalwart.checkpoint.safe_dcp import load_shards
from stalwart.config import OptimConfig, TrainConfig
from stalwart.optim.build import build_optimizer, param_groups

SHARDS = "dcp"


# ----------------------------------------------------------------------------------------------
# Saving


def save(
    final, config, model, opt, scaler, loader, monitor, loop, extra, info, ctx, extra_files=None
):
    """Write one checkpoint of a distributed run (call on every rank). `config`: the run's
    config as a dict; `model` is the unwrapped module (FSDP: the sharded one); `extra` goes
    into the state, `info` into the manifest."""
    final = Path(final)
    extra = {
        **extra,
        "dist": {
            "mode": ctx.mode,
            "world_size": ctx.world_size,
            "global_batch": loader.global_batch,
        },
        **_gather_rng(ctx),
    }
    if ctx.mode == "fsdp":
        _save_sharded(
            final, config, model, opt, scaler, loader, monitor, loop, extra, info, ctx, extra_files
        )
    else:
        if ctx.mode == "zero1":
            opt.consolidate_state_dict(to=0)  # collective: the whole optimizer state on rank 0
        if ctx.is_main:
            model_state, state = trainstate.capture(
                config, model, opt, scaler, loader, monitor, loop, extra
            )
            ck.write_checkpoint(final, model_state, state, info, extra_files)
    # nobody moves on (or rotates, or is killed) before the checkpoint is whole
    parallel.barrier(ctx)
    return final


def _gather_rng(ctx) -> dict:
    """Every rank's RNG state, on rank 0, as `rng_rank{R}` entries."""
    mine = trainstate.capture_rng()
    if ctx.world_size == 1 or not dist.is_initialized():
        return {"rng_rank0": mine}
    everyone = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(mine, everyone, dst=0)
    return {f"rng_rank{r}": s for r, s in enumerate(everyone or [])}


def _split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """FQN-keyed optimizer state -> (tensors for DCP, everything else for JSON)."""
    tensors, rest = {}, {}
    for fqn, entries in state.items():
        for k, v in entries.items():
            (tensors if isinstance(v, torch.Tensor) else rest).setdefault(fqn, {})[k] = v
    return tensors, rest


def _save_sharded(
    final, config, model, opt, scaler, loader, monitor, loop, extra, info, ctx, files
):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # collective: the full weights on rank 0 (CPU), for model.safetensors
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    osd = get_optimizer_state_dict(model, opt)  # this rank's shards, keyed by parameter name
    moments, others = _split_optimizer_state(osd["state"])
    shards = {"model": get_model_state_dict(model), "optim": moments}

    def write_shards(tmp: Path | None) -> None:
        box = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(box, src=0)  # rank 0's staging directory, to everyone
        writer = dcp.FileSystemWriter(
            Path(box[0]) / SHARDS, single_file_per_rank=True, sync_files=True, thread_count=1
        )
        # returns on rank 0 only after every rank's shard file is written and its metadata saved
        dcp.save(shards, storage_writer=writer)

    if not ctx.is_main:
        write_shards(None)
        return
    _, state = trainstate.capture(config, model, opt, scaler, loader, monitor, loop, extra)
    state["optimizer"] = {"param_groups": osd["param_groups"], "state": others, "sharded": True}
    snap = ck.snapshot(full, state)
    ck.write_snapshot(final, snap, info, files, before_commit=write_shards)


# ----------------------------------------------------------------------------------------------
# Loading


def _param_names(optim: OptimConfig, model) -> list[str]:
    """Parameter names in the optimizer's order (index i of an id-keyed state dict)."""
    return [n for g in param_groups(model, optim.weight_decay) for n in g["names"]]


def _to_fqn(osd: dict, names: list[str]) -> dict:
    return {
        "state": {names[i]: s for i, s in osd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]
        ],
    }


def _load_optimizer(path, saved, model, opt, optim: OptimConfig, ctx) -> dict:
    """This run's optimizer state in its own format (what opt.load_state_dict takes)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if not saved.get("sharded"):  # a full, index-keyed optimizer state (1 process, DDP, ZeRO-1)
        if ctx.mode != "fsdp":
            return saved  # ZeroRedundancyOptimizer.load_state_dict takes the full one too
        full = _to_fqn(saved, _param_names(optim, model))
        set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
        return opt.state_dict()
    target = opt
    if ctx.mode == "zero1":  # a plain optimizer to load into; its full state feeds ZeRO
        target = build_optimizer(optim, model)
    osd = get_optimizer_state_dict(model, target)
    moments, _ = _split_optimizer_state(osd["state"])
    load_shards({"optim": moments}, Path(path) / SHARDS)
    for fqn, entries in saved["state"].items():
        osd["state"].setdefault(fqn, {}).update(entries)
    osd["param_groups"] = saved["param_groups"]
    set_optimizer_state_dict(model, target, osd)
    return target.state_dict()


def _load_model(path, model_state, model, ctx) -> None:
    if ctx.mode != "fsdp":
        ck.load_model_state(model, model_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    if (Path(path) / SHARDS).is_dir():  # shard to shard: every rank reads only what it holds
        msd = get_model_state_dict(model)
        load_shards({"model": msd}, Path(path) / SHARDS)
        set_model_state_dict(model, msd)
    else:  # every rank has the full weights (model.safetensors): keep its slice
        opts = StateDictOptions(full_state_dict=True, strict=False)  # lm_head is wte (tied)
        set_model_state_dict(model, model_state, options=opts)


def _own_rng(state: dict, seed: int, ctx) -> bool:
    """Put this rank's RNG state into state["rng"]; False if the checkpoint has none for it."""
    key = f"rng_rank{ctx.rank}"
    if key in state:
        state["rng"] = state[key]
        return True
    if ctx.rank == 0:
        return True  # "rng" is rank 0's
    # a rank the saved run did not have: a fresh stream of its own, reproducible from
    # (seed, rank, step)
    derived = int(
        np.random.SeedSequence([seed, ctx.rank, state["loop"]["step"]]).generate_state(1)[0]
    )
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    state["rng"] = trainstate.capture_rng()
    return False


def restore(
    path,
    model_state: dict,
    state: dict,
    model,
    opt,
    ctx,
    *,
    optim: OptimConfig,
    train: TrainConfig,
    seed: int,
) -> list[str]:
    """Load the weights into `model` (unwrapped; FSDP: sharded) and make `state` ready for
    state.restore on this rank: the optimizer state in this run's own layout, this rank's
    RNG. Every rank calls it (one process too: any layout loads). `optim`, `train`, `seed`:
    this run's (parameter order, the global batch, a fresh RNG stream for a new rank).
    Returns what differs from the saved run, for the resume record."""
    _load_model(path, model_state, model, ctx)
    state["optimizer"] = _load_optimizer(path, state["optimizer"], model, opt, optim, ctx)
    _own_rng(state, seed, ctx)
    return _resume_notes(state.get("dist"), state["config"], train, ctx)


def _resume_notes(saved: dict | None, saved_cfg: dict, train: TrainConfig, ctx) -> list[str]:
    saved = saved or {"mode": "none", "world_size": 1}
    old_w, new_w = saved["world_size"], ctx.world_size
    notes = []
    if saved["mode"] != ctx.mode or old_w != new_w:
        notes.append(
            f"parallel: {saved['mode']} on {old_w} rank(s) -> {ctx.mode} on {new_w}: weights "
            "and optimizer state resharded exactly"
        )
    if old_w != new_w:
        fate = (
            f"ranks {old_w}..{new_w - 1} start fresh streams"
            if new_w > old_w
            else f"the streams of ranks {new_w}..{old_w - 1} end"
        )
        notes.append(
            f"RNG: ranks 0..{min(old_w, new_w) - 1} continue their own streams, {fate}: "
            "dropout masks cannot match a run that kept its world size (nothing else in "
            "training draws random numbers)"
        )
        old_batch = saved.get("global_batch")
        if old_batch is None:
            t = saved_cfg["train"]
            if isinstance(t["micro_batch"], int):
                old_batch = t["micro_batch"] * t["grad_accum"] * old_w
        new_batch = _global_batch(train, ctx)
        if old_batch is not None and new_batch is not None and old_batch != new_batch:
            notes.append(
                f"data order: the global batch changed from {old_batch} to {new_batch} "
                "sequences per step (micro_batch x grad_accum x world_size), so the steps "
                "from here read other windows than the saved run would have"
            )
        else:
            notes.append(
                "data order: unchanged (each step reads the same global batch whatever the "
                "world size; only its split into micro-batches, and so float rounding, differs)"
            )
    return notes


def _global_batch(train: TrainConfig, ctx) -> int | None:
    mb = train.micro_batch
    return mb * train.grad_accum * ctx.world_size if isinstance(mb, int) else None
