"""The memory a step may use, and the micro-batch that fits in it.

A budget is (label, bytes): what this process can use now (`runtime_budget`: free CUDA memory,
or the machine's available RAM) or what a named device has (`named_budget`, for `plan`).
`largest_micro_batch` searches the planner's prediction against it; `auto_micro_batch` is
`train.micro_batch = auto`, and `check_fits` refuses a step predicted not to fit before anything
is allocated.
"""

from __future__ import annotations

import torch

from stalwart.errors import UserError
from stalwart.hardware import DEVICE_MEMORY
from stalwart.memory.planner import StepSpec, gb, training_memory

# auto micro-batch leaves this share of the budget free: fragmentation in the CUDA caching
# allocator, the CUDA context itself (not counted by max_memory_allocated), and the planner's
# own +-10%.
HEADROOM = 0.10
# auto never goes past this: a tiny model "fits" 10^5 sequences in a CPU's RAM, but past a few
# hundred sequences a bigger micro-batch buys no throughput, only slower steps
AUTO_MAX_MICRO_BATCH = 256
MAX_MICRO_BATCH = 1 << 16  # where the search for the largest micro-batch stops


def cpu_available_bytes() -> int:
    """MemAvailable: what the kernel can hand out without swapping (page cache included)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise UserError("cannot read MemAvailable from /proc/meminfo: pass --train.micro_batch N")


def runtime_budget(device: torch.device) -> tuple[str, int]:
    """(label, bytes) this process can use now: free CUDA memory, or the system's available
    RAM on CPU (a CPU run shares the machine; MemAvailable is what it can take unswapped)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return f"{torch.cuda.get_device_name(device)} (free memory)", int(free)
    return "this machine (available RAM)", cpu_available_bytes()


def named_budget(name: str) -> tuple[str, int]:
    """`--device NAME`: a DEVICE_MEMORY entry (case and spaces ignored), or `cpu`."""
    if name.lower() == "cpu":
        return "this machine (available RAM)", cpu_available_bytes()
    key = name.lower().replace(" ", "").replace("-", "")
    for known, size in DEVICE_MEMORY.items():
        if known.lower().replace(" ", "").replace("-", "") == key:
            return f"{known} ({size / 1024**3:.0f} GiB)", size
    raise UserError(f"unknown --device {name!r}: use cpu or one of {', '.join(DEVICE_MEMORY)}")


def largest_micro_batch(step: StepSpec, budget_bytes: int) -> int:
    """The largest micro-batch whose predicted peak is within budget (0: not even 1).

    Peak memory grows with the micro-batch, so: double until it does not fit, then bisect."""

    def fits(b: int) -> bool:
        return training_memory(step, b).total_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo = 1
    while lo < MAX_MICRO_BATCH and fits(lo * 2):
        lo *= 2
    hi = min(lo * 2, MAX_MICRO_BATCH + 1)  # lo fits, hi does not (or is past the cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def auto_choice(largest: int) -> int:
    """What `auto` takes when `largest` fits: its largest power of two, up to the cap."""
    return min(1 << (largest.bit_length() - 1), AUTO_MAX_MICRO_BATCH)


def auto_micro_batch(step: StepSpec, device: torch.device) -> int:
    """`train.micro_batch = auto`: the largest power of two, up to AUTO_MAX_MICRO_BATCH, whose
    predicted peak leaves HEADROOM of the memory free (CUDA: the device's free memory; CPU:
    MemAvailable, the RAM the kernel can hand out without swapping). `step` is planned for
    `device` (its device_type is device.type)."""
    label, budget = runtime_budget(device)
    largest = largest_micro_batch(step, int(budget * (1 - HEADROOM)))
    if largest < 1:
        raise UserError(_too_big(step, label, budget))
    return auto_choice(largest)


def check_fits(step: StepSpec, micro_batch: int, device: torch.device) -> None:
    """Refuse (UserError, before anything is allocated) a step predicted not to fit `device`."""
    label, budget = runtime_budget(device)
    plan = training_memory(step, micro_batch)
    if plan.total_bytes <= budget:
        return
    largest = largest_micro_batch(step, budget)
    if largest < 1:
        raise UserError(_too_big(step, label, budget))
    raise UserError(
        f"--train.micro_batch {micro_batch} needs {gb(plan.total_bytes)} but {label} has "
        f"{gb(budget)}: the largest micro-batch that fits is {largest} (raise "
        f"--train.grad_accum to keep the batch), or see `stalwart plan`"
    )


def _too_big(step: StepSpec, label: str, budget: int) -> str:
    one = training_memory(step, 1).total_bytes
    return (
        f"this model needs {gb(one)} even at --train.micro_batch 1 but {label} has "
        f"{gb(budget)}: use --model.activation_checkpointing full, shard it "
        "(--parallel.mode fsdp), or a smaller model; see `stalwart plan`"
    )
