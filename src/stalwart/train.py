"""THE loop: `train(cfg)`, the story a newcomer reads first.

Build every part, resume, then for each optimizer step the seven steps of DESIGN.md in the
lesson's order: steps 1-6 (LR, zero_grad, forward/backward over the micro-batches, unscale, clip,
update) in `Trainer.train_step`, step 7 (log, evaluate, health, checkpoint) in
`Trainer.end_of_step`. The parts and the steps live in trainer.py; the details in the components.
"""

from __future__ import annotations

from stalwart.callbacks import AfterStep, Callback
from stalwart.config import Config
from stalwart.trainer import RunResult, Trainer, forward_backward

__all__ = ["AfterStep", "Callback", "RunResult", "Trainer", "forward_backward", "train"]


def train(cfg: Config, progress: bool = True, callbacks=()) -> RunResult:
    # build: data, model, optimizer, precision, parallel wrappers, checkpoints, the doctor;
    # the run dir is locked until the run ends, however it ends
    with Trainer(cfg, progress=progress, callbacks=callbacks) as trainer:
        # resume: the newest valid checkpoint, every piece of state, self-checked
        trainer.resume()
        # SIGTERM/SIGINT: finish the step, save, return (every rank agrees at the step's sync)
        with trainer.stop.installed():
            while trainer.loop.step < trainer.cfg.train.max_steps and not trainer.stopping:
                step = trainer.train_step()  # 1-6: lr, zero_grad, fwd/bwd, unscale, clip, update
                if step.action == "stop":  # the doctor gives up (critical diagnosis; exit 3)
                    break
                if step.action == "rolled_back":  # a good checkpoint is back: step over
                    continue
                trainer.end_of_step(step)  # 7: log; evaluate, health, checkpoint at intervals
        return trainer.finish()
