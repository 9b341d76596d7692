"""Memory: measure the peak a training step holds, and predict it from the config alone.

`PeakMemory` measures (CUDA: the caching allocator's counters; CPU: the kernel's resident-set
high-water mark). `training_memory(cfg)` predicts the same figure without building anything: it
replays one training step of the GPT-2 block as a timeline of allocations and frees (see
`stalwart.memsim`) and reports the highest point, with what was held there. `inference_memory`,
`largest_micro_batch`, `auto_micro_batch` and `check_fits` are built on it.
"""

from __future__ import annotations

import ctypes
import gc
import warnings
from dataclasses import dataclass, field

import torch

from stalwart.errors import UserError

MiB, GiB = 1024**2, 1024**3
# auto micro-batch leaves this share of the budget free: fragmentation in the CUDA caching
# allocator, the CUDA context itself (not counted by max_memory_allocated), and the planner's
# own +-10%.
HEADROOM = 0.10
# auto never goes past this: a tiny model "fits" 10^5 sequences in a CPU's RAM, but past a few
# hundred sequences a bigger micro-batch buys no throughput, only slower steps
AUTO_MAX_MICRO_BATCH = 256


# ---------------------------------------------------------------------------------------------
# Measurement


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM: the most resident memory this process has held since start or the last reset."""
    return _proc_status_bytes("VmHWM:")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_EXACT = {"on": False}


def enable_exact_cpu_peak() -> None:
    """Make CPU peak measurement exact: call it before building models (or start the process
    with MALLOC_MMAP_THRESHOLD_=65536). Idempotent.

    glibc serves a request from a free chunk of its heap before it maps fresh pages, and a freed
    chunk stays resident, so once the heap holds freed tensors the resident set stops following
    the tensors (by default glibc raises its mmap threshold up to 32 MiB as large blocks are
    freed, so it soon does). With the threshold fixed at 64 KiB every tensor of 64 KiB or more is
    mapped on allocation and unmapped on free, and VmHWM follows tensor memory to within a few
    hundred KiB. The cost: a page fault per fresh page (a CPU training step runs ~30% slower),
    so `train` does not do this; `bench`, the accuracy benchmark and tests do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops the dynamic adjustment)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        _EXACT["on"] = True
    except (OSError, AttributeError):  # not glibc: the measurement is only less exact
        pass


def heap_free_bytes() -> int | None:
    """Free bytes inside glibc's heap (reusable without new pages), or None if unknown."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        return None


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can reach (parameters, their .grad, optimizer state,
    batches): what a step starts with. Storages shared by views or tied weights count once."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            for t in (obj, obj.grad if obj.requires_grad else None):
                if t is not None and t.layout == torch.strided:
                    s = t.untyped_storage()
                    try:
                        seen[s.data_ptr()] = s.nbytes()
                    except RuntimeError:  # a wrapper (FSDP's DTensor): its local shard counts
                        continue
    return sum(seen.values())


class PeakMemory:
    """`with PeakMemory(device) as pm: step()` then `pm.peak_bytes`, `pm.baseline_bytes`.

    peak_bytes is the most memory held by tensors while the block ran, counting what was already
    held on entry (weights, optimizer state): the meaning of torch.cuda.max_memory_allocated.

    CUDA: reset_peak_memory_stats + max_memory_allocated, exact.
    CPU: the baseline is every tensor storage reachable from Python (`live_tensor_bytes`), and the
    rise is VmHWM - VmRSS over the block, after resetting the high-water mark through
    /proc/self/clear_refs. This is exact (it agrees with the profiler's allocator timeline to
    ~0.1%) only if `enable_exact_cpu_peak()` ran before the model was built: otherwise glibc
    reuses freed memory unseen and the figure can be off by hundreds of MB either way (`exact`
    is then False, and a warning says so). It counts all memory, so a library's first-call scratch shows up too:
    warm up with a step first. Linux only.
    """

    def __init__(self, device: torch.device | str = "cpu", baseline_bytes: int | None = None):
        self.device = torch.device(device)
        self._given_baseline = baseline_bytes
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.exact = True
        self._rss0 = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return self
        if self.device.type != "cpu":
            raise UserError(f"peak memory is measured on cpu and cuda, not {self.device.type}")
        gc.collect()
        base = self._given_baseline
        self.baseline_bytes = live_tensor_bytes() if base is None else base
        enable_exact_cpu_peak()
        free = heap_free_bytes()
        self.exact = free is not None and free < 4 * MiB
        if not self.exact:
            warnings.warn(
                f"CPU peak memory is not exact: glibc's heap holds {free} freed bytes it can "
                "reuse unseen; call stalwart.memory.enable_exact_cpu_peak() before building the "
                "model (or set MALLOC_MMAP_THRESHOLD_=65536)",
                stacklevel=2,
            )
        if not reset_peak_rss():
            raise UserError("measuring CPU peak memory needs Linux's /proc/self/clear_refs")
        self._rss0 = _proc_status_bytes("VmRSS:")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        rise = max(peak_rss_bytes() - self._rss0, 0)
        self.peak_bytes = self.baseline_bytes + rise


# ---------------------------------------------------------------------------------------------
# Prediction


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
    from stalwart import memsim
    from stalwart.optim import optimizer_state_bytes_for

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
    tl = memsim.replay(step)
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
    cfg, *, context: int | None = None, batch: int = 1, vocab_size: int | None = None,
    bytes_per_elem: int = 2,
) -> InferencePlan:
    """bf16 weights + the KV cache for `context` tokens (default: block_size). Activations of
    one decoding step are a few vectors per layer and are left out."""
    from stalwart.model import num_params

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
    from stalwart.plan import largest_micro_batch, runtime_budget

    label, budget = runtime_budget(ctx.device)
    usable = int(budget * (1 - HEADROOM))
    largest = largest_micro_batch(cfg, usable, **_parallel_kwargs(cfg, ctx))
    if largest < 1:
        raise UserError(_too_big(cfg, label, budget, ctx))
    return min(1 << (largest.bit_length() - 1), AUTO_MAX_MICRO_BATCH)


def check_fits(cfg, micro_batch: int, ctx) -> None:
    """Refuse (UserError, before anything is allocated) a step predicted not to fit the device."""
    from stalwart.plan import largest_micro_batch, runtime_budget

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


def memory_record(device: torch.device) -> dict:
    """The peak since the last call, for a metrics record (then reset; cheap: no sync beyond
    the one the log interval already does).

    CUDA: `peak_memory_bytes`, torch.cuda.max_memory_allocated (tensor bytes, what the planner
    predicts). CPU: `peak_rss_bytes`, the process's VmHWM: everything resident (the Python
    interpreter, libraries, the dataset's pages), not tensor bytes alone, so it sits a few
    hundred MB above the planner's figure. Elsewhere: nothing.
    """
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_memory_bytes": int(peak)}
    if device.type == "cpu":
        try:
            peak = peak_rss_bytes()
        except OSError:
            return {}
        reset_peak_rss()
        return {"peak_rss_bytes": int(peak)}
    return {}
