"""Hardware facts in tables: peak FLOP/s by device and dtype, memory by device.

An unknown device gets no peak (and so no MFU) rather than a guess: nanoGPT divides by an A100's
peak whatever the hardware (users saw 104% MFU on an H100), torchtitan falls back to the A100
figure for GPUs it does not know. Here an unknown device reports `mfu: null` with a one-line hint
to pass the peak (`--train.peak_flops`). On a CPU the peak is measured, not looked up: a timed
fp32 matmul with the thread count in use, cached per machine (see `measure_cpu_peak`).
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

TF = 1e12
# Dense (no 2:4 sparsity) peak FLOP/s from the vendors' datasheets, per GPU. "fp32" is plain IEEE
# fp32 on the CUDA cores; "tf32" is what fp32 matmuls get when TF32 is allowed (Ampere and later);
# "bf16"/"fp16" are tensor-core figures with fp32 accumulation, which is what autocast uses (the
# GeForce cards run fp16-accumulate twice as fast; PyTorch does not use it).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250 * TF, "fp16": 2250 * TF, "tf32": 1100 * TF},
    "H200 NVL": {"bf16": 835 * TF, "fp16": 835 * TF, "tf32": 418 * TF, "fp32": 60 * TF},
    "H200": {"bf16": 989 * TF, "fp16": 989 * TF, "tf32": 494 * TF, "fp32": 67 * TF},
    "H100 SXM": {"bf16": 989 * TF, "fp16": 989 * TF, "tf32": 494 * TF, "fp32": 67 * TF},
    "H100 PCIe": {"bf16": 756 * TF, "fp16": 756 * TF, "tf32": 378 * TF, "fp32": 51 * TF},
    "H100 NVL": {"bf16": 835 * TF, "fp16": 835 * TF, "tf32": 418 * TF, "fp32": 60 * TF},
    "H800": {"bf16": 989 * TF, "fp16": 989 * TF, "tf32": 494 * TF, "fp32": 67 * TF},
    "A100": {"bf16": 312 * TF, "fp16": 312 * TF, "tf32": 156 * TF, "fp32": 19.5 * TF},
    "A800": {"bf16": 312 * TF, "fp16": 312 * TF, "tf32": 156 * TF, "fp32": 19.5 * TF},
    "A10G": {"bf16": 70 * TF, "fp16": 70 * TF, "tf32": 35 * TF, "fp32": 31.2 * TF},
    "A10": {"bf16": 125 * TF, "fp16": 125 * TF, "tf32": 62.5 * TF, "fp32": 31.2 * TF},
    "RTX A6000": {"bf16": 154.8 * TF, "fp16": 154.8 * TF, "tf32": 77.4 * TF, "fp32": 38.7 * TF},
    "L40S": {"bf16": 362 * TF, "fp16": 362 * TF, "tf32": 183 * TF, "fp32": 91.6 * TF},
    "L40": {"bf16": 181 * TF, "fp16": 181 * TF, "tf32": 90.5 * TF, "fp32": 90.5 * TF},
    "L4": {"bf16": 121 * TF, "fp16": 121 * TF, "tf32": 60 * TF, "fp32": 30.3 * TF},
    "RTX 4090": {"bf16": 165 * TF, "fp16": 165 * TF, "tf32": 82.6 * TF, "fp32": 82.6 * TF},
    "RTX 3090": {"bf16": 71 * TF, "fp16": 71 * TF, "tf32": 35.6 * TF, "fp32": 35.6 * TF},
    "V100": {"fp16": 125 * TF, "fp32": 15.7 * TF},  # SXM2; no bf16, no tf32
    "T4": {"fp16": 65 * TF, "fp32": 8.1 * TF},
    "MI300X": {"bf16": 1307 * TF, "fp16": 1307 * TF, "fp32": 163.4 * TF},
}

# Device memory in bytes (what the planner's "fits?" compares against).
GiB = 1024**3
DEVICE_MEMORY: dict[str, int] = {
    "A100-40GB": 40 * GiB,
    "A100-80GB": 80 * GiB,
    "H100": 80 * GiB,
    "H200": 141 * GiB,
    "L4": 24 * GiB,
    "L40S": 48 * GiB,
    "RTX 4090": 24 * GiB,
    "RTX 3090": 24 * GiB,
    "V100-16GB": 16 * GiB,
    "V100-32GB": 32 * GiB,
    "T4": 16 * GiB,
    "A10G": 24 * GiB,
}

PEAK_HINT = "pass the device's peak FLOP/s for this dtype with --train.peak_flops (e.g. 312e12)"


def match_device(name: str) -> str | None:
    """Map a device name ('NVIDIA H100 80GB HBM3') to a PEAK_FLOPS key, or None if unknown."""
    n = name.upper()
    if "H100" in n:  # the three H100s differ by 30%: the form factor is in the name
        if "PCIE" in n:
            return "H100 PCIe"
        return "H100 NVL" if "NVL" in n else "H100 SXM"
    # longest key first, so 'A100' is not taken for 'A10' nor 'L40S' for 'L4'
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.upper().replace("RTX ", "") in n:
            return key
    return None


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of a named device for the dtype the matmuls actually run in, or None."""
    key = match_device(device_name)
    if key is None:
        return None
    return PEAK_FLOPS[key].get(dtype)


def cuda_matmul_dtype(precision: str) -> str:
    """fp32 training runs its matmuls in TF32 when the user allowed it (either torch switch)."""
    if precision != "fp32":
        return precision
    with warnings.catch_warnings():  # allow_tf32 is deprecated in favour of fp32_precision
        warnings.simplefilter("ignore")
        tf32 = torch.backends.cuda.matmul.allow_tf32
        tf32 |= getattr(torch.backends.cuda.matmul, "fp32_precision", "") == "tf32"
    return "tf32" if tf32 or torch.get_float32_matmul_precision() != "highest" else "fp32"


# ---- CPU: a measured peak ------------------------------------------------------------------------

# The shapes the calibration times: a square that reaches the BLAS's best (2048^2 does no better
# here), and the (B*T, C) x (C, 4C) shape of a small GPT's MLP. The peak is the best of them, so
# MFU is never flattered by a calibration matmul that happened to be slower than the model's own.
CALIBRATION_SHAPES = ((1024, 1024, 1024), (4096, 256, 1024))
CALIBRATION_SECONDS = 1.5
CALIBRATION_VERSION = 3  # in the cache key: figures from an older method are measured again


# fp32 matmuls a run may use besides torch.mm: callables (a, b) -> a thunk computing a @ b, or
# None where the backend is unavailable. model/cpu_kernels registers OpenBLAS's (the Linears of
# train.cpu_kernels): the calibrated peak is the fastest matmul a run can call, so a kernel that
# beats torch's BLAS raises the peak instead of pushing MFU past what the CPU can do.
MATMUL_BACKENDS: list = []


def _matmul_rate(m: int, k: int, n: int, seconds: float, clock=time.perf_counter) -> float:
    """Best FLOP/s of single (m x k) @ (k x n) matmuls over `seconds` (at least 3 of them per
    backend): torch.mm and each of MATMUL_BACKENDS."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    thunks = [lambda: torch.mm(a, b, out=out)]
    thunks += [t for t in (backend(a, b) for backend in MATMUL_BACKENDS) if t is not None]
    best = 0.0
    for thunk in thunks:
        thunk()  # warm-up: thread pool, page faults, caches, clocks
        reps = 0
        deadline = time.perf_counter() + seconds / len(thunks)
        while reps < 3 or (time.perf_counter() < deadline and reps < 200):
            t0 = clock()
            thunk()
            best = max(best, 2 * m * k * n / max(clock() - t0, 1e-9))
            reps += 1
    return best


def physical_cores() -> int:
    """Cores this process may run on, hyper-threads counted once (they share the FMA units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count())
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(len(cores), 1)


def measure_cpu_peak(seconds: float | None = None, shapes=None) -> float:
    """Sustained fp32 matmul FLOP/s of this CPU with the current torch thread count.

    Best-of many single matmuls per shape, best over the shapes: the best a timing can show is
    what the hardware *can* do (a noisy neighbour only ever makes a matmul slower), so best-of is
    the right statistic for a peak, as a median is for a run. Two measurements, the higher wins:
      * wall clock with the threads in use: the BLAS's real multi-threaded peak, when it gets
        the cores to itself;
      * one thread timed by its own CPU time (`time.thread_time`, blind to the time the
        scheduler gives to other processes), times the cores those threads can occupy: on a
        shared, busy machine the wall-clock figure reads low, and a low peak would inflate every
        MFU measured against it. On a quiet 2-core machine the two agree within ~2%.
    """
    shapes = shapes or CALIBRATION_SHAPES
    per_shape = (seconds or CALIBRATION_SECONDS) / (2 * len(shapes))
    threads = torch.get_num_threads()
    wall = max(_matmul_rate(m, k, n, per_shape) for m, k, n in shapes)
    torch.set_num_threads(1)
    try:
        single = max(_matmul_rate(m, k, n, per_shape, time.thread_time) for m, k, n in shapes)
    finally:
        torch.set_num_threads(threads)
    return max(wall, single * min(threads, physical_cores()))


def _cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stalwart"
    return root / "cpu_peak.json"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for records and cache keys."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cache_key() -> str:
    """Machine, CPU, core count, torch build (its BLAS) and the thread count in use."""
    parts = (platform.node(), cpu_model(), os.cpu_count(), torch.__version__)
    return "|".join(map(str, parts)) + f"|threads={torch.get_num_threads()}|v{CALIBRATION_VERSION}"


def cpu_peak_flops(refresh: bool = False) -> float:
    """Calibrated fp32 peak of this CPU with the current thread count, cached per machine.

    A calibration taken while the machine was busy reads low, which would inflate every MFU
    after it: `refresh=True` measures again and keeps the higher of the two figures.
    """
    key = cpu_cache_key()
    path = _cache_path()
    cache: dict = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    if key in cache and not refresh:
        return float(cache[key])
    peak = max(measure_cpu_peak(), float(cache.get(key, 0.0)))
    cache[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)  # concurrent runs never read a half-written cache
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return peak


# ---- The peak a run's MFU is measured against ----------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
    return device.type


def describe_peak(
    device: torch.device, precision: str, override: float = 0.0
) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where it comes from / what to do): an override, the table for the
    dtype the matmuls run in, or (CPU, fp32) the calibration."""
    if override > 0:
        return override, "--train.peak_flops"
    name = device_name(device)
    if device.type == "cpu":
        if precision != "fp32":
            return None, f"no {precision} peak for {name} (only fp32 is calibrated); {PEAK_HINT}"
        return cpu_peak_flops(), f"calibrated fp32 matmul, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return table_peak(name, cuda_matmul_dtype(precision))
    return None, f"no peak known for {name}; {PEAK_HINT}"


def table_peak(name: str, dtype: str) -> tuple[float | None, str]:
    """(peak, source) for a GPU by name from the datasheet table; (None, hint) if unknown."""
    key = match_device(name)
    peak = PEAK_FLOPS[key].get(dtype) if key else None
    if peak is None:
        return None, f"no {dtype} peak known for {name!r}; {PEAK_HINT}"
    return peak, f"datasheet {key} {dtype}"


def device_peak(device: torch.device, precision: str, override: float = 0.0) -> float | None:
    """The peak MFU is measured against, or None (then MFU is null, never a guess)."""
    return describe_peak(device, precision, override)[0]
