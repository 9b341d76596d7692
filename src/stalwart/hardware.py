"""Hardware facts in tables: peak FLOP/s by device and dtype, memory by device.

An unknown device gets no peak (and so no MFU) rather than a guess: nanoGPT divides by an A100's
peak whatever the hardware, and users saw 104% MFU on an H100. On a CPU the peak is measured: a
timed fp32 matmul at start (cached per machine), and MFU is reported against that.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

TF = 1e12
# Dense (no sparsity) peak FLOP/s from the vendors' datasheets. "fp32" is plain IEEE fp32
# (CUDA cores); "tf32" is what fp32 matmuls get with allow_tf32 on Ampere and later.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989 * TF, "fp16": 989 * TF, "tf32": 494 * TF, "fp32": 67 * TF},
    "H100 SXM": {"bf16": 989 * TF, "fp16": 989 * TF, "tf32": 494 * TF, "fp32": 67 * TF},
    "H100 PCIe": {"bf16": 756 * TF, "fp16": 756 * TF, "tf32": 378 * TF, "fp32": 51 * TF},
    "H100 NVL": {"bf16": 835 * TF, "fp16": 835 * TF, "tf32": 418 * TF, "fp32": 60 * TF},
    "A100": {"bf16": 312 * TF, "fp16": 312 * TF, "tf32": 156 * TF, "fp32": 19.5 * TF},
    "A10G": {"bf16": 70 * TF, "fp16": 70 * TF, "tf32": 35 * TF, "fp32": 31.2 * TF},
    "L40S": {"bf16": 362 * TF, "fp16": 362 * TF, "tf32": 183 * TF, "fp32": 91.6 * TF},
    "L4": {"bf16": 121 * TF, "fp16": 121 * TF, "tf32": 60 * TF, "fp32": 30.3 * TF},
    "RTX 4090": {"bf16": 165 * TF, "fp16": 165 * TF, "tf32": 82.6 * TF, "fp32": 82.6 * TF},
    "RTX 3090": {"bf16": 71 * TF, "fp16": 71 * TF, "tf32": 35.6 * TF, "fp32": 35.6 * TF},
    "V100": {"fp16": 125 * TF, "fp32": 15.7 * TF},
    "T4": {"fp16": 65 * TF, "fp32": 8.1 * TF},
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


def match_device(name: str) -> str | None:
    """Map a device name ('NVIDIA H100 80GB HBM3') to a PEAK_FLOPS key, or None if unknown."""
    n = name.upper()
    if "H100" in n:
        if "PCIE" in n:
            return "H100 PCIe"
        return "H100 NVL" if "NVL" in n else "H100 SXM"
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


def _cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stalwart"
    return root / "cpu_peak.json"


def measure_cpu_peak(n: int = 1024, seconds: float = 1.0) -> float:
    """Best-of timed fp32 matmuls (n x n): what this CPU's BLAS can actually sustain."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b  # warm-up: thread pool, caches, frequency
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * n**3 / dt)
    return best


def cpu_peak_flops(refresh: bool = False) -> float:
    """Calibrated fp32 peak of this CPU with the current thread count, cached per machine."""
    key = f"{platform.node()}|{platform.processor()}|{os.cpu_count()}|{torch.get_num_threads()}"
    path = _cache_path()
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    if key in cache and not refresh:
        return float(cache[key])
    peak = measure_cpu_peak()
    cache[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2))
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return peak


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_peak(device: torch.device, precision: str, override: float = 0.0) -> float | None:
    """The peak MFU is measured against: an override, the table, or (CPU) the calibration."""
    if override > 0:
        return override
    if device.type == "cpu":
        return cpu_peak_flops() if precision == "fp32" else None
    if device.type == "cuda":
        dtype = precision
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            dtype = "tf32"
        return peak_flops(device_name(device), dtype)
    return None
