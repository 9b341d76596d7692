import math

import pytest

from stalwart.config import load_config, with_overrides
from stalwart.optim.schedule import constant_lr, lr_at, schedule_lr, wsd_lr


def test_lr_at_edges():
    peak, warm, total, low = 1.0, 10, 110, 0.1
    assert lr_at(0, peak, warm, total, low) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(warm - 1, peak, warm, total, low) == pytest.approx(peak)
    assert lr_at(warm, peak, warm, total, low) == pytest.approx(peak)  # cosine starts at peak
    assert lr_at((warm + total) // 2, peak, warm, total, low) == pytest.approx((peak + low) / 2)
    assert lr_at(total, peak, warm, total, low) == pytest.approx(low)
    assert lr_at(total + 1, peak, warm, total, low) == low
    assert lr_at(10**9, peak, warm, total, low) == low


def test_lr_at_gpt2_numbers():
    """The lesson's GPT-2 124M reproduction: 6e-4 peak, 6e-5 min, 715 warmup, 143k steps."""
    f = lambda s: lr_at(s, 6e-4, 715, 143000, 6e-5)  # noqa: E731
    assert f(0) == pytest.approx(6e-4 / 715)
    assert f(357) == pytest.approx(6e-4 * 358 / 715)
    assert f(714) == pytest.approx(6e-4)
    assert f(715) == pytest.approx(6e-4)
    mid = 715 + (143000 - 715) // 2
    assert f(mid) == pytest.approx(3.3e-4, rel=1e-4)
    assert f(143000) == pytest.approx(6e-5)
    assert f(200000) == 6e-5
    # monotone: up during warmup, down after
    assert all(f(s) < f(s + 1) for s in range(0, 714, 50))
    assert all(f(s) > f(s + 1000) for s in range(715, 142000, 5000))


def test_constant_and_wsd():
    assert constant_lr(0, 1.0, 0) == 1.0
    assert constant_lr(4, 1.0, 10) == pytest.approx(0.5)
    assert constant_lr(500, 1.0, 10) == 1.0
    # wsd: warmup 10, stable until 80, linear decay to min over the last 20% of 100 steps
    assert wsd_lr(50, 1.0, 10, 100, 0.1, 0.2) == 1.0
    assert wsd_lr(79, 1.0, 10, 100, 0.1, 0.2) == 1.0
    assert wsd_lr(90, 1.0, 10, 100, 0.1, 0.2) == pytest.approx(0.55)
    assert wsd_lr(100, 1.0, 10, 100, 0.1, 0.2) == pytest.approx(0.1)


def test_schedule_lr_uses_config():
    cfg = load_config(
        None, ["--optim.lr", "1e-3", "--schedule.warmup_steps", "10", "--train.max_steps", "100"]
    )
    assert cfg.optim.final_lr == pytest.approx(1e-4)  # min_lr defaults to lr / 10
    assert schedule_lr(cfg.schedule, cfg.optim, 100, 100) == pytest.approx(1e-4)
    cfg = with_overrides(cfg, {"schedule.name": "constant"})
    assert schedule_lr(cfg.schedule, cfg.optim, 100, 100) == pytest.approx(1e-3)
    assert not math.isnan(schedule_lr(cfg.schedule, cfg.optim, 0, 100))
