"""Optional loggers that mirror metrics.jsonl: TensorBoard and Weights & Biases.

metrics.jsonl stays the record of truth (the doctor and the dashboard read it); these copy every
training record's numbers to a tool people already watch, and the doctor's diagnoses and
rollbacks as text. Each sits behind an extra and is imported only when asked for:
    --train.loggers tensorboard     pip install 'stalwart[tb]'     -> RUN_DIR/tensorboard/
    --train.loggers wandb           pip install 'stalwart[wandb]'  -> RUN_DIR/wandb/

Both continue the run across resumes and rollbacks, as metrics.jsonl does: TensorBoard purges
the steps that are replayed (`purge_step`: a resume from step s, or a rollback to s, drops what
was logged after s), and W&B resumes the same W&B run, whose id is kept in RUN_DIR/wandb_run_id.
W&B's project, entity and mode come from --train.wandb_* or else $WANDB_PROJECT, $WANDB_ENTITY,
$WANDB_MODE (default offline: `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later). W&B
keeps steps increasing: after a rollback it drops the replayed steps until the run passes its
old last step (metrics.jsonl and TensorBoard have them).
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from stalwart.config import TrainConfig
from stalwart.errors import UserError

# train.loggers' names and their parsing live in stalwart.config (config.LOGGERS)
_INSTALL = {"tensorboard": "pip install 'stalwart[tb]'", "wandb": "pip install 'stalwart[wandb]'"}


def _scalars(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        and math.isfinite(v)
    }  # fmt: skip


def _text(record: dict) -> str:
    if record.get("event") == "diagnosis":
        return (
            f"[{record.get('severity')}] {record.get('symptom')}: {record.get('evidence')}. "
            f"Likely cause: {record.get('cause')}. Fix: {record.get('fix')}"
        )
    return ", ".join(f"{k}={v}" for k, v in record.items() if k != "event")


class TensorBoardSink:
    def __init__(self, run_dir: Path, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            need = f"--train.loggers tensorboard needs TensorBoard: {_INSTALL['tensorboard']}"
            raise UserError(need) from None
        self._open = lambda purge: SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=purge
        )
        # a resumed run replays the steps after its checkpoint: TensorBoard must forget them
        self.writer = self._open(start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        event = record.get("event")
        if event == "rollback":  # the steps after to_step are replayed on other data
            self.writer.close()
            self.writer = self._open(int(record["to_step"]) + 1)
        if event is None:
            for k, v in _scalars(record).items():
                self.writer.add_scalar(f"train/{k}", v, step)
        elif event in ("diagnosis", "rollback"):
            tag = f"doctor/{record.get('symptom', event)}"
            self.writer.add_text(tag, _text(record), step)
            self.writer.add_scalar(f"doctor/{event}", 1.0, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict, train: TrainConfig):
        try:
            import wandb
        except ImportError:
            raise UserError(f"--train.loggers wandb needs wandb: {_INSTALL['wandb']}") from None
        self.wandb = wandb
        id_file = run_dir / "wandb_run_id"  # one W&B run per stalwart run, across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        env = os.environ
        self.run = wandb.init(
            project=train.wandb_project or env.get("WANDB_PROJECT") or "stalwart",
            entity=train.wandb_entity or env.get("WANDB_ENTITY") or None,
            mode=train.wandb_mode or env.get("WANDB_MODE") or "offline",
            id=run_id,
            resume="allow",
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
        )

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        if record.get("event") is None:
            self.run.log(_scalars(record), step=step)
        elif record["event"] in ("diagnosis", "rollback"):
            self.run.log({f"doctor/{record['event']}": _text(record)}, step=step)

    def close(self) -> None:
        self.run.finish()


class TeeLog:
    """A MetricsLog that also feeds the loggers; anything else is the MetricsLog's."""

    def __init__(self, log, sinks: list):
        self.log, self.sinks = log, sinks

    def write(self, record: dict) -> None:
        self.log.write(record)
        for s in self.sinks:
            s.write(record)

    def close(self) -> None:
        self.log.close()
        for s in self.sinks:
            s.close()

    def __getattr__(self, name):
        return getattr(self.log, name)


def attach_loggers(
    log, train: TrainConfig, run_dir: Path, config: dict, is_main: bool = True, start_step: int = 0
):
    """The loggers --train.loggers names, around `log`; `log` itself when none is asked for
    (or on ranks other than 0). `start_step`: the step the run resumed from (0 = a new run).
    W&B records `config`, the whole resolved config."""
    names = train.logger_list()
    if not names or not is_main:
        return log
    run_dir = Path(run_dir)
    sinks = [TensorBoardSink(run_dir, start_step) if n == "tensorboard"
             else WandbSink(run_dir, config, train) for n in names]  # fmt: skip
    return TeeLog(log, sinks)
