"""Measuring peak memory: `PeakMemory` over a block, `memory_record` for the metrics.

CUDA has exact counters; on CPU the kernel's resident-set high-water mark (VmHWM) is exact once
glibc is told to map large blocks (`enable_exact_cpu_peak`). The prediction of the same peak is
memory.planner.
"""

from __future__ import annotations

import ctypes
import gc
import warnings

import torch

from stalwart.errors import UserError

MiB = 1024**2


def proc_status_bytes(key: str) -> int:
    """A byte figure of this process from /proc/self/status (`VmRSS:`, `VmHWM:`, ...)."""
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
    return proc_status_bytes("VmHWM:")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


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
            for t in (obj, obj.grad if obj.requires_grad and obj.is_leaf else None):
                if t is not None and t.layout == torch.strided:
                    s = t.untyped_storage()
                    try:
                        seen[s.data_ptr()] = s.nbytes()
                    except RuntimeError:  # a wrapper (FSDP's DTensor): its local shard counts
                        continue
    return sum(seen.values())


# PeakMemory and the metrics' memory_record both reset the same per-process peak counter
# (VmHWM, or CUDA's peak stats): each hands the other the peak it is about to erase.
_OPEN_WINDOWS: list = []  # PeakMemory blocks now running
_ERASED = {"cpu": 0, "cuda": 0}  # peaks PeakMemory reset away since the last memory_record


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
    is then False, and a warning says so). It counts all memory, so a library's first-call
    scratch shows up too: warm up with a step first. Linux only.
    """

    def __init__(self, device: torch.device | str = "cpu", baseline_bytes: int | None = None):
        self.device = torch.device(device)
        self._given_baseline = baseline_bytes
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.exact = True
        self._rss0 = 0
        self._hwm_seen = 0  # high-water marks read just before someone else reset it

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            _erase("cuda", torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            _OPEN_WINDOWS.append(self)
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
                "reuse unseen; call stalwart.memory.measure.enable_exact_cpu_peak() before "
                "building the model (or set MALLOC_MMAP_THRESHOLD_=65536)",
                stacklevel=2,
            )
        _erase("cpu", peak_rss_bytes())
        if not reset_peak_rss():
            raise UserError("measuring CPU peak memory needs Linux's /proc/self/clear_refs")
        self._rss0 = proc_status_bytes("VmRSS:")
        _OPEN_WINDOWS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _OPEN_WINDOWS.remove(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes = max(peak, self._hwm_seen)
            return
        rise = max(peak_rss_bytes(), self._hwm_seen) - self._rss0
        rise = max(rise, 0)
        self.peak_bytes = self.baseline_bytes + rise


def memory_record(device: torch.device) -> dict:
    """The peak since the last call, for a metrics record (then reset; cheap: no sync beyond
    the one the log interval already does).

    CUDA: `peak_memory_bytes`, torch.cuda.max_memory_allocated (tensor bytes, what the planner
    predicts). CPU: `peak_rss_bytes`, the process's VmHWM: everything resident (the Python
    interpreter, libraries, the dataset's pages), not tensor bytes alone, so it sits a few
    hundred MB above the planner's figure. Elsewhere: nothing.
    """
    if device.type == "cuda":
        peak = max(torch.cuda.max_memory_allocated(device), _ERASED["cuda"])
        _hand_over(peak, "cuda")
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_memory_bytes": int(peak)}
    if device.type == "cpu":
        try:
            peak = max(peak_rss_bytes(), _ERASED["cpu"])
        except OSError:
            return {}
        _hand_over(peak, "cpu")
        reset_peak_rss()
        return {"peak_rss_bytes": int(peak)}
    return {}


def _erase(kind: str, peak: int) -> None:
    """PeakMemory is about to reset the counter: keep its peak for the next memory_record."""
    _ERASED[kind] = max(_ERASED[kind], int(peak))


def _hand_over(peak: int, kind: str) -> None:
    """memory_record is about to reset the counter: running PeakMemory blocks keep the peak."""
    _ERASED[kind] = 0
    for window in _OPEN_WINDOWS:
        if window.device.type == kind:
            window._hwm_seen = max(window._hwm_seen, peak)
