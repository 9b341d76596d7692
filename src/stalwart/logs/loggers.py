"""Optional loggers that mirror metrics.jsonl: TensorBoard and Weights & Biases (offline).

metrics.jsonl stays the record of truth (the doctor and the dashboard read it); these copy every
training record's numbers to a tool people already watch, and the doctor's diagnoses and
rollbacks as text. Each sits behind an extra and is imported only when asked for:
    --train.loggers tensorboard     pip install 'stalwart[tb]'     -> RUN_DIR/tensorboard/
    --train.loggers wandb           pip install 'stalwart[wandb]'  -> RUN_DIR/wandb/ (offline;
                                    `wandb sync` uploads it later, if ever)
"""

from __future__ import annotations

import math
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
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            need = f"--train.loggers tensorboard needs TensorBoard: {_INSTALL['tensorboard']}"
            raise UserError(need) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        event = record.get("event")
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
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError(f"--train.loggers wandb needs wandb: {_INSTALL['wandb']}") from None
        self.wandb = wandb
        self.run = wandb.init(
            project="stalwart", name=run_dir.name, dir=str(run_dir), config=config, mode="offline"
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


def attach_loggers(log, train: TrainConfig, run_dir: Path, config: dict, is_main: bool = True):
    """The loggers --train.loggers names, around `log`; `log` itself when none is asked for
    (or on ranks other than 0). W&B records `config`, the whole resolved config."""
    names = train.logger_list()
    if not names or not is_main:
        return log
    run_dir = Path(run_dir)
    sinks = [TensorBoardSink(run_dir) if n == "tensorboard" else WandbSink(run_dir, config)
             for n in names]  # fmt: skip
    return TeeLog(log, sinks)
