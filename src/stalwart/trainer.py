"""The Trainer: every part of a run, built once and reachable, and the seven steps that drive them.

    trainer = Trainer(cfg)        # build: data, model, optimizer, precision, parallel wrappers,
                                  # checkpoints, doctor; fault injection wraps parts here
    trainer.resume()              # newest valid checkpoint -> every piece of state; the records
    step = trainer.train_step()   # steps 1-6 of DESIGN.md, in the lesson's order
    trainer.end_of_step(step)     # step 7: log, evaluate, health, checkpoint
    result = trainer.finish()

`train(cfg)` in train.py is that story. Tests, `bench` and the experiments watch a run through
typed callbacks (`Callback`), which see the trainer's parts and never change the loop.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from stalwart import faults, parallel
from stalwart.checkpoint import format as ck
from stalwart.checkpoint.state import LoopState, TrainParts, seed_everything
from stalwart.config import Config, to_dict, to_toml
from stalwart.data.loader import open_dataset
from stalwart.eval.intask import Downstream
from stalwart.eval.loss import evaluate
from stalwart.export import load_init_weights
from stalwart.health.monitor import build_monitor
from stalwart.health.recovery import Recovery
from stalwart.logs.loggers import attach_loggers
from stalwart.logs.metrics import (
    MetricsLog,
    Progress,
    StepTimer,
    throughput_record,
    truncate_after,
)
from stalwart.memory.measure import memory_record
from stalwart.model.gpt import build_model
from stalwart.optim.build import build_optimizer
from stalwart.optim.schedule import schedule_lr
from stalwart.parts import (
    build_batches,
    build_checkpoints,
    mfu_terms,
    resolve_micro_batch,
    resolve_vocab,
    with_vocab,
)
from stalwart.precision import build_precision
from stalwart.rundir import RunDirLock
from stalwart.stop import StopRequest


@dataclass
class RunResult:
    run_dir: Path
    step: int
    val_loss: float | None
    best_val: float
    model: torch.nn.Module  # an ordinary (unwrapped, unsharded) copy on rank 0
    data_meta: dict
    stopped_early: bool = False
    stop_signal: int | None = None  # SIGTERM/SIGINT that stopped the run (after a checkpoint)
    is_main: bool = True  # rank 0 (the one that reports) of a distributed run
    health_stop: dict | None = None  # the critical diagnosis with which the doctor stopped it
    cfg: Config | None = None  # the config as resolved by the run (vocab_size filled in)


@dataclass
class Step:
    """What steps 1-6 did: the loop's next move ("apply" | "skip" | "rolled_back" | "stop")."""

    action: str
    lr: float = 0.0
    loss: float = math.nan
    grad_norm: float = math.nan


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


class Trainer:
    def __init__(self, cfg: Config, progress: bool = True, callbacks=()):
        self.callbacks = list(callbacks)
        # ---- set-up: device, threads, seeds (before anything random is built), run dir ----
        self.ctx = parallel.init(cfg.parallel, cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        self.run_dir = Path(cfg.run.dir)
        self.lock, lock_note = RunDirLock(self.run_dir), None
        if self.ctx.is_main:  # one live run per run dir: a second one is refused (exit 2)
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            lock_note = self.lock.acquire()
        try:
            self._build(cfg, progress, lock_note)
        except BaseException:  # a refused config, bad data, ...: the run dir is free again
            self.lock.release()
            raise

    def _build(self, cfg: Config, progress: bool, lock_note: str | None) -> None:
        # ---- build: data, model, optimizer, precision, parallel wrappers ----------------------
        self.data = open_dataset(cfg.data.dir)
        self.vocab = resolve_vocab(cfg.model.vocab_size, self.data.meta)
        # the resolved config (the dataset's vocabulary filled in) is what the run records; the
        # caller's config is never changed
        self.cfg = cfg = with_vocab(cfg, self.vocab)
        self.micro = resolve_micro_batch(cfg, self.ctx)
        self._build_model_and_optimizer(cfg)
        self.loader, self.val_batches, self.probe_batch = build_batches(
            cfg, self.data, self.micro, self.ctx
        )
        self.loader = faults.wrap_loader(self.loader, cfg.debug)
        self.forward_backward = faults.wrap_forward_backward(
            functools.partial(
                forward_backward,
                self.model,
                prec=self.prec,
                grad_accum=faults.accum_divisor(cfg.train.grad_accum, cfg.debug),
                ctx=self.ctx,
            ),
            cfg.debug,
            self.loader,
            self.raw_model,
            self.ctx.rank,
        )
        self.evaluate = faults.wrap_evaluate(
            lambda: evaluate(self.model, self.val_batches, self.prec, self.ctx),
            cfg.debug,
            lambda: self.loop.step,
        )
        # downstream tasks and samples (eval.tasks, train.sample_interval); FSDP forwards the
        # wrapped model (a collective), otherwise the plain module (no DDP hooks in eval)
        self.downstream = Downstream(
            cfg.eval, cfg.train, cfg.data.dir, self.data.meta, cfg.model.block_size, self.ctx,
            self.run_dir,
        )  # fmt: skip
        self.eval_model = self.model if self.ctx.mode == "fsdp" else self.raw_model
        # ---- the doctor, the loop's counters, the display, the checkpoints ---------------------
        self.monitor = build_monitor(cfg.health, cfg.optim.grad_clip)
        self.loop = LoopState()
        self.display = Progress(cfg.train.max_steps, enabled=progress and self.ctx.is_main)
        self.say = self.display.message
        if lock_note:
            self.say(lock_note)
        self._build_checkpoints(cfg)
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        self.tokens_per_step = self.loader.global_batch * cfg.model.block_size
        self.flops_per_step, self.hw_flops_per_step, self.peak, self.peak_note = mfu_terms(
            cfg, self.vocab, self.tokens_per_step, self.prec, self.ctx
        )
        self.timer = StepTimer(self.ctx.device)  # tokens/s and where the step time goes
        self.stop = StopRequest()
        self.stopping = False  # agreed by every rank at the step's host sync
        self.val_loss: float | None = None
        self.log = self.medic = None  # opened by resume(): the records continue after it

    def _build_model_and_optimizer(self, cfg: Config) -> None:
        device = self.ctx.device
        self.raw_model = build_model(cfg.model, self.vocab).to(device)
        self.raw_model.set_fused_gelu(cfg.train.fused_gelu)
        self.raw_model.set_cpu_kernels(cfg.train.cpu_kernels)
        # init_from starts a run; a run that already has checkpoints resumes from its own
        # weights (the source may be gone by then)
        if cfg.run.init_from and not ck.step_dirs(self.run_dir / "checkpoints"):
            load_init_weights(self.raw_model, cfg.run.init_from)
        self.prec = build_precision(cfg.train.precision, device, cfg.train.grad_scaler)
        # data parallelism. FSDP shards raw_model's parameters in place, so the optimizer is
        # built after it, over the shards; ZeRO-1 shards the optimizer's state instead
        self.model = parallel.wrap_model(
            self.raw_model,
            cfg.parallel,
            self.ctx,
            seed=cfg.run.seed,
            compute_dtype=self.prec.dtype,
        )
        self.optimizer = parallel.wrap_optimizer(
            build_optimizer(cfg.optim, self.raw_model),
            cfg.parallel,
            self.ctx,
            fp16=self.prec.name == "fp16",
        )
        self.prec.scaler = parallel.wrap_scaler(self.prec.scaler, self.ctx)
        if cfg.train.compile:
            self.model = torch.compile(self.model)

    def _build_checkpoints(self, cfg: Config) -> None:
        parts = TrainParts(
            self.raw_model, self.optimizer, self.prec.scaler, self.loader, self.monitor, self.loop
        )

        def probe() -> float:
            # the continuity probe: a fixed held-out batch, eval mode, no grad, deterministic
            # (the same batch on every rank, so that it does not depend on the world size)
            return evaluate(self.model, self.probe_batch, self.prec, self.ctx)

        self.resumer, self.saver = build_checkpoints(
            cfg, parts, self.ctx, data_meta=self.data.meta, probe=probe,
            precision=self.prec.name, say=self.say,
        )  # fmt: skip
        self._resume = faults.wrap_resume(self.resumer.resume, cfg.debug, self.optimizer)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()  # also when the run ends in an exception (the next may start)

    # ---- resume -----------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Restore the newest valid checkpoint (every piece of state, self-checked by the
        probe; the records of replayed steps dropped), then open the run's records after it."""
        path = self._resume()
        if path is not None:
            self.saver.restored(path)  # the newest good checkpoint until the next save
        if self.ctx.is_main:  # the samples of replayed steps are written again, like metrics
            truncate_after(self.run_dir / "samples.jsonl", self.loop.step)
        cfg = self.cfg
        log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.ctx.is_main)
        self.log = attach_loggers(  # TensorBoard, W&B
            log, cfg.train, self.run_dir, to_dict(cfg), self.ctx.is_main, self.loop.step
        )
        self.resumer.attach_log(self.log)  # the resume records, then every later one
        self.saver.attach_log(self.log)  # every checkpoint record
        # the doctor's hands: skip, roll back (through the checkpoints), stop
        self.medic = Recovery(
            cfg.health,
            self.monitor,
            self.loader,
            self.loop,
            self.raw_model,
            self.vocab,
            self.log,
            self.say,
            self._roll_back,
        )
        if self.ctx.is_main:
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
        self.display.start_at(self.loop.step)
        if self.peak is None:
            self.say(f"MFU: n/a ({self.peak_note})")
        for callback in self.callbacks:
            callback.on_run_start(self)
        return path

    def _roll_back(self, before_step: int) -> Path | None:
        """The doctor's rollback: the save in flight is finished (and recorded) first, then
        the newest valid checkpoint older than `before_step` is back in every part."""
        self.saver.wait()
        path = self.resumer.restore_latest(before_step)
        if path is not None:
            self.saver.restored(path)
        return path

    # ---- steps 1-6 --------------------------------------------------------------------------

    def train_step(self) -> Step:
        """One optimizer step up to the update, in the lesson's order."""
        s, opt, prec = self.loop.step, self.optimizer, self.prec
        # 1. the LR of this step, written into every param group (a pure function of s)
        lr = schedule_lr(self.cfg.schedule, self.cfg.optim, s, self.cfg.train.max_steps)
        lr *= self.monitor.lr_scale(s)  # health.lr_backoff for a while after a rollback
        for g in opt.param_groups:
            g["lr"] = lr
        # 2. clear gradients (set_to_none: frees memory and skips a memset)
        opt.zero_grad(set_to_none=True)
        # 3. forward + backward over the micro-batches of this step's global batch
        self.timer.step_start()
        batches = self.loader.next()
        self.timer.lap("data_wait")
        try:
            loss = self.forward_backward(batches)
        except (IndexError, RuntimeError):
            if not self.medic.explain_crash(s + 1, batches):  # token ids out of range: stop
                raise
            return Step("stop", lr)
        self.timer.lap("fwd_bwd")
        # 4. fp16 only: unscale so the norm below is of the true gradients
        prec.scaler.unscale_(opt)
        # 5. clip; the returned norm is the PRE-clip norm, the health metric we log
        grad_norm = parallel.clip_grad_norm(self.model, self.max_norm, self.ctx)
        # host sync (one per optimizer step, not per micro-batch): a non-finite step must be
        # stopped before it touches the weights and the optimizer's moments, on every rank
        # alike (one all-reduce: the same loss, norm and stop request everywhere)
        loss_f, norm_f, self.stopping = parallel.agree_on_step(
            loss, grad_norm, self.stop.requested, self.ctx
        )
        # a save that refused NaN/Inf weights has decided this step already (rollback or stop)
        verdict = self.medic.forced_verdict(s + 1) or self.monitor.check_step(
            s + 1, loss_f, norm_f, prec.scaler.is_enabled()
        )
        action = self.medic.act(verdict, s + 1, batches)  # records and prints the diagnoses
        if action in ("stop", "rolled_back"):  # give up (exit 3) / start the step over
            return Step(action, lr, loss_f, norm_f)
        # 6. the update (GradScaler skips it by itself when fp16 gradients overflowed)
        if action == "apply":
            prec.scaler.step(opt)
        prec.scaler.update()
        self.timer.lap("optim")
        self.loop.step += 1
        self.loop.tokens += self.tokens_per_step
        return Step(action, lr, loss_f, norm_f)

    # ---- step 7 -----------------------------------------------------------------------------

    def end_of_step(self, step: Step) -> None:
        """Log; evaluate, check health and save at fixed intervals."""
        loop, t = self.loop, self.cfg.train
        record = {
            "step": loop.step,
            "train_loss": step.loss,
            "lr": step.lr,
            "grad_norm": step.grad_norm,
            "clipped": step.grad_norm > self.max_norm,
            "tokens": loop.tokens,
        }
        if step.action != "apply":
            record["skipped"] = True
        if self.cfg.data.sampling == "epoch":
            record["epoch"] = self.loader.epoch  # the epoch the next batch is drawn from
        last = loop.step == t.max_steps
        if loop.step % t.log_interval == 0 or last:
            self._add_throughput(record)
        evaluate_now = last or (t.eval_interval and loop.step % t.eval_interval == 0)
        if evaluate_now:
            self.val_loss = record["val_loss"] = self.evaluate()
        # multiple-choice accuracy every eval.task_interval steps, samples every sample_interval
        tasks = self.downstream.tasks(self.eval_model, self.prec, loop.step, last)
        record.update(tasks)
        sampled = self.downstream.samples(self.eval_model, loop.step, last)
        self.medic.report(self.monitor.observe(record, self.loader.last_digest))  # trends
        if "tokens_per_sec" in record or evaluate_now or tasks:
            self.log.write(record)
            self.display.update(
                loop.step,
                step.loss,
                record.get("tokens_per_sec", 0.0),
                record.get("mfu"),
                record.get("val_loss"),
                record.get("data_wait_frac"),
            )
        if evaluate_now and self.val_loss < loop.best_val:
            loop.best_val = self.val_loss
            self.saver.request_best()  # best/ gets this step's state, saved just below
        # every ckpt.interval steps / interval_minutes, at the end, and on SIGTERM/SIGINT
        force = last or self.stopping
        saved = self.saver.maybe_save(loop.step, force=force, val_loss=self.val_loss)
        self.medic.after_save(saved)  # NaN/Inf weights refused: the next step rolls back
        if saved.due:
            self.timer.skip()  # saving is not training time
        if evaluate_now or tasks or sampled:
            self.timer.skip()  # nor is evaluation
        for callback in self.callbacks:
            callback.on_step_end(self, record)

    def _add_throughput(self, record: dict) -> None:
        timing = self.timer.read()  # CUDA: one sync per log interval, none per step
        record.update(
            throughput_record(
                timing,
                self.tokens_per_step,
                self.flops_per_step,
                self.hw_flops_per_step,
                self.peak,
            )
        )
        record.update(memory_record(self.ctx.device))  # peak since the last log interval

    # ---- the end ----------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Wait for the last save, report, close the records; an ordinary copy of the model."""
        self.saver.close()  # waits for an asynchronous save (and raises its error)
        health_stop = self.medic.finish()
        if self.stopping:
            self.say(
                f"stopped by signal {self.stop.signum} at step {self.loop.step}; checkpoint "
                "saved, resume with the same command"
            )
            self.log.write({"event": "stopped", "step": self.loop.step, "signal": self.stop.signum})
        self.display.close()
        self.log.close()
        # FSDP: an ordinary copy of the weights on rank 0, for sampling after the run
        final_model = parallel.local_model(
            self.raw_model, lambda: build_model(self.cfg.model, self.vocab), self.ctx
        )
        parallel.shutdown(self.ctx)
        self.lock.release()
        return RunResult(
            self.run_dir,
            self.loop.step,
            self.val_loss,
            self.loop.best_val,
            final_model,
            self.data.meta,
            stopped_early=self.stopping,
            stop_signal=self.stop.signum if self.stopping else None,
            is_main=self.ctx.is_main,
            health_stop=health_stop,
            cfg=self.cfg,
        )
