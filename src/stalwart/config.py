"""The configuration: a typed dataclass tree, one dataclass per component.

Every field is settable from a TOML file (`[section] field = value`) and from the command line
(`--section.field VALUE`). Each field's `help` doubles as `--help` text. Unknown keys are
rejected, values are converted to the field's type, and `validate()` checks the whole tree in one
place with errors that name the flag to change. Nothing is ever `exec`-ed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from stalwart.errors import UserError


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text (and, for strings, the allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = opt("runs/default", "run directory: config.toml, metrics.jsonl, checkpoints/")
    seed: int = opt(42, "seed for python, numpy and torch (and the data order)")
    resume: str = opt(
        "auto", "auto (newest valid checkpoint in run.dir), never (refuse a used dir), or a PATH"
    )
    init_from: str = opt("", "start from weights: a nanoGPT ckpt.pt or a Hugging Face GPT-2 dir")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = opt(0, "torch intra-op threads on CPU (0 = torch's default); recorded")


@dataclass
class DataConfig:
    dir: str = opt("data/stdlib-byte", "prepared dataset dir (train.bin, val.bin, meta.json)")


@dataclass
class ModelConfig:
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention heads per block")
    n_embd: int = opt(256, "residual stream width")
    block_size: int = opt(256, "context length in tokens")
    vocab_size: int = opt(0, "vocabulary size (0 = take it from the dataset's meta.json)")
    dropout: float = opt(0.0, "dropout probability (0 for pretraining)")
    bias: bool = opt(True, "biases in Linear and LayerNorm (GPT-2: true)")
    activation_checkpointing: str = opt(
        "none", "none | full | every:K | selective: recompute activations in backward"
    )


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimizer", ("sgd", "momentum", "adam", "adamw", "muon"))
    impl: str = opt("torch", "torch (fused where available) or reference", ("torch", "reference"))
    lr: float = opt(6e-4, "peak learning rate")
    min_lr: float = opt(-1.0, "final learning rate of the decay (negative = lr / 10)")
    weight_decay: float = opt(0.1, "decay on matrices (dim >= 2); biases and norms get 0")
    beta1: float = opt(0.9, "Adam first-moment decay")
    beta2: float = opt(0.95, "Adam second-moment decay (0.95 for LLMs)")
    eps: float = opt(1e-8, "Adam denominator epsilon")
    momentum: float = opt(0.9, "momentum for optim.name = momentum (and muon)")
    muon_lr: float = opt(
        0.02, "muon only: peak LR of the hidden matrices (optim.lr drives the AdamW rest)"
    )
    grad_clip: float = opt(1.0, "clip the global grad norm to this (0 = no clipping)")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr < 0 else self.min_lr


@dataclass
class ScheduleConfig:
    name: str = opt("cosine", "learning-rate schedule", ("cosine", "constant", "wsd"))
    warmup_steps: int = opt(100, "linear warmup steps")
    decay_frac: float = opt(0.2, "wsd only: fraction of the run spent decaying at the end")


@dataclass
class TrainConfig:
    max_steps: int = opt(1000, "optimizer steps")
    micro_batch: int | str = opt(8, "sequences per forward/backward (or auto: the planner picks)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (per process)")
    precision: str = opt("auto", "auto | fp32 | bf16 | fp16", ("auto", "fp32", "bf16", "fp16"))
    grad_scaler: bool = opt(
        True, "fp16 only: dynamic loss scaling (false = the lesson's demo of fp16 underflow)"
    )
    eval_interval: int = opt(100, "steps between held-out evaluations (0 = only at the end)")
    eval_batches: int = opt(20, "held-out micro-batches per evaluation")
    log_interval: int = opt(1, "steps between metrics records / progress lines")
    compile: bool = opt(False, "torch.compile the model")
    fused_gelu: bool = opt(
        False,
        "CPU fp32: GPT-2's tanh GELU as one compiled loop (same function, ~2x faster; compiled "
        "by inductor at start, torch's kernel if no C++ compiler)",
    )
    sample_tokens: int = opt(200, "tokens of text sampled at the end of the run (0 = none)")
    peak_flops: float = opt(
        0.0, "peak FLOP/s that MFU is measured against (0 = the device table / CPU calibration)"
    )
    dashboard: bool = opt(True, "`stalwart train` ends by writing run.dir/dashboard.png, .html")
    loggers: str = opt("none", "mirror metrics to: none, tensorboard, wandb (offline), or both")


@dataclass
class CkptConfig:
    interval: int = opt(500, "steps between checkpoints (0 = only at the end)")
    interval_minutes: float = opt(0.0, "also checkpoint every this many minutes (0 = off)")
    keep_last: int = opt(3, "ring buffer: how many step_* checkpoints to keep")
    milestone_interval: int = opt(0, "keep every checkpoint at a multiple of this step forever")
    async_save: bool = opt(False, "snapshot to CPU memory and write on a background thread")
    resume_check: str = opt(
        "strict",
        "after a restore, recompute a fixed probe batch's loss: strict (refuse on a mismatch), "
        "warn (diagnosis record, continue) or off",
        ("strict", "warn", "off"),
    )


@dataclass
class HealthConfig:
    enabled: bool = opt(True, "watch for the debugging playbook's symptoms while training")
    on_spike: str = opt("skip", "isolated loss spike", ("ignore", "skip", "rollback"))
    on_nan: str = opt("rollback", "non-finite loss/grad", ("ignore", "skip", "rollback"))
    window: int = opt(50, "steps in the rolling windows of the detectors")
    spike_zscore: float = opt(6.0, "a loss this many robust std devs above the window is a spike")
    clip_rate: float = opt(0.5, "diagnose 'constantly clipped' above this clip rate")
    max_rollbacks: int = opt(3, "rollback budget; past it the run stops with a diagnosis")
    lr_backoff: float = opt(0.5, "after a rollback, multiply the LR by this for a while")
    backoff_steps: int = opt(100, "steps the lowered LR lasts after a rollback")
    early_steps: int = opt(10, "a non-finite loss within this many steps is 'at once' (LR/warmup)")
    nan_patience: int = opt(3, "consecutive non-finite steps before skip escalates (rollback/stop)")
    grace_steps: int = opt(50, "trend detectors (clip, plateau, throughput) start after this step")
    clip_factor: float = opt(1.5, "'constantly clipped' also needs median norm >= this x grad_clip")
    plateau_lr: float = opt(1e-5, "'plateau': the loss is flat while the LR is below this")
    throughput_drop: float = opt(0.5, "diagnose tokens/s below this fraction of its rolling median")


@dataclass
class DebugConfig:
    inject_nan_at_step: int = opt(-1, "fault injection: make the loss NaN at this step")
    inject_spike_at_step: int = opt(-1, "fault injection: multiply the loss by 1e3 at this step")
    slow_data_ms: float = opt(0.0, "fault injection: sleep this long in every batch fetch")
    pause_in_save_s: float = opt(0.0, "test/demo only: sleep in every save before its manifest")
    pause_in_eval_s: float = opt(0.0, "test/demo only: sleep at the start of every evaluation")
    inject_rank: int = opt(-1, "fault injection: only on this rank (-1 = every rank)")
    repeat_batches: bool = opt(False, "fault injection: the loader returns the same batch forever")
    drop_optimizer_state_on_resume: bool = opt(
        False, "fault injection: resume without the optimizer's moments (a broken resume)"
    )
    forget_accum_division: bool = opt(
        False, "demo only: skip the loss / grad_accum division (effective LR x grad_accum)"
    )


@dataclass
class ParallelConfig:
    mode: str = opt(
        "none", "data parallelism (ddp|fsdp|zero1 under torchrun)", ("none", "ddp", "fsdp", "zero1")
    )
    backend: str = opt(
        "auto", "auto (nccl on CUDA, gloo on CPU), nccl or gloo", ("auto", "nccl", "gloo")
    )
    timeout_minutes: float = opt(10.0, "a collective waiting longer than this fails (dead peer)")
    bucket_mb: int = opt(25, "ddp/zero1: gradient all-reduce bucket size in MB")
    reshard_after_forward: bool = opt(
        True, "fsdp: free each block's gathered weights after forward (false: ZeRO-2-like)"
    )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# ----------------------------------------------------------------------------------------------
# Loading: TOML file, then --section.field overrides, then validation.


@dataclass(frozen=True)
class FieldInfo:
    name: str
    type_cls: Any
    metadata: Any
    default: Any


def sections() -> dict[str, type]:
    return {f.name: f.type_cls for f in _fields(Config)}


def _fields(cls: type) -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(FieldInfo(f.name, hints[f.name], f.metadata, default))
    return out


def _convert(flag: str, value: Any, typ: Any) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or explain."""
    is_union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    options = typing.get_args(typ) if is_union else (typ,)
    for t in options:
        try:
            return _convert_one(value, t)
        except (ValueError, TypeError):
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise UserError(f"{flag} expects {names}, got {value!r}")


def _convert_one(value: Any, t: type) -> Any:
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if t is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        if isinstance(value, str):
            return int(float(value)) if _is_int_like(value) else int(value)
        return int(value)
    if t is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    raise TypeError(t)


def _is_int_like(s: str) -> bool:
    """'1e3' is a fine way to write 1000 on a command line."""
    try:
        f = float(s)
    except ValueError:
        return False
    return f.is_integer() and ("e" in s.lower())


def _set(cfg: Config, dotted: str, value: Any, flag: str) -> None:
    parts = dotted.split(".")
    secs = sections()
    if len(parts) != 2 or parts[0] not in secs:
        raise UserError(
            f"unknown option {flag}: options look like --section.field, sections are "
            + ", ".join(secs)
        )
    sec_name, name = parts
    section = getattr(cfg, sec_name)
    by_name = {f.name: f for f in _fields(type(section))}
    if name not in by_name:
        raise UserError(f"unknown option {flag}: [{sec_name}] has " + ", ".join(sorted(by_name)))
    f = by_name[name]
    converted = _convert(flag, value, f.type_cls)
    choices = f.metadata.get("choices")
    if choices and converted not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}; got {converted!r}")
    setattr(section, name, converted)


def load_toml(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} not found: check --config") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e}): fix the file") from None
    for sec_name, body in tree.items():
        if not isinstance(body, dict):
            raise UserError(f"{path}: '{sec_name}' must be a [section] table")
        for name, value in body.items():
            _set(cfg, f"{sec_name}.{name}", value, f"{path}: {sec_name}.{name}")


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """Turn ['--a.b', '1', '--c.d=x'] into [('a.b', '1', '--a.b'), ('c.d', 'x', '--c.d')]."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --section.field VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise UserError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 2
        out.append((key, value, f"--{key}"))
    return out


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """The one way a Config is built: defaults < TOML file < command-line overrides."""
    cfg = Config()
    if config_file:
        load_toml(cfg, config_file)
    for key, value, flag in parse_overrides(overrides or []):
        _set(cfg, key, value, flag)
    validate(cfg)
    return cfg


def from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from `to_dict` output (as stored in a checkpoint)."""
    cfg = Config()
    for sec_name, body in tree.items():
        for name, value in body.items():
            _set(cfg, f"{sec_name}.{name}", value, f"{sec_name}.{name}")
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Validation: one place, early, every message names the flag and the fix.


def _positive(flag: str, value: float, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        need = "at least 0" if allow_zero else "positive"
        raise UserError(f"{flag} must be {need}, got {value}")


def validate(cfg: Config) -> None:
    m, o, s, t, c, h = cfg.model, cfg.optim, cfg.schedule, cfg.train, cfg.ckpt, cfg.health
    for flag, value in [
        ("--model.n_layer", m.n_layer),
        ("--model.n_head", m.n_head),
        ("--model.n_embd", m.n_embd),
        ("--model.block_size", m.block_size),
        ("--optim.lr", o.lr),
        ("--optim.muon_lr", o.muon_lr),
        ("--train.max_steps", t.max_steps),
        ("--train.grad_accum", t.grad_accum),
        ("--train.log_interval", t.log_interval),
        ("--train.eval_batches", t.eval_batches),
        ("--ckpt.keep_last", c.keep_last),
        ("--health.window", h.window),
        ("--parallel.timeout_minutes", cfg.parallel.timeout_minutes),
        ("--parallel.bucket_mb", cfg.parallel.bucket_mb),
    ]:
        _positive(flag, value)
    for flag, value in [
        ("--optim.weight_decay", o.weight_decay),
        ("--optim.grad_clip", o.grad_clip),
        ("--optim.eps", o.eps),
        ("--schedule.warmup_steps", s.warmup_steps),
        ("--train.eval_interval", t.eval_interval),
        ("--ckpt.interval", c.interval),
        ("--ckpt.interval_minutes", c.interval_minutes),
        ("--ckpt.milestone_interval", c.milestone_interval),
        ("--model.vocab_size", m.vocab_size),
        ("--run.threads", cfg.run.threads),
        ("--debug.slow_data_ms", cfg.debug.slow_data_ms),
        ("--debug.pause_in_save_s", cfg.debug.pause_in_save_s),
        ("--debug.pause_in_eval_s", cfg.debug.pause_in_eval_s),
        ("--train.peak_flops", t.peak_flops),
        ("--train.sample_tokens", t.sample_tokens),
    ]:
        _positive(flag, value, allow_zero=True)
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"--model.dropout must be in [0, 1), got {m.dropout}")
    if m.n_embd % m.n_head:
        raise UserError(
            f"--model.n_embd ({m.n_embd}) must be divisible by --model.n_head ({m.n_head})"
        )
    if o.final_lr > o.lr:
        raise UserError(f"--optim.min_lr ({o.min_lr}) must not exceed --optim.lr ({o.lr})")
    for flag, beta in (("--optim.beta1", o.beta1), ("--optim.beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {beta}")
    if not 0.0 <= o.momentum < 1.0:
        raise UserError(f"--optim.momentum must be in [0, 1), got {o.momentum}")
    if s.name != "constant" and s.warmup_steps >= t.max_steps:
        raise UserError(
            f"--schedule.warmup_steps ({s.warmup_steps}) must be shorter than "
            f"--train.max_steps ({t.max_steps}): lower the warmup or train longer"
        )
    if not 0.0 <= s.decay_frac <= 1.0:
        raise UserError(f"--schedule.decay_frac must be in [0, 1], got {s.decay_frac}")
    if isinstance(t.micro_batch, str):
        if t.micro_batch != "auto":
            raise UserError(
                f"--train.micro_batch must be a positive integer or auto, got {t.micro_batch!r}"
            )
    else:
        _positive("--train.micro_batch", t.micro_batch)
    parse_activation_checkpointing(m.activation_checkpointing)
    from stalwart.logs.loggers import parse_loggers  # one parser for the CLI check and the loop

    parse_loggers(t.loggers)
    if not 0.0 < h.lr_backoff <= 1.0:
        raise UserError(f"--health.lr_backoff must be in (0, 1], got {h.lr_backoff}")
    _positive("--health.max_rollbacks", h.max_rollbacks, allow_zero=True)
    for flag, value in [
        ("--health.spike_zscore", h.spike_zscore),
        ("--health.nan_patience", h.nan_patience),
        ("--health.clip_factor", h.clip_factor),
        ("--health.plateau_lr", h.plateau_lr),
    ]:
        _positive(flag, value)
    for flag, value in [
        ("--health.backoff_steps", h.backoff_steps),
        ("--health.early_steps", h.early_steps),
        ("--health.grace_steps", h.grace_steps),
    ]:
        _positive(flag, value, allow_zero=True)
    for flag, value in [
        ("--health.clip_rate", h.clip_rate),
        ("--health.throughput_drop", h.throughput_drop),
    ]:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} must be in [0, 1], got {value}")


def parse_activation_checkpointing(spec: str) -> tuple[str, int]:
    """'none' | 'full' | 'every:K' | 'selective' -> (kind, K)."""
    if spec in ("none", "full", "selective"):
        return spec, 1
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "every", k
    raise UserError(
        f"--model.activation_checkpointing must be none, full, every:K (K >= 1) or selective; "
        f"got {spec!r}"
    )


# ----------------------------------------------------------------------------------------------
# Writing: the resolved config as TOML (tomllib reads, the stdlib has no writer).


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg: Config) -> str:
    lines = []
    for sec_name, body in to_dict(cfg).items():
        lines.append(f"[{sec_name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
        lines.append("")
    return "\n".join(lines)


def help_text() -> str:
    """Every field with its type, default and help, for `stalwart train --help`."""
    lines = []
    for sec in _fields(Config):
        for f in _fields(sec.type_cls):
            typ = getattr(f.type_cls, "__name__", str(f.type_cls))
            lines.append(f"  --{sec.name}.{f.name} {typ.upper()}  (default {f.default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
