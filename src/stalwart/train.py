"""THE loop: `train(cfg)`. Setup, build, resume, then the seven steps of a training step.

Read it top to bottom; the details live in the components it calls.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from stalwart import parallel
from stalwart.checkpoint import format as ck
from stalwart.checkpoint import state as trainstate
from stalwart.checkpoint.manager import TrainParts, build_checkpoint_manager
from stalwart.checkpoint.state import LoopState
from stalwart.config import Config, to_toml
from stalwart.data.loader import BatchLoader, eval_batches, open_dataset
from stalwart.errors import UserError
from stalwart.hardware import describe_peak
from stalwart.health.monitor import build_monitor
from stalwart.health.recovery import Recovery
from stalwart.logs.loggers import attach_loggers
from stalwart.logs.metrics import MetricsLog, Progress, StepTimer, throughput_record
from stalwart.memory.planner import memory_record
from stalwart.model.gpt import build_model, flops_per_token, hardware_flops_per_token
from stalwart.optim.build import build_optimizer
from stalwart.optim.schedule import schedule_lr
from stalwart.precision import build_precision


@dataclass
class RunResult:
    run_dir: Path
    step: int
    val_loss: float | None
    best_val: float
    model: torch.nn.Module
    data_meta: dict
    stopped_early: bool = False
    stop_signal: int | None = None  # SIGTERM/SIGINT that stopped the run (after a checkpoint)
    is_main: bool = True  # rank 0 (the one that reports) of a distributed run
    health_stop: dict | None = None  # the critical diagnosis with which the doctor stopped it


def forward_backward(model, micro_batches, prec, grad_accum: int, ctx) -> torch.Tensor:
    """Step 3: accumulate gradients over the micro-batches; return the mean loss (on device)."""
    loss_sum = torch.zeros((), device=prec.device)
    for i, (x, y) in enumerate(micro_batches):
        # DDP: all-reduce gradients only after the last micro-batch, not after every one
        with parallel.no_sync_unless(model, ctx, last=i == len(micro_batches) - 1):
            with prec.autocast():
                # [1]: let the logits go now; kept through backward they hold B x T x vocab
                loss = model(x, y)[1]
            loss_sum += loss.detach()
            # Divide so the *sum* of micro-batch gradients is the *mean* gradient of the batch;
            # without it the effective LR is grad_accum times too large (the lesson's subtlety).
            prec.scaler.scale(loss / grad_accum).backward()
    return parallel.mean_across_ranks_tensor(loss_sum / len(micro_batches), ctx)


@torch.no_grad()
def evaluate(model, batches, prec, ctx) -> float:
    """Mean held-out loss over the fixed eval batches (all ranks)."""
    model.eval()
    total = torch.zeros((), device=prec.device)
    for x, y in batches:
        with prec.autocast():
            _, loss = model(x.to(prec.device), y.to(prec.device))
        total += loss.float()
    model.train()
    return float(parallel.mean_across_ranks_tensor(total / max(len(batches), 1), ctx))


class StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C): finish the current step, save, exit cleanly."""

    def __init__(self):
        self.signum: int | None = None

    @contextmanager
    def installed(self):
        previous = {}

        def handler(signum, frame):
            if self.signum is not None:  # a second signal: die now (checkpoints are atomic)
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            self.signum = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


def prepare_run_dir(cfg: Config, is_main: bool) -> Path:
    run_dir = Path(cfg.run.dir)
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: Config, progress: bool = True, hooks: dict | None = None) -> RunResult:
    hooks = hooks or {}
    # ---- Setup: device, seeds, threads -----------------------------------------------------
    ctx = parallel.init(cfg.parallel, cfg.run.device)
    device = ctx.device
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    trainstate.seed_everything(cfg.run.seed)  # before anything random is built
    run_dir = prepare_run_dir(cfg, ctx.is_main)

    # ---- Build: data, model, optimizer, precision ------------------------------------------
    data = open_dataset(cfg.data.dir)
    vocab = cfg.model.vocab_size or int(data.meta["vocab_size"])
    if vocab < data.meta["vocab_size"]:
        raise UserError(
            f"--model.vocab_size {vocab} is smaller than the dataset's vocabulary "
            f"({data.meta['vocab_size']}): leave it at 0 to take the dataset's"
        )
    cfg.model.vocab_size = vocab
    micro = _micro_batch(cfg, ctx)
    raw_model = build_model(cfg.model, vocab).to(device)
    raw_model.set_fused_gelu(cfg.train.fused_gelu)
    # init_from starts a run; a run that already has checkpoints resumes from its own weights
    # (the source may be gone by then)
    if cfg.run.init_from and not ck.step_dirs(run_dir / "checkpoints"):
        from stalwart.export import load_init_weights

        load_init_weights(raw_model, cfg.run.init_from)
    prec = build_precision(cfg.train.precision, device, cfg.train.grad_scaler)
    # data parallelism. FSDP shards raw_model's parameters in place, so the optimizer is built
    # after it, over the shards; ZeRO-1 shards the optimizer's state instead
    model = parallel.wrap_model(raw_model, cfg, ctx)
    opt = parallel.wrap_optimizer(
        build_optimizer(cfg.optim, raw_model), cfg.parallel, ctx, fp16=prec.name == "fp16"
    )
    prec.scaler = parallel.wrap_scaler(prec.scaler, ctx)
    if cfg.train.compile:
        model = torch.compile(model)
    loader, val_batches, probe_batch = _batches(cfg, data, micro, ctx)
    monitor = build_monitor(cfg.health, cfg.optim.grad_clip)
    loop = LoopState()
    display = Progress(cfg.train.max_steps, enabled=progress and ctx.is_main)
    say = display.message

    # ---- Resume: the newest valid checkpoint, every piece of state, self-checked ------------
    ckpts = build_checkpoint_manager(
        cfg,
        run_dir,
        TrainParts(raw_model, opt, prec.scaler, loader, monitor, loop),
        is_main=ctx.is_main,
        data_meta=data.meta,
        # the continuity probe: a fixed held-out batch, eval mode, no grad, deterministic (the
        # same batch on every rank, so that it does not depend on the world size)
        probe=lambda: evaluate(model, probe_batch, prec, ctx),
        precision=prec.name,
        say=say,
        ctx=ctx,  # distributed runs save and restore through dist_checkpoint (any layout)
    )
    # restores everything, checks the probe loss, drops the records of the replayed steps
    resume_from = ckpts.resume()
    if resume_from is not None and cfg.debug.drop_optimizer_state_on_resume:
        opt.state.clear()  # fault injection: a resume that forgets Adam's moments (playbook)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=ctx.is_main)
    log = attach_loggers(log, cfg, run_dir, ctx.is_main)  # --train.loggers: TensorBoard, W&B
    ckpts.attach_log(log)  # the resume records, then every checkpoint event
    # the doctor's hands: skip, roll back (through the checkpoint manager), stop
    medic = Recovery(
        cfg.health, monitor, loader, loop, raw_model, vocab, log, say, ckpts.restore_latest
    )
    if ctx.is_main:
        (run_dir / "config.toml").write_text(to_toml(cfg))
    display._start_step = loop.step

    tokens_per_step = loader.global_batch * cfg.model.block_size
    flops_per_step, hw_flops_per_step, peak, peak_note = _mfu_terms(
        cfg, vocab, tokens_per_step, prec, ctx
    )
    if peak is None:
        say(f"MFU: n/a ({peak_note})")
    timer = StepTimer(device)  # tokens/s and where the step time goes, per log interval
    val_loss = None
    stop = StopRequest()
    stopping = False  # agreed by every rank at the step's host sync

    # ---- The step loop ------------------------------------------------------------------------
    with stop.installed():
        while loop.step < cfg.train.max_steps and not stopping:
            s = loop.step
            # 1. the LR of this step, written into every param group (a pure function of s)
            lr = schedule_lr(cfg.schedule, cfg.optim, s, cfg.train.max_steps)
            lr *= monitor.lr_scale(s)  # health.lr_backoff for a while after a rollback
            for g in opt.param_groups:
                g["lr"] = lr
            # 2. clear gradients (set_to_none: frees memory and skips a memset)
            opt.zero_grad(set_to_none=True)
            # 3. forward + backward over the micro-batches of this step's global batch
            timer.step_start()
            batches = loader.next()
            timer.lap("data_wait")
            if cfg.debug.repeat_batches:  # fault injection: a loader stuck on one batch
                loader.position -= 1
            if "before_backward" in hooks:
                hooks["before_backward"](s, batches)
            try:
                # debug.forget_accum_division: the lesson's bug, for the accumulation experiment
                accum = 1 if cfg.debug.forget_accum_division else cfg.train.grad_accum
                loss = forward_backward(model, batches, prec, accum, ctx)
            except (IndexError, RuntimeError):
                if not medic.explain_crash(s + 1, batches):  # token ids out of range: stop
                    raise
                break
            timer.lap("fwd_bwd")
            # keyed to the batch, not the step: a bad batch stays bad, and a rollback that skips
            # its data window never sees it again
            loss = _inject_faults(cfg, loader.position - 1, loss, raw_model, ctx.rank)
            # 4. fp16 only: unscale so the norm below is of the true gradients
            prec.scaler.unscale_(opt)
            # 5. clip; the returned norm is the PRE-clip norm, the health metric we log
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            grad_norm = parallel.clip_grad_norm(model, max_norm, ctx)
            # host sync (one per optimizer step, not per micro-batch): a non-finite step must be
            # stopped before it touches the weights and the optimizer's moments, on every rank
            # alike (one all-reduce: the same loss, norm and stop request everywhere)
            loss_f, norm_f, stopping = parallel.agree_on_step(
                loss, grad_norm, stop.signum is not None, ctx
            )
            verdict = monitor.check_step(s + 1, loss_f, norm_f, prec.scaler.is_enabled())
            action = medic.act(verdict, s + 1, batches)  # records and prints the diagnoses
            if action == "stop":  # the doctor gives up (critical diagnosis; exit code 3)
                break
            if action == "rolled_back":  # a good checkpoint is back: start the step over
                continue
            # 6. the update (GradScaler skips it by itself when fp16 gradients overflowed)
            if action == "apply":
                prec.scaler.step(opt)
            prec.scaler.update()
            timer.lap("optim")
            loop.step += 1
            loop.tokens += tokens_per_step

            # 7. log; evaluate, save at fixed intervals
            record = {
                "step": loop.step,
                "train_loss": loss_f,
                "lr": lr,
                "grad_norm": norm_f,
                "clipped": norm_f > max_norm,
                "tokens": loop.tokens,
            }
            if action != "apply":
                record["skipped"] = True
            last = loop.step == cfg.train.max_steps
            if loop.step % cfg.train.log_interval == 0 or last:
                timing = timer.read()  # CUDA: one sync per log interval, none per step
                record.update(
                    throughput_record(
                        timing, tokens_per_step, flops_per_step, hw_flops_per_step, peak
                    )
                )
                record.update(memory_record(device))  # peak since the last log interval
            evaluate_now = last or (
                cfg.train.eval_interval and loop.step % cfg.train.eval_interval == 0
            )
            if evaluate_now:
                _debug_pause(cfg.debug.pause_in_eval_s, f"evaluation at step {loop.step}")
                val_loss = evaluate(model, val_batches, prec, ctx)
                record["val_loss"] = val_loss
            medic.report(monitor.observe(record, loader.last_digest))  # the trend detectors
            if "tokens_per_sec" in record or evaluate_now:
                log.write(record)
                display.update(
                    loop.step,
                    loss_f,
                    record.get("tokens_per_sec", 0.0),
                    record.get("mfu"),
                    record.get("val_loss"),
                    record.get("data_wait_frac"),
                )
            if evaluate_now and val_loss < loop.best_val:
                loop.best_val = val_loss
                ckpts.request_best()  # best/ gets this step's state, saved just below
            # every ckpt.interval steps / interval_minutes, at the end, and on SIGTERM/SIGINT
            if ckpts.maybe_save(loop.step, force=last or stopping, val_loss=val_loss):
                timer.skip()  # saving is not training time
            if evaluate_now:
                timer.skip()  # nor is evaluation
            if "after_step" in hooks:
                hooks["after_step"](loop.step, record)

    ckpts.close()  # waits for an asynchronous save (and raises its error)
    health_stop = medic.finish()
    if stopping:
        say(
            f"stopped by signal {stop.signum} at step {loop.step}; checkpoint saved, resume with "
            "the same command"
        )
        log.write({"event": "stopped", "step": loop.step, "signal": stop.signum})
    display.close()
    log.close()
    # FSDP: an ordinary copy of the weights on rank 0, for sampling after the run
    final_model = parallel.local_model(raw_model, lambda: build_model(cfg.model, vocab), ctx)
    parallel.shutdown(ctx)
    return RunResult(
        run_dir,
        loop.step,
        val_loss,
        loop.best_val,
        final_model,
        data.meta,
        stopped_early=stopping,
        stop_signal=stop.signum if stopping else None,
        is_main=ctx.is_main,
        health_stop=health_stop,
    )


def _inject_faults(cfg: Config, batch: int, loss: torch.Tensor, model, rank: int = 0):
    """debug.inject_*: provoke the playbook's symptoms on purpose (tests, demos). The gradients
    are hit as well as the loss, as a bad batch or an overflow would. `batch` is the loader
    position of this step's batch (0-based; == step until a rollback skips data)."""
    factor = None
    if batch + 1 == cfg.debug.inject_nan_at_step:
        factor = float("nan")
    elif batch + 1 == cfg.debug.inject_spike_at_step:
        factor = 1e3
    if factor is None or cfg.debug.inject_rank not in (-1, rank):
        return loss
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)
    return loss * factor


def _debug_pause(seconds: float, where: str) -> None:
    """debug.pause_in_*_s (tests, demos only): a marked window in which to kill the process."""
    if seconds > 0:
        print(f"debug: pausing {seconds}s in {where}", file=sys.stderr, flush=True)
        time.sleep(seconds)


def _micro_batch(cfg: Config, ctx) -> int:
    if cfg.train.micro_batch == "auto":
        from stalwart.memory.planner import auto_micro_batch

        return auto_micro_batch(cfg, ctx)
    from stalwart.memory.planner import check_fits

    check_fits(cfg, int(cfg.train.micro_batch), ctx)  # refuse before allocating anything
    return int(cfg.train.micro_batch)


def _batches(cfg: Config, data, micro: int, ctx) -> tuple[BatchLoader, list, list]:
    """This rank's training loader, its share of the held-out batches, and the continuity
    probe's batch (the same on every rank, so the probe does not depend on the world size)."""
    block, seed = cfg.model.block_size, cfg.run.seed
    loader = BatchLoader(
        data.train,
        block,
        micro,
        cfg.train.grad_accum,
        seed,
        ctx.rank,
        ctx.world_size,
        ctx.device,
        cfg.debug.slow_data_ms,
    )
    n_val = parallel.eval_batches_total(cfg.train.eval_batches, ctx)
    val = eval_batches(data.val, block, micro, n_val, seed, ctx.rank, ctx.world_size)
    return loader, val, eval_batches(data.val, block, micro, 1, seed)


def _mfu_terms(cfg: Config, vocab: int, tokens_per_step: int, prec, ctx):
    """FLOPs per step for MFU (model) and HFU (with recomputation), and the peak of every
    device the job uses (None, with a note, where the device's peak is unknown)."""
    flops = flops_per_token(cfg.model, vocab) * tokens_per_step
    hw_flops = hardware_flops_per_token(cfg.model, vocab) * tokens_per_step
    peak, note = describe_peak(ctx.device, prec.name, cfg.train.peak_flops)
    if peak:
        peak *= parallel.devices_in_use(ctx)  # MFU of the whole job: every rank's device
    return flops, hw_flops, peak, note
