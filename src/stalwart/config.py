"""The configuration: a typed dataclass tree, one dataclass per component.

Every field is settable from a TOML file (`[section] field = value`) and from the command line
(`--section.field VALUE`). Each field's `help` doubles as `--help` text. Unknown keys are
rejected, values are converted to the field's type, and `validate()` checks the tree early, with
errors that name the flag to change: each section checks its own fields (`ModelConfig.validate`),
`Config.validate` adds the few checks that span sections. Nothing is ever `exec`-ed.

A validated config can be made read-only with `freeze(cfg)`; a changed copy is derived with
`with_overrides(cfg, {"train.max_steps": 5})` (validated again) or, for one section,
`dataclasses.replace(cfg.health, enabled=True)`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from stalwart.config_base import Section, freeze, set_field
from stalwart.config_base import help_text as _tree_help
from stalwart.config_base import load_toml as load_toml
from stalwart.config_base import parse_overrides as parse_overrides
from stalwart.config_base import to_toml as to_toml
from stalwart.errors import UserError

_set = set_field  # the old private name (health/doctor.py reads run configs leniently with it)


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text (and, for strings, the allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig(Section):
    SECTION = "run"

    dir: str = opt("runs/default", "run directory: config.toml, metrics.jsonl, checkpoints/")
    seed: int = opt(42, "seed for python, numpy and torch (and the data order)")
    resume: str = opt(
        "auto",
        "auto (newest valid checkpoint in run.dir; refused if settings changed), allow-changes "
        "(auto, continuing with changed settings), never (refuse a used dir), or a PATH",
    )
    init_from: str = opt("", "start from weights: a nanoGPT ckpt.pt or a Hugging Face GPT-2 dir")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = opt(0, "torch intra-op threads on CPU (0 = torch's default); recorded")

    def validate(self) -> None:
        self._check_positive("threads", allow_zero=True)


@dataclass
class DataConfig(Section):
    SECTION = "data"

    dir: str = opt("data/stdlib-byte", "prepared dataset dir (meta.json + token shards)")
    sampling: str = opt(
        "random",
        "random: windows at seeded random offsets | epoch: every non-overlapping window once "
        "per epoch, in a seeded order",
        choices=("random", "epoch"),
    )
    prefetch: str = opt(
        "auto",
        "build the next batch in a background thread while a step runs: on | off | auto (on "
        "for CUDA; off on CPU, where the step's own threads use every core)",
        choices=("auto", "on", "off"),
    )


@dataclass
class ModelConfig(Section):
    SECTION = "model"

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
    arch: str = opt(
        "gpt2", "gpt2 (learned positions, LayerNorm, GELU) | llama (RoPE, RMSNorm, SwiGLU, GQA)",
        ("gpt2", "llama"),
    )  # fmt: skip
    n_kv_head: int = opt(0, "llama: key/value heads for grouped-query attention (0 = n_head)")
    intermediate_size: int = opt(
        0, "llama: SwiGLU hidden width (0 = 8/3 n_embd, rounded up to 256; to 64 below 1024 wide)"
    )
    tie_embeddings: bool = opt(True, "output head shares the token embedding (gpt2: always)")
    rope_theta: float = opt(10000.0, "llama: RoPE base frequency")
    norm_eps: float = opt(1e-5, "llama: RMSNorm epsilon (gpt2's LayerNorm keeps 1e-5)")

    def validate(self) -> None:
        self._check_positive("n_layer", "n_head", "n_embd", "block_size")
        self._check_positive("vocab_size", "n_kv_head", "intermediate_size", allow_zero=True)
        self._check_positive("rope_theta", "norm_eps")
        self._check_within("[0, 1)", "dropout")
        if self.n_embd % self.n_head:
            raise UserError(
                f"--model.n_embd ({self.n_embd}) must be divisible by --model.n_head ({self.n_head})"
            )
        parse_activation_checkpointing(self.activation_checkpointing)
        if self.arch == "llama" and self.n_head % self.kv_heads:
            raise UserError(
                f"--model.n_head ({self.n_head}) must be a multiple of --model.n_kv_head "
                f"({self.n_kv_head})"
            )
        if self.arch == "gpt2":
            self._check_gpt2()

    def _check_gpt2(self) -> None:
        llama_only = {"n_kv_head": 0, "intermediate_size": 0, "rope_theta": 10000.0}
        llama_only |= {"norm_eps": 1e-5, "tie_embeddings": True}
        bad = [k for k, v in llama_only.items() if getattr(self, k) != v]
        if bad:
            raise UserError(
                f"--model.{bad[0]} is a llama setting: set --model.arch llama, or leave it at "
                f"its default for gpt2"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_size(self) -> int:
        """llama's SwiGLU width: intermediate_size, or 8/3 n_embd rounded up to 256 (Llama's
        `multiple_of`; small models round to 64 so that 8/3 of a narrow width stays near it)."""
        if self.intermediate_size:
            return self.intermediate_size
        m = 256 if self.n_embd >= 1024 else 64
        return -(-(8 * self.n_embd // 3) // m) * m


@dataclass
class OptimConfig(Section):
    SECTION = "optim"

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

    def validate(self) -> None:
        self._check_positive("lr", "muon_lr")
        self._check_positive("weight_decay", "grad_clip", "eps", allow_zero=True)
        if self.final_lr > self.lr:
            raise UserError(
                f"--optim.min_lr ({self.min_lr}) must not exceed --optim.lr ({self.lr})"
            )
        self._check_within("[0, 1)", "beta1", "beta2", "momentum")


@dataclass
class ScheduleConfig(Section):
    SECTION = "schedule"

    name: str = opt("cosine", "learning-rate schedule", ("cosine", "constant", "wsd"))
    warmup_steps: int = opt(100, "linear warmup steps")
    decay_frac: float = opt(0.2, "wsd only: fraction of the run spent decaying at the end")

    def validate(self) -> None:
        self._check_positive("warmup_steps", allow_zero=True)
        self._check_within("[0, 1]", "decay_frac")


@dataclass
class TrainConfig(Section):
    SECTION = "train"

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
    cpu_kernels: bool = opt(
        True,
        "CPU fp32 (gpt2): Linears through OpenBLAS, causal attention and GELU as stalwart's "
        "compiled kernels (the same math; built once per machine, torch's ops if they can't be)",
    )
    fused_gelu: bool = opt(
        False,
        "CPU fp32: GPT-2's tanh GELU as one compiled loop (same function, ~2x faster; compiled "
        "by inductor at start, torch's kernel if no C++ compiler)",
    )
    sample_tokens: int = opt(200, "tokens of text sampled at the end of the run (0 = none)")
    sample_interval: int = opt(
        0, "steps between samples (fixed prompts, greedy and T=0.8) to samples.jsonl (0 = none)"
    )
    peak_flops: float = opt(
        0.0, "peak FLOP/s that MFU is measured against (0 = the device table / CPU calibration)"
    )
    dashboard: bool = opt(True, "`stalwart train` ends by writing run.dir/dashboard.png, .html")
    loggers: str = opt("none", "mirror metrics to: none, tensorboard, wandb, or both (comma)")
    wandb_project: str = opt("", "W&B project ('' = $WANDB_PROJECT, else 'stalwart')")
    wandb_entity: str = opt("", "W&B entity ('' = $WANDB_ENTITY, else your default)")
    wandb_mode: str = opt(
        "", "W&B mode: online, offline, disabled ('' = $WANDB_MODE, else offline)",
        ("", "online", "offline", "disabled"),
    )  # fmt: skip

    def validate(self) -> None:
        self._check_positive("max_steps", "grad_accum", "log_interval", "eval_batches")
        self._check_positive("eval_interval", "peak_flops", "sample_tokens", allow_zero=True)
        self._check_positive("sample_interval", allow_zero=True)
        if isinstance(self.micro_batch, str):
            if self.micro_batch != "auto":
                raise UserError(
                    "--train.micro_batch must be a positive integer or auto, "
                    f"got {self.micro_batch!r}"
                )
        else:
            self._check_positive("micro_batch")
        self.logger_list()

    def logger_list(self) -> list[str]:
        """The loggers `loggers` names, without 'none' (checked: unknown names are refused)."""
        return parse_loggers(self.loggers)


@dataclass
class EvalConfig(Section):
    SECTION = "eval"

    tasks: str = opt(
        "auto",
        "multiple-choice tasks scored in the loop: KIND:PATH[,KIND:PATH] with KIND hellaswag|mc; "
        "auto = the dataset's built-in next-line task (DATA/tasks/next-line.jsonl) if it has one; "
        "none = no tasks",
    )
    task_interval: int = opt(0, "steps between task evaluations (0 = only at the end of the run)")

    def validate(self) -> None:
        self._check_positive("task_interval", allow_zero=True)


@dataclass
class CkptConfig(Section):
    SECTION = "ckpt"

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

    def validate(self) -> None:
        self._check_positive("keep_last")
        self._check_positive("interval", "interval_minutes", "milestone_interval", allow_zero=True)


@dataclass
class HealthConfig(Section):
    SECTION = "health"

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

    def validate(self) -> None:
        self._check_positive("window")
        self._check_within("(0, 1]", "lr_backoff")
        self._check_positive("max_rollbacks", allow_zero=True)
        self._check_positive("spike_zscore", "nan_patience", "clip_factor", "plateau_lr")
        self._check_positive("backoff_steps", "early_steps", "grace_steps", allow_zero=True)
        self._check_within("[0, 1]", "clip_rate", "throughput_drop")


@dataclass
class DebugConfig(Section):
    SECTION = "debug"

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

    def validate(self) -> None:
        self._check_positive("slow_data_ms", "pause_in_save_s", "pause_in_eval_s", allow_zero=True)


@dataclass
class ParallelConfig(Section):
    SECTION = "parallel"

    mode: str = opt(
        "auto",
        "data parallelism: auto (ddp when torchrun starts several processes, else none), none, "
        "ddp, fsdp or zero1",
        ("auto", "none", "ddp", "fsdp", "zero1"),
    )
    backend: str = opt(
        "auto", "auto (nccl on CUDA, gloo on CPU), nccl or gloo", ("auto", "nccl", "gloo")
    )
    timeout_minutes: float = opt(10.0, "a collective waiting longer than this fails (dead peer)")
    bucket_mb: int = opt(25, "ddp/zero1: gradient all-reduce bucket size in MB")
    reshard_after_forward: bool = opt(
        True, "fsdp: free each block's gathered weights after forward (false: ZeRO-2-like)"
    )

    def validate(self) -> None:
        self._check_positive("timeout_minutes", "bucket_mb")


@dataclass
class Config(Section):
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Every section's own checks, then the ones that span sections."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        s, t = self.schedule, self.train
        if s.name != "constant" and s.warmup_steps >= t.max_steps:
            raise UserError(
                f"--schedule.warmup_steps ({s.warmup_steps}) must be shorter than "
                f"--train.max_steps ({t.max_steps}): lower the warmup or train longer"
            )


# ----------------------------------------------------------------------------------------------
# Loading: TOML file, then --section.field overrides, then validation (config_base does the
# parsing and the conversion).


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """The one way a Config is built: defaults < TOML file < command-line overrides."""
    cfg = Config()
    if config_file:
        load_toml(cfg, config_file)
    for key, value, flag in parse_overrides(overrides or [], Config):
        set_field(cfg, key, value, flag)
    validate(cfg)
    # read-only from here on: a resolved value lives in the part that resolved it, and a
    # changed copy is derived (with_overrides), so no component can change another's config
    return freeze(cfg)


def from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from `to_dict` output (as stored in a checkpoint)."""
    cfg = Config()
    for sec_name, body in tree.items():
        for name, value in body.items():
            set_field(cfg, f"{sec_name}.{name}", value, f"{sec_name}.{name}")
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Validation: early, every message names the flag and the fix. Read-only once validated.


def validate(cfg: Config) -> None:
    """Raise a UserError naming the flag to change if any value is out of range."""
    cfg.validate()


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of `cfg` with {"section.field": value} changed; `cfg` is untouched.

    Values are converted and checked as `--section.field VALUE` flags are (a path may be a
    Path). A frozen config gives a frozen copy."""
    new = from_dict(to_dict(cfg))
    for key, value in overrides.items():
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        set_field(new, key, value, f"--{key}")
    validate(new)
    return freeze(new) if cfg._frozen else new


LOGGERS = ("tensorboard", "wandb")  # what train.loggers may name (logs/loggers.py starts them)


def parse_loggers(spec: str) -> list[str]:
    """'none' | 'tensorboard' | 'wandb' | 'tensorboard,wandb' -> the loggers to start."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = ("none", *LOGGERS)
    for n in names:
        if n not in known:
            choose = ", ".join(known)
            raise UserError(f"--train.loggers: unknown logger {n!r}; choose from {choose}")
    return [n for n in names if n != "none"]


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


def help_text() -> str:
    """Every field with its type, default and help, for `stalwart train --help`."""
    return _tree_help(Config)
