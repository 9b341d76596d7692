"""The memory planner: the peak one training step holds, predicted without building anything.

`training_memory(step, micro_batch)` replays one training step of the GPT-2 block as a timeline
of allocations and frees (memory.inventory: what is kept; memory.replay: the replay) and reports
the highest point, with what was held there. It reads a `StepSpec`: the model and optimizer
sections of the config and the facts resolved elsewhere (vocabulary, precision, device, how the
ranks shard). `inference_memory` is the serving side. `plan_training` / `plan_inference` are the
same from a whole Config, for the `plan` command, `bench` and the experiments. The micro-batch
choice is built on top (memory.budget); measuring the real peak is memory.measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stalwart.config import Config, ModelConfig, OptimConfig
from stalwart.errors import UserError
from stalwart.memory import inventory
from stalwart.memory.replay import replay
from stalwart.model.gpt import num_params
from stalwart.optim.build import optimizer_state_bytes_for

MiB, GiB = 1024**2, 1024**3


@dataclass
class MemoryPlan:
    """A predicted training step. `total_bytes` is the peak; `components` the most each kind of
    memory holds at any point of the step; `at_peak` what is held at the peak (sums to the
    total); `peak_phase` where in the step the peak falls."""

    total_bytes: int
    components: dict[str, int]
    at_peak: dict[str, int]
    peak_phase: str
    micro_batch: int
    seq_len: int
    precision: str
    checkpointing: str
    world_size: int = 1
    zero: int = 0
    params: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "total_bytes": int(self.total_bytes),
            "components": {k: int(v) for k, v in self.components.items()},
            "at_peak": {k: int(v) for k, v in self.at_peak.items()},
            "peak_phase": self.peak_phase,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "activation_checkpointing": self.checkpointing,
            "world_size": self.world_size,
            "zero": self.zero,
            "params": self.params,
        }


@dataclass(frozen=True)
class StepSpec:
    """One training step to plan, but for its micro-batch.

    model, optim: the config's sections. The facts come resolved: vocab_size (the dataset's where
    the config leaves it 0), precision (fp32 | bf16 | fp16, or auto: bf16 on CUDA, fp32 on CPU),
    device_type (cpu | cuda), grad_accum, and the parallel layout: world_size ranks and the
    ZeRO stage they shard at (`zero_stage`; 0 = DDP, 1 = optimizer state, 2 = + gradients,
    3 = + weights: FSDP). seq_len: None = the model's block_size.
    """

    model: ModelConfig
    optim: OptimConfig
    vocab_size: int
    precision: str = "fp32"
    device_type: str = "cpu"
    grad_accum: int = 1
    world_size: int = 1
    zero: int = 0
    seq_len: int | None = None


def zero_stage(mode: str) -> int:
    """The ZeRO stage a `parallel.mode` amounts to: zero1 shards the optimizer state, fsdp all."""
    return {"zero1": 1, "fsdp": 3}.get(mode, 0)


def resolve_plan_precision(name: str, device_type: str) -> str:
    """`auto` without a device to ask: bf16 on CUDA (Ampere+ is what people plan for), fp32 on
    CPU (what auto picks on CPUs without bf16 units)."""
    if name != "auto":
        return name
    return "bf16" if device_type == "cuda" else "fp32"


def run_device_type(device: str) -> str:
    """cpu | cuda for a `run.device` setting (auto: cuda where there is one)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _need_vocab(vocab_size: int) -> int:
    if not vocab_size:
        raise UserError("the planner needs the vocabulary size: set --model.vocab_size")
    return int(vocab_size)


def training_memory(step: StepSpec, micro_batch: int) -> MemoryPlan:
    """Predicted peak memory (bytes, per rank) of one training step (a pure function)."""
    vocab = _need_vocab(step.vocab_size)
    if step.zero not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3, got {step.zero}")
    if step.world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {step.world_size}")
    dev = step.device_type
    prec = resolve_plan_precision(step.precision, dev)
    m, lp = step.model, 2 if prec in ("bf16", "fp16") else 4
    s = inventory.Step(
        B=int(micro_batch),
        T=int(step.seq_len or m.block_size),
        C=m.n_embd,
        h=m.n_head,
        V=vocab,
        L=m.n_layer,
        block_size=m.block_size,
        bias=m.bias and m.arch != "llama",
        lp=lp,
        p_drop=m.dropout,
        mask=lp if dev == "cpu" else 1,
        cpu=dev == "cpu",
        ckpt=inventory.checkpoint_kinds(m.activation_checkpointing, m.n_layer),
        world=step.world_size,
        zero=step.zero,
        grad_accum=int(step.grad_accum),
        opt_state_bytes=optimizer_state_bytes_for(step.optim, m, vocab, bytes_per_elem=4),
        arch=m.arch,
        kv=m.kv_heads * (m.n_embd // m.n_head),
        ffn=m.ffn_size,
        tied=m.tie_embeddings,
    )
    tl = replay(s)
    return MemoryPlan(
        total_bytes=tl.peak,
        components=dict(tl.most),
        at_peak=dict(tl.at_peak),
        peak_phase=tl.peak_phase,
        micro_batch=s.B,
        seq_len=s.T,
        precision=prec,
        checkpointing=m.activation_checkpointing,
        world_size=step.world_size,
        zero=step.zero,
        params=inventory.model_params(s),
    )


@dataclass
class InferencePlan:
    """Serving memory: the weights in 16 bits and the KV cache (2 x layers x context x width)."""

    weights_bytes: int
    kv_cache_bytes: int
    context: int
    batch: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    def to_json(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "components": {"weights": self.weights_bytes, "kv_cache": self.kv_cache_bytes},
            "context": self.context,
            "batch": self.batch,
        }


def inference_memory(
    model: ModelConfig,
    vocab_size: int,
    *,
    context: int | None = None,
    batch: int = 1,
    bytes_per_elem: int = 2,
) -> InferencePlan:
    """bf16 weights + the KV cache for `context` tokens (default: block_size). Activations of
    one decoding step are a few vectors per layer and are left out."""
    vocab = _need_vocab(vocab_size)
    ctx_len = int(context or model.block_size)
    width = model.n_embd if model.arch != "llama" else model.kv_heads * model.n_embd // model.n_head
    kv = 2 * model.n_layer * batch * ctx_len * width * bytes_per_elem  # GQA: n_kv_head heads
    return InferencePlan(num_params(model, vocab)["total"] * bytes_per_elem, kv, ctx_len, batch)


# ---- the same from a whole Config: the `plan` command, bench, the experiments ---------------


def step_of(
    cfg: Config,
    *,
    world_size: int = 1,
    zero: int = 0,
    precision: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    grad_accum: int | None = None,
    device_type: str | None = None,
) -> StepSpec:
    """The StepSpec of `cfg`; each argument given overrides what the config says."""
    return StepSpec(
        cfg.model,
        cfg.optim,
        vocab_size=int(vocab_size or cfg.model.vocab_size),
        precision=precision or cfg.train.precision,
        device_type=device_type or run_device_type(cfg.run.device),
        grad_accum=int(grad_accum or cfg.train.grad_accum),
        world_size=world_size,
        zero=zero,
        seq_len=seq_len,
    )


def plan_training(cfg: Config, *, micro_batch: int | str | None = None, **overrides) -> MemoryPlan:
    """`training_memory` of `cfg` (micro_batch: the config's, `auto` planned as 1); `overrides`
    as `step_of`'s."""
    mb = micro_batch if micro_batch is not None else cfg.train.micro_batch
    return training_memory(step_of(cfg, **overrides), 1 if mb == "auto" else int(mb))


def plan_inference(cfg: Config, *, vocab_size: int | None = None, **kw) -> InferencePlan:
    """`inference_memory` of `cfg`'s model (its vocabulary unless `vocab_size` is given)."""
    return inference_memory(cfg.model, int(vocab_size or cfg.model.vocab_size), **kw)


def gb(n: float) -> str:
    """Bytes for people: GiB above 1 GiB, MiB below."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"
