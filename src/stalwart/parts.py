"""How each part of a run is built from the config: one plain function per part, each reading
only the slices it needs. The Trainer (trainer.py) calls them in order and holds what they build.
"""

from __future__ import annotations

from pathlib import Path

from stalwart import faults, parallel
from stalwart.checkpoint.backend import pick_backend
from stalwart.checkpoint.resumer import Resumer
from stalwart.checkpoint.saver import CheckpointSaver, tokenizer_files
from stalwart.checkpoint.state import TrainParts
from stalwart.config import Config, to_dict, with_overrides
from stalwart.data.loader import BatchLoader, eval_batches
from stalwart.errors import UserError
from stalwart.hardware import describe_peak
from stalwart.memory.budget import auto_micro_batch, check_fits
from stalwart.memory.planner import StepSpec, zero_stage
from stalwart.model.gpt import flops_per_token, hardware_flops_per_token


def resolve_vocab(configured: int, meta: dict) -> int:
    vocab = configured or int(meta["vocab_size"])
    if vocab < meta["vocab_size"]:
        raise UserError(
            f"--model.vocab_size {vocab} is smaller than the dataset's vocabulary "
            f"({meta['vocab_size']}): leave it at 0 to take the dataset's"
        )
    return vocab


def with_vocab(cfg: Config, vocab: int) -> Config:
    if cfg.model.vocab_size == vocab:
        return cfg
    return with_overrides(cfg, {"model.vocab_size": vocab})


def resolve_micro_batch(cfg: Config, ctx) -> int:
    step = StepSpec(
        cfg.model,
        cfg.optim,
        vocab_size=cfg.model.vocab_size,
        precision=cfg.train.precision,
        device_type=ctx.device.type,
        grad_accum=cfg.train.grad_accum,
        world_size=ctx.world_size,
        zero=zero_stage(ctx.mode),
    )
    if cfg.train.micro_batch == "auto":
        return auto_micro_batch(step, ctx.device)
    check_fits(step, int(cfg.train.micro_batch), ctx.device)  # refuse before allocating anything
    return int(cfg.train.micro_batch)


def build_batches(cfg: Config, data, micro: int, ctx) -> tuple[BatchLoader, list, list]:
    """This rank's training loader, its share of the held-out batches, and the continuity
    probe's batch (the same on every rank, so the probe does not depend on the world size)."""
    block, seed = cfg.model.block_size, cfg.run.seed
    loader = BatchLoader(
        data.train, block, micro, cfg.train.grad_accum, seed, ctx.rank, ctx.world_size, ctx.device,
        sampling=cfg.data.sampling,
        prefetch=cfg.data.prefetch == "on" or (cfg.data.prefetch == "auto" and ctx.device.type == "cuda"),
    )  # fmt: skip
    n_val = parallel.eval_batches_total(cfg.train.eval_batches, ctx)
    val = eval_batches(data.val, block, micro, n_val, seed, ctx.rank, ctx.world_size)
    return loader, val, eval_batches(data.val, block, micro, 1, seed)


def mfu_terms(cfg: Config, vocab: int, tokens_per_step: int, prec, ctx):
    """FLOPs per step for MFU (model) and HFU (with recomputation), and the peak of every
    device the job uses (None, with a note, where the device's peak is unknown)."""
    flops = flops_per_token(cfg.model, vocab) * tokens_per_step
    hw_flops = hardware_flops_per_token(cfg.model, vocab) * tokens_per_step
    peak, note = describe_peak(ctx.device, prec.name, cfg.train.peak_flops)
    if peak:
        peak *= parallel.devices_in_use(ctx)  # MFU of the whole job: every rank's device
    return flops, hw_flops, peak, note


def build_checkpoints(
    cfg: Config, parts: TrainParts, ctx, *, data_meta: dict, probe, precision: str, say
) -> tuple[Resumer, CheckpointSaver]:
    """What resumes a run and what saves it, over one backend (one process, or every rank of a
    distributed run: chosen once, for saves and restores alike)."""
    run_dir = Path(cfg.run.dir)
    backend = pick_backend(ctx, optim=cfg.optim, train=cfg.train, seed=cfg.run.seed)
    config = to_dict(cfg)  # stored in every checkpoint; a resume checks what changed
    common = {"data_meta": data_meta, "probe": probe, "precision": precision, "say": say}
    resumer = Resumer(
        run_dir, parts, backend, config=config, mode=cfg.run.resume, threads=cfg.run.threads,
        check=cfg.ckpt.resume_check, **common,
    )  # fmt: skip
    pause_s = cfg.debug.pause_in_save_s  # fault injection: a window in a half-written save
    saver = CheckpointSaver(
        cfg.ckpt, run_dir, parts, backend, config=config,
        extra_files=tokenizer_files(cfg.data.dir),
        pause=lambda tmp: faults.pause(pause_s, f"the save of {tmp.name}"), **common,
    )  # fmt: skip
    return resumer, saver
