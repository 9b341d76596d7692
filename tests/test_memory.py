"""The memory planner against hand counts, saved-tensor hooks and the allocator; PeakMemory;
activation checkpointing's gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from stalwart.config import ModelConfig, load_config
from stalwart.errors import UserError
from stalwart.memory.budget import (
    AUTO_MAX_MICRO_BATCH,
    auto_micro_batch,
    check_fits,
    largest_micro_batch,
)
from stalwart.memory.planner import plan_inference, plan_training, step_of
from stalwart.model.gpt import build_model
from stalwart.optim.build import build_optimizer
from stalwart.parallel import DistContext
from stalwart.precision import build_precision
from stalwart.train import forward_backward

CPU = DistContext(device=torch.device("cpu"))


def cfg_of(*args: str):
    return load_config(None, ["--train.precision", "fp32", "--run.device", "cpu", *args])


ONE_LAYER = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16"]
ONE_LAYER += ["--model.block_size", "8", "--model.vocab_size", "32"]


def test_hand_counts_one_layer_16_wide():
    """B=4, T=8, C=16, V=32, 1 layer, fp32, AdamW: every figure counted by hand."""
    plan = plan_training(cfg_of(*ONE_LAYER), micro_batch=4)
    C, V, T, N, h = 16, 32, 8, 32, 2
    block = (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (2 * C) + (C * 4 * C + 4 * C)
    block += 4 * C * C + C  # ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj
    params = V * C + T * C + block + 2 * C  # wte (tied head), wpe, the block, ln_f
    assert params == 3952 and plan.params == params
    c = plan.components
    assert c["weights"] == 4 * params == 15808
    assert c["gradients"] == 4 * params
    assert c["optimizer"] == 2 * 4 * params == 31616  # exp_avg + exp_avg_sq, fp32
    f = 4  # every activation is fp32 here
    # fmt: off
    saved = (
        N * 8  # targets.reshape(-1): a copy (int64)
        + T * 8  # position ids (int64)
        + N * C * f  # the block's input (ln_1 input)
        + 2 * N * f + N * C * f  # ln_1 mean, rstd; its output (c_attn's input)
        + 3 * N * C * f  # qkv (SDPA keeps q, k, v as views of it)
        + N * C * f + h * N * f  # SDPA output, logsumexp (B x h x T, fp32)
        + N * C * f  # the residual after attention (ln_2 input)
        + 2 * N * f + N * C * f  # ln_2 mean, rstd, output
        + 4 * N * C * f + 4 * N * C * f  # c_fc output (GELU input), GELU output
        + N * C * f  # the block's output (ln_f input)
        + 2 * N * f + N * C * f  # ln_f mean, rstd, output (lm_head's input)
    )
    # fmt: on
    assert c["activations"] == saved == 38208
    assert c["logits"] == 3 * N * V * f  # d log-softmax, d logits + the kept log-softmax
    assert plan.total_bytes == pytest.approx(sum(plan.at_peak.values()))
    # the peak: backward has just made d log_softmax and d logits next to everything saved
    assert plan.peak_phase == "backward: loss"
    assert plan.at_peak["activations"] == saved and plan.at_peak["logits"] == 3 * N * V * f
    assert plan.at_peak["gradients"] == 0
    batch = 4 * (T + 1) * 8  # the loader's (B, T + 1) int64 rows; x and y are views
    assert plan.total_bytes == 4 * params + 8 * params + saved + 3 * N * V * f + batch
    inf = plan_inference(cfg_of(*ONE_LAYER), context=8)
    assert inf.weights_bytes == 2 * params and inf.kv_cache_bytes == 2 * 1 * 8 * C * 2


def _saved_tensor_bytes(model, x, y) -> int:
    """Unique storages autograd keeps for backward, parameters and the input batch left out."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and t.dim() > 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(seen.values())


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("extra", [[], ["--model.bias", "false"], ["--model.dropout", "0.1"]])
def test_planned_activations_are_what_autograd_saves(extra, kernels):
    cfg = cfg_of(*ONE_LAYER, "--model.n_layer", "2", *extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, 32).train()
    model.set_cpu_kernels(kernels)  # train.cpu_kernels saves what torch's ops save
    rows = torch.randint(0, 32, (4, 9))
    saved = _saved_tensor_bytes(model, rows[:, :-1], rows[:, 1:])
    plan = plan_training(cfg, micro_batch=4)
    log_softmax = 4 * 8 * 32 * 4
    assert plan.components["activations"] + log_softmax == saved


def _allocator_peak(cfg, B: int) -> int:
    """Exact peak of tensor bytes during a train.py step: the profiler's allocator timeline
    (started after zero_grad, so it sees every free) on top of weights + optimizer state."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.model.vocab_size)
    model.set_fused_gelu(cfg.train.fused_gelu)
    model.set_cpu_kernels(cfg.train.cpu_kernels)
    opt = build_optimizer(cfg.optim, model)
    prec = build_precision(cfg.train.precision, torch.device("cpu"))
    T, accum = cfg.model.block_size, cfg.train.grad_accum

    def step():
        rows = torch.randint(0, cfg.model.vocab_size, (B * accum, T + 1))
        batches = [(r[:, :-1], r[:, 1:]) for r in rows.split(B)]
        forward_backward(model, batches, prec, accum, CPU)
        prec.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        prec.scaler.step(opt)
        prec.scaler.update()

    step()
    opt.zero_grad(set_to_none=True)
    held = sum(p.numel() * 4 for p in model.parameters())
    held += sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return held + peak


@pytest.mark.parametrize("ckpt", ["none", "full", "selective", "every:2"])
@pytest.mark.parametrize("fused_gelu", ["false", "true"])
def test_planned_peak_matches_the_allocator(ckpt, fused_gelu):
    cfg = cfg_of(
        *ONE_LAYER,
        "--model.n_layer",
        "3",
        "--model.n_embd",
        "64",
        "--model.block_size",
        "64",
        "--model.vocab_size",
        "256",
        "--model.activation_checkpointing",
        ckpt,
        "--train.fused_gelu",
        fused_gelu,
    )
    measured = _allocator_peak(cfg, B=8)
    predicted = plan_training(cfg, micro_batch=8).total_bytes
    assert predicted == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize(
    "extra",
    [
        ["--train.precision", "bf16"],
        ["--train.precision", "bf16", "--model.activation_checkpointing", "selective"],
        ["--train.precision", "fp16", "--model.activation_checkpointing", "full"],
        ["--train.grad_accum", "2", "--model.dropout", "0.1", "--model.bias", "false"],
    ],
)
def test_planned_peak_matches_the_allocator_amp_accum_dropout(extra):
    """16-bit autocast (on CPU: slow, so tiny), accumulation, dropout, no biases."""
    cfg = cfg_of(
        *ONE_LAYER,
        "--model.n_layer",
        "2",
        "--model.n_embd",
        "32",
        "--model.block_size",
        "32",
        "--model.vocab_size",
        "128",
        *extra,
    )
    measured = _allocator_peak(cfg, B=4)
    predicted = plan_training(cfg, micro_batch=4).total_bytes
    assert predicted == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("spec", ["selective", "full", "every:2"])
def test_checkpointing_gives_identical_gradients(spec):
    base = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, dropout=0.1)
    torch.manual_seed(0)
    ref = build_model(base, 64).train()
    ck = build_model(ModelConfig(**{**base.__dict__, "activation_checkpointing": spec}), 64)
    ck.load_state_dict(ref.state_dict())
    ck.train()
    x = torch.randint(0, 64, (4, 16))
    for m in (ref, ck):
        torch.manual_seed(1)  # the same dropout masks: checkpoint replays the RNG state
        m(x, x)[1].backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ck.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_checkpointing_orders_memory():
    plans = {
        k: plan_training(
            cfg_of("--model.vocab_size", "256", "--model.activation_checkpointing", k),
            micro_batch=32,
        ).total_bytes
        for k in ("none", "selective", "every:2", "full")
    }
    assert plans["none"] > plans["selective"] > plans["full"]
    assert plans["none"] > plans["every:2"] > plans["full"]


def test_sharding_divides_the_state_per_rank():
    cfg = cfg_of(
        "--model.vocab_size",
        "50257",
        "--model.n_layer",
        "12",
        "--model.n_embd",
        "768",
        "--model.n_head",
        "12",
        "--model.block_size",
        "1024",
    )
    one = plan_training(cfg, micro_batch=1)
    W = one.components["weights"]
    z = {k: plan_training(cfg, micro_batch=1, world_size=8, zero=k) for k in range(4)}
    assert z[0].components["ddp_buckets"] == W  # DDP's flat copy of the gradients
    assert z[1].components["optimizer"] == one.components["optimizer"] // 8
    assert z[3].components["weights"] == W // 8
    assert z[0].total_bytes > z[1].total_bytes > z[2].total_bytes > z[3].total_bytes
    with pytest.raises(UserError):
        plan_training(cfg, micro_batch=1, zero=4)


def test_mixed_precision_keeps_16_bit_weight_copies():
    cfg = cfg_of("--model.vocab_size", "256")
    fp32 = plan_training(cfg, micro_batch=8)
    bf16 = plan_training(cfg, micro_batch=8, precision="bf16")
    assert fp32.components["weight_copies"] == 0 < bf16.components["weight_copies"]
    assert bf16.components["weights"] == fp32.components["weights"]  # fp32 masters
    assert bf16.components["activations"] < fp32.components["activations"]


def test_largest_micro_batch_is_the_boundary():
    cfg = cfg_of("--model.vocab_size", "256")
    budget = plan_training(cfg, micro_batch=37).total_bytes + 1
    largest = largest_micro_batch(step_of(cfg), budget)
    assert largest == 37
    assert largest_micro_batch(step_of(cfg), 1000) == 0


def test_auto_micro_batch_and_refusal():
    small = cfg_of("--model.vocab_size", "256", "--model.n_layer", "2", "--model.n_embd", "64")
    auto = auto_micro_batch(step_of(small), CPU.device)
    assert auto & (auto - 1) == 0 and 1 <= auto <= AUTO_MAX_MICRO_BATCH
    check_fits(step_of(small), 8, CPU.device)  # a few MB: fits anywhere
    huge = cfg_of(
        "--model.vocab_size",
        "50257",
        "--model.n_layer",
        "96",
        "--model.n_embd",
        "12288",
        "--model.n_head",
        "96",
    )
    with pytest.raises(UserError, match="even at --train.micro_batch 1"):
        check_fits(step_of(huge), 1, CPU.device)
    with pytest.raises(UserError, match="even at --train.micro_batch 1"):
        auto_micro_batch(step_of(huge), CPU.device)


MEASURE = """
import torch
from stalwart.memory.measure import PeakMemory, enable_exact_cpu_peak, memory_record
enable_exact_cpu_peak()
keep = torch.ones(5_000_000)  # 20 MB held on entry


def work():
    a = torch.ones(10_000_000)  # + 40 MB
    b = a * 2  # + 40 MB: the peak, 100 MB in all
    del a, b
    return torch.ones(2_500_000)  # 10 MB, below the peak


work()  # warm-up: first calls set up kernels and thread pools (a MB or two, once)
with PeakMemory("cpu") as pm:
    c = work()
    memory_record(torch.device("cpu"))  # train's metrics reset VmHWM: the window keeps its peak
    d = torch.ones(1_000_000)
print(pm.baseline_bytes, pm.peak_bytes, pm.exact)
"""


def test_peak_memory_cpu_is_exact():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    ).stdout.split()
    baseline, peak, exact = int(out[0]), int(out[1]), out[2] == "True"
    assert exact
    assert baseline >= 20_000_000 and baseline < 21_000_000  # + torch's own small tensors
    assert peak - baseline == pytest.approx(80_000_000, abs=600_000)


LLAMA = ["--model.arch", "llama", "--model.bias", "false", "--train.fused_gelu", "false"]
LLAMA += ["--model.n_head", "4", "--model.n_kv_head", "1"]


@pytest.mark.parametrize(
    "extra, rel",
    [
        ([], 0.01),
        (["--model.tie_embeddings", "false", "--optim.name", "muon"], 0.01),
        (["--train.grad_accum", "2"], 0.01),
        (["--model.activation_checkpointing", "full"], 0.10),
        (["--model.activation_checkpointing", "selective"], 0.10),
        (["--train.precision", "bf16"], 0.10),
    ],
)
def test_llama_planned_peak_matches_the_allocator(extra, rel):
    """Llama shapes (RMSNorm, RoPE, SwiGLU, GQA, untied head): the planner's llama layer."""
    cfg = cfg_of(*ONE_LAYER, "--model.n_layer", "3", "--model.n_embd", "64", "--model.block_size",
                 "64", "--model.vocab_size", "256", *LLAMA, *extra)  # fmt: skip
    if "bf16" in extra:  # 16-bit matmuls on this CPU are slow: a smaller step
        cfg = cfg_of(*ONE_LAYER, "--model.n_layer", "2", "--model.n_embd", "32",
                     "--model.vocab_size", "128", *LLAMA, *extra)  # fmt: skip
    measured = _allocator_peak(cfg, B=8)
    assert plan_training(cfg, micro_batch=8).total_bytes == pytest.approx(measured, rel=rel)


def test_llama_planned_activations_are_what_autograd_saves():
    cfg = cfg_of(*ONE_LAYER, "--model.n_layer", "2", "--model.n_embd", "32", *LLAMA)
    torch.manual_seed(0)
    model = build_model(cfg.model, 32).train()
    rows = torch.randint(0, 32, (4, 9))
    saved = _saved_tensor_bytes(model, rows[:, :-1], rows[:, 1:])
    rope_tables = 2 * 8 * 8 * 4  # cos and sin, (block_size, head_dim) fp32: buffers, shared
    log_softmax = 4 * 8 * 32 * 4
    assert (
        plan_training(cfg, micro_batch=4).components["activations"] + log_softmax + rope_tables
        == saved
    )
