"""Peak FLOP/s: the datasheet table by device and dtype, unknown devices, the CPU calibration."""

from __future__ import annotations

import json

import pytest
import torch

from stalwart import hardware
from stalwart.hardware import (
    describe_peak,
    match_device,
    measure_cpu_peak,
    table_peak,
)
from stalwart.logs.metrics import utilization

TF = 1e12


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("NVIDIA Quantum Q9000", None),
        ("", None),
    ],
)
def test_device_names_map_to_the_right_row(name, key):
    assert match_device(name) == key


def test_peak_is_chosen_by_the_dtype_the_matmuls_run_in():
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == 989 * TF
    assert table_peak("NVIDIA H100 PCIe", "bf16")[0] == 756 * TF
    assert table_peak("NVIDIA A100-SXM4-40GB", "bf16")[0] == 312 * TF
    assert table_peak("NVIDIA A100-SXM4-40GB", "tf32")[0] == 156 * TF
    assert table_peak("NVIDIA A100-SXM4-40GB", "fp32")[0] == 19.5 * TF
    assert table_peak("Tesla V100-SXM2-16GB", "bf16")[0] is None  # no bf16 units: no figure


def test_mfu_is_correct_for_a_listed_device_and_null_for_an_unknown_one():
    flops_per_step, step_time = 6 * 124e6 * 524288, 1.0
    peak, source = table_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert "H100 SXM" in source
    assert utilization(flops_per_step, step_time, peak) == pytest.approx(
        flops_per_step / 989e12, rel=1e-12
    )
    peak, hint = table_peak("NVIDIA Quantum Q9000", "bf16")
    assert peak is None and "--train.peak_flops" in hint and "Quantum Q9000" in hint
    assert utilization(flops_per_step, step_time, peak) is None


def test_fp32_matmuls_count_as_tf32_when_tf32_is_allowed():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert hardware.cuda_matmul_dtype("fp32") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert hardware.cuda_matmul_dtype("fp32") == "tf32"
        assert hardware.cuda_matmul_dtype("bf16") == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)


def test_override_wins_and_cpu_low_precision_has_no_peak():
    cpu = torch.device("cpu")
    assert describe_peak(cpu, "bf16", override=2e12) == (2e12, "--train.peak_flops")
    peak, hint = describe_peak(cpu, "bf16")
    assert peak is None and "--train.peak_flops" in hint


def test_calibration_is_the_best_shape_and_plausible():
    tiny = ((4, 4, 4),)  # call overhead dominates: ~1000x below the BLAS's peak
    big = ((512, 512, 512),)
    both = measure_cpu_peak(seconds=0.3, shapes=tiny + big)
    assert 1e9 < both < 5e12  # a CPU core does GFLOP/s to a few TFLOP/s, never outside
    # the best over the shapes, not the worst or the mean (x0.3: a busy neighbour's noise)
    assert both >= 0.3 * measure_cpu_peak(seconds=0.15, shapes=big)


def test_cpu_peak_is_cached_per_thread_count_and_refresh_keeps_the_best(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # a quick calibration (small shapes, 0.2 s) keeps the test fast; the real one times bigger
    monkeypatch.setattr(hardware, "CALIBRATION_SHAPES", ((256, 256, 256), (512, 64, 256)))
    monkeypatch.setattr(hardware, "CALIBRATION_SECONDS", 0.2)
    first = hardware.cpu_peak_flops()
    path = tmp_path / "stalwart" / "cpu_peak.json"
    cache = json.loads(path.read_text())
    key = hardware.cpu_cache_key()
    assert f"threads={torch.get_num_threads()}" in key and cache[key] == first
    assert hardware.cpu_peak_flops() == first  # cached: no second measurement
    cache[key] = 1e15  # as if a quieter moment had measured more: refresh must keep it
    path.write_text(json.dumps(cache))
    assert hardware.cpu_peak_flops(refresh=True) == 1e15
