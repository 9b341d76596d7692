"""Memory: measure the peak a training step holds, and predict it from the config alone.

`PeakMemory` measures (CUDA: the caching allocator's counters; CPU: the kernel's resident-set
high-water mark; it lives in stalwart.peakmem and is re-exported here). `training_memory(cfg)`
predicts the same figure without building anything: it replays one training step of the GPT-2
block as a timeline of allocations and frees (stalwart.memsim: what is kept; stalwart.memreplay:
the replay) and reports the highest point, with what was held there. `inference_memory`,
`largest_micro_batch`, `auto_micro_batch` and `check_fits` are built on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stalwart.errors import UserError
from stalwart.memory.measure import (  # noqa: F401  (re-exported: stalwart.memory is the interface)
    PeakMemory,
    _proc_status_bytes,
    enable_exact_cpu_peak,
    heap_free_bytes,
    live_tensor_bytes,
    memory_record,
    peak_rss_bytes,
    reset_peak_rss,
)

MiB, GiB = 1024**2, 1024**3
# auto micro-batch leaves this share of the budget free: fragmentation in the CUDA caching
# allocator, the CUDA context itself (not counted by max_memory_allocated), and the planner's
# own +-10%.
HEADROOM = 0.10
# auto never goes past this: a tiny model "fits" 10^5 sequences in a CPU's RAM, but past a few
# hundred sequences a bigger micro-batch buys no throughput, only slower steps
AUTO_MAX_MICRO_BATCH = 256


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


def resolve_plan_precision(name: str, device_type: str) -> str:
    """`auto` without a device to ask: bf16 on CUDA (Ampere+ is what people plan for), fp32 on
    CPU (what auto picks on CPUs without bf16 units)."""
    if name != "auto":
        return name
    return "bf16" if device_type == "cuda" else "fp32"


def _device_type(cfg) -> str:
    dev = cfg.run.device
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if dev.startswith("cuda") else "cpu"


def training_memory(
    cfg,
    *,
    micro_batch: int | None = None,
    world_size: int = 1,
    zero: int = 0,
    precision: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    grad_accum: int | None = None,
    device_type: str | None = None,
) -> MemoryPlan:
    """Predicted peak memory (bytes, per rank) of one training step of `cfg` (a pure function).

    zero: 0 = plain data parallel (DDP), 1 = optimizer state sharded, 2 = + gradients,
    3 = + weights (FSDP / ZeRO-3). precision: fp32 | bf16 | fp16 (autocast over fp32 weights).
    """
    from stalwart.memory import inventory as memsim
    from stalwart.memory import replay as memreplay
    from stalwart.optim.build import optimizer_state_bytes_for

    dev = device_type or _device_type(cfg)
    mb = micro_batch if micro_batch is not None else cfg.train.micro_batch
    mb = 1 if mb == "auto" else int(mb)
    vocab = int(vocab_size or cfg.model.vocab_size)
    if not vocab:
        raise UserError("the planner needs the vocabulary size: set --model.vocab_size")
    if zero not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {world_size}")
    prec = resolve_plan_precision(precision or cfg.train.precision, dev)
    m, lp = cfg.model, 2 if prec in ("bf16", "fp16") else 4
    step = memsim.Step(
        B=mb,
        T=int(seq_len or m.block_size),
        C=m.n_embd,
        h=m.n_head,
        V=vocab,
        L=m.n_layer,
        block_size=m.block_size,
        bias=m.bias,
        lp=lp,
        p_drop=m.dropout,
        mask=lp if dev == "cpu" else 1,
        cpu=dev == "cpu",
        ckpt=memsim.checkpoint_kinds(m.activation_checkpointing, m.n_layer),
        world=world_size,
        zero=zero,
        grad_accum=int(grad_accum or cfg.train.grad_accum),
        opt_state_bytes=optimizer_state_bytes_for(cfg.optim, m, vocab, bytes_per_elem=4),
    )
    tl = memreplay.replay(step)
    return MemoryPlan(
        total_bytes=tl.peak,
        components=dict(tl.most),
        at_peak=dict(tl.at_peak),
        peak_phase=tl.peak_phase,
        micro_batch=mb,
        seq_len=step.T,
        precision=prec,
        checkpointing=m.activation_checkpointing,
        world_size=world_size,
        zero=zero,
        params=memsim.model_params(step),
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
    cfg,
    *,
    context: int | None = None,
    batch: int = 1,
    vocab_size: int | None = None,
    bytes_per_elem: int = 2,
) -> InferencePlan:
    """bf16 weights + the KV cache for `context` tokens (default: block_size). Activations of
    one decoding step are a few vectors per layer and are left out."""
    from stalwart.model.gpt import num_params

    m = cfg.model
    vocab = int(vocab_size or m.vocab_size)
    if not vocab:
        raise UserError("the planner needs the vocabulary size: set --model.vocab_size")
    ctx_len = int(context or m.block_size)
    kv = 2 * m.n_layer * batch * ctx_len * m.n_embd * bytes_per_elem
    return InferencePlan(num_params(m, vocab)["total"] * bytes_per_elem, kv, ctx_len, batch)


def auto_micro_batch(cfg, ctx) -> int:
    """`train.micro_batch = auto`: the largest power of two, up to AUTO_MAX_MICRO_BATCH, whose
    predicted peak leaves HEADROOM of the memory free (CUDA: the device's free memory; CPU:
    MemAvailable, the RAM the kernel can hand out without swapping)."""
    from stalwart.memory.plan import largest_micro_batch, runtime_budget

    label, budget = runtime_budget(ctx.device)
    usable = int(budget * (1 - HEADROOM))
    largest = largest_micro_batch(cfg, usable, **_parallel_kwargs(cfg, ctx))
    if largest < 1:
        raise UserError(_too_big(cfg, label, budget, ctx))
    return min(1 << (largest.bit_length() - 1), AUTO_MAX_MICRO_BATCH)


def check_fits(cfg, micro_batch: int, ctx) -> None:
    """Refuse (UserError, before anything is allocated) a step predicted not to fit the device."""
    from stalwart.memory.plan import largest_micro_batch, runtime_budget

    label, budget = runtime_budget(ctx.device)
    kw = _parallel_kwargs(cfg, ctx)
    plan = training_memory(cfg, micro_batch=micro_batch, **kw)
    if plan.total_bytes <= budget:
        return
    largest = largest_micro_batch(cfg, budget, **kw)
    if largest < 1:
        raise UserError(_too_big(cfg, label, budget, ctx))
    raise UserError(
        f"--train.micro_batch {micro_batch} needs {gb(plan.total_bytes)} but {label} has "
        f"{gb(budget)}: the largest micro-batch that fits is {largest} (raise "
        f"--train.grad_accum to keep the batch), or see `stalwart plan`"
    )


def _too_big(cfg, label: str, budget: int, ctx) -> str:
    one = training_memory(cfg, micro_batch=1, **_parallel_kwargs(cfg, ctx)).total_bytes
    return (
        f"this model needs {gb(one)} even at --train.micro_batch 1 but {label} has "
        f"{gb(budget)}: use --model.activation_checkpointing full, shard it "
        "(--parallel.mode fsdp), or a smaller model; see `stalwart plan`"
    )


def _parallel_kwargs(cfg, ctx) -> dict:
    zero = {"zero1": 1, "fsdp": 3}.get(cfg.parallel.mode, 0)
    return {"world_size": ctx.world_size, "zero": zero, "device_type": ctx.device.type}


def gb(n: float) -> str:
    """Bytes for people: GiB above 1 GiB, MiB below."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"
