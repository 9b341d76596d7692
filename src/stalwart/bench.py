"""`stalwart bench`: measured tokens/s, MFU, HFU, step-time breakdown and peak memory.

The bench times the real training step, not a copy of it: it calls `train()` itself on a throwaway
run directory, with evaluation and periodic checkpoints off, and reads the per-step metrics
records (log_interval 1) that the loop writes anyway. Step layout of one bench run:

    1 .. warmup                     warm-up (allocator, thread pools, compile), not timed
    warmup+1 .. warmup+steps        timed: tokens/s, MFU, HFU, phase breakdown
    warmup+steps+1                  peak memory (measured apart: the CPU method slows malloc)
    last                            the loop's end-of-run evaluation and save, not timed

`--compare X` runs the variants of X in one process, one after the other, and prints ratios.
"""

from __future__ import annotations

import copy
import ctypes
import statistics
import tempfile
import time
from contextlib import ExitStack

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from stalwart import parallel
from stalwart.config import Config, parse_activation_checkpointing
from stalwart.errors import UserError
from stalwart.hardware import describe_peak, device_name
from stalwart.metrics import PHASES, utilization
from stalwart.model import flops_per_token, hardware_flops_per_token
from stalwart.precision import resolve_precision

MiB = 1024**2


def bench_config(cfg: Config, run_dir: str, total_steps: int) -> Config:
    """The config of a bench run: the same model, data, batch, precision and features, with a
    throwaway run dir, a record every step, and no evaluation or checkpoint until the end."""
    cfg = copy.deepcopy(cfg)
    cfg.run.dir, cfg.run.resume = run_dir, "auto"
    cfg.train.max_steps = total_steps
    cfg.train.log_interval = 1
    cfg.train.eval_interval, cfg.train.eval_batches = 0, 1
    cfg.train.sample_tokens = 0
    cfg.ckpt.interval, cfg.ckpt.interval_minutes = 0, 0.0
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, total_steps - 1)
    return cfg


def _restore_fast_malloc() -> None:
    """The CPU peak-memory method pins glibc's mmap threshold low (every freed block goes back to
    the kernel, so RSS follows the tensors); set it back to where glibc's own adaptive threshold
    ends up, so the next variant of a --compare is not timed with a page fault per tensor."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * MiB)  # M_MMAP_THRESHOLD: glibc's adaptive maximum on 64-bit
        libc.mallopt(-1, 64 * MiB)  # M_TRIM_THRESHOLD: twice that, as glibc sets it
    except (OSError, AttributeError):
        pass


class _MemoryProbe:
    """Peak memory of one training step (stalwart.memory.PeakMemory) and the optimizer object
    (from torch's global step hook), so weights / gradients / optimizer state can be measured
    from the tensors themselves."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes, self.note = device, None, ""
        self.optimizer = None
        self._pm = None
        self._stack = ExitStack()
        hook = register_optimizer_step_post_hook(self._saw_optimizer)
        self._stack.callback(hook.remove)

    def _saw_optimizer(self, opt, args, kwargs) -> None:
        self.optimizer = opt

    def start(self) -> None:
        try:
            from stalwart.memory import PeakMemory

            self._pm = self._stack.enter_context(PeakMemory(self.device))
        except (ImportError, UserError) as e:
            self.note = f"peak memory not measured: {e}"

    def stop(self) -> None:
        self._stack.close()
        if self._pm is not None:
            self.peak_bytes = self._pm.peak_bytes
            _restore_fast_malloc()

    def close(self) -> None:
        self._stack.close()


def _tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measured_components(model: torch.nn.Module, opt, peak_bytes: int | None) -> dict:
    """Weights, gradients and optimizer state from the tensors' sizes; activations and
    temporaries are what the peak holds beyond them."""
    params = list(model.parameters())
    out = {
        "weights": _tensor_bytes(params),
        "gradients": _tensor_bytes(p.grad for p in params),
        "optimizer": _tensor_bytes(
            v for state in (opt.state.values() if opt else []) for v in state.values()
        ),
    }
    return _with_rest(out, peak_bytes)


STATE = ("weights", "gradients", "optimizer")


def _with_rest(parts: dict, peak: int | None) -> dict:
    """Add what the peak holds beyond weights, gradients and optimizer state, and the peak."""
    if peak is not None:
        parts["activations_and_temporaries"] = max(peak - sum(parts[k] for k in STATE), 0)
        parts["peak"] = peak
    return parts


def predicted_memory(cfg: Config, micro_batch: int, precision: str, vocab: int) -> dict | None:
    try:
        from stalwart.memory import training_memory
    except ImportError:
        return None
    plan = training_memory(cfg, micro_batch=micro_batch, precision=precision, vocab_size=vocab)
    parts = {k: int(plan.components.get(k, 0)) for k in STATE}
    return _with_rest(parts, int(plan.total_bytes))


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, memory: bool = True) -> dict:
    """Time `steps` training steps of `cfg` after `warmup`, then measure one step's peak memory."""
    from stalwart.train import train

    if steps < 1 or warmup < 1:
        raise UserError("--steps and --warmup must be at least 1 (the first step warms up)")
    device = parallel.pick_device(cfg.run.device)
    first, last = warmup + 1, warmup + steps
    total = last + (2 if memory else 1)
    records: list[dict] = []
    probe = _MemoryProbe(device)

    cpu_marks = []  # process CPU time (all threads) at the window's ends

    def after_step(step: int, record: dict) -> None:
        if first <= step <= last:
            records.append(record)
        if step in (first - 1, last):
            cpu_marks.append(time.process_time())
        if memory and step == last:
            probe.start()
        elif memory and step == last + 1:
            probe.stop()

    with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as run_dir:
        bcfg = bench_config(cfg, run_dir, total)
        try:
            result = train(bcfg, progress=False, hooks={"after_step": after_step})
        finally:
            probe.close()
    out = summarize(bcfg, records, result.model, probe, device, steps, warmup)
    if device.type == "cpu" and out["peak_flops"]:
        # CPU time the process got per step, over its threads: unlike the wall clock, it does
        # not count time the scheduler gave to other processes (a lower bound of what the step
        # would reach alone: threads that spin-wait for a descheduled partner still count)
        busy = (cpu_marks[1] - cpu_marks[0]) / steps / out["threads"]
        out["mfu_by_cpu_time"] = utilization(
            out["flops_per_token"] * out["tokens_per_step"], busy, out["peak_flops"]
        )
    return out


def summarize(cfg, records, model, probe, device, steps, warmup) -> dict:
    vocab = cfg.model.vocab_size
    precision = resolve_precision(cfg.train.precision, device)
    micro = int(cfg.train.micro_batch) if cfg.train.micro_batch != "auto" else None
    tokens_per_step = records[-1]["tokens"] // records[-1]["step"]  # the same every step
    times = [r["step_time_s"] for r in records]
    step_time = statistics.fmean(times)  # the mean: what a long run of these steps would take
    fpt = flops_per_token(cfg.model, vocab)
    hw_fpt = hardware_flops_per_token(cfg.model, vocab)
    peak, peak_note = describe_peak(device, precision, cfg.train.peak_flops)
    out = {
        "tokens_per_sec": tokens_per_step / step_time,
        "mfu": utilization(fpt * tokens_per_step, step_time, peak),
        "hfu": utilization(hw_fpt * tokens_per_step, step_time, peak),
        "peak_memory_bytes": probe.peak_bytes,
        "step_time_s": step_time,
        "step_time_median_s": statistics.median(times),
        "step_time_min_s": min(times),
    }
    for phase in PHASES + ("overhead",):
        out[f"{phase}_s"] = statistics.fmean(r[f"{phase}_s"] for r in records)
    out["data_wait_frac"] = out["data_wait_s"] / step_time
    out.update(
        peak_flops=peak,
        peak_source=peak_note,
        device=device_name(device),
        precision=precision,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        compile=cfg.train.compile,
        activation_checkpointing=cfg.model.activation_checkpointing,
        tokens_per_step=tokens_per_step,
        flops_per_token=fpt,
        hardware_flops_per_token=hw_fpt,
        steps=steps,
        warmup=warmup,
        model=dict(
            n_layer=cfg.model.n_layer,
            n_embd=cfg.model.n_embd,
            n_head=cfg.model.n_head,
            block_size=cfg.model.block_size,
            vocab_size=vocab,
            micro_batch=micro,
            grad_accum=cfg.train.grad_accum,
        ),
    )
    memory = {"measured": measured_components(model, probe.optimizer, probe.peak_bytes)}
    if probe.note:
        memory["note"] = probe.note
    if micro is not None:
        memory["predicted"] = predicted_memory(cfg, micro, precision, vocab)
    out["memory"] = memory
    return out


# ---- --compare ------------------------------------------------------------------------------


def compare_variants(what: str, cfg: Config, device: torch.device) -> list[tuple[str, Config]]:
    """The configs `--compare what` runs, the config's own setting first where it is one."""
    if what == "precision":
        names = ["fp32", "bf16", "fp16"]
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            names.remove("bf16")
        field = ("train", "precision")
    elif what == "activation_checkpointing":
        names = ["none", "selective", "full"]
        if cfg.model.n_layer >= 2:
            names.insert(2, "every:2")
        field = ("model", "activation_checkpointing")
    elif what == "compile":
        names = [False, True]
        field = ("train", "compile")
    else:
        raise UserError(f"--compare {what}: choose precision, activation_checkpointing or compile")
    variants = []
    for name in names:
        c = copy.deepcopy(cfg)
        setattr(getattr(c, field[0]), field[1], name)
        if what == "activation_checkpointing":
            parse_activation_checkpointing(name)
        label = {False: "eager", True: "compiled"}.get(name, name) if what == "compile" else name
        variants.append((str(label), c))
    return variants


def run_compare(cfg: Config, what: str, steps: int, warmup: int, say=print) -> dict:
    device = parallel.pick_device(cfg.run.device)
    rows = []
    for label, c in compare_variants(what, cfg, device):
        say(f"bench: {what} = {label} ...")
        try:
            rows.append({"variant": label, **run_bench(c, steps, warmup)})
        except UserError:
            raise
        except Exception as e:  # one variant that cannot run (no compiler, no bf16) is a row
            rows.append({"variant": label, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if "error" not in r and base is not None:
            r["ratio"] = r["tokens_per_sec"] / base["tokens_per_sec"]
    return {"compare": what, "steps": steps, "warmup": warmup, "variants": rows}


# ---- What a person reads --------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MiB:,.1f} MiB"


def format_report(r: dict) -> str:
    m, t = r["model"], r["step_time_s"]
    lines = [
        f"model       {m['n_layer']} layers x {m['n_embd']} wide, T={m['block_size']}, "
        f"vocab {m['vocab_size']}; {r['tokens_per_step']:,} tokens/step; {r['precision']}"
        + (", compiled" if r["compile"] else "")
        + (f", checkpointing {r['activation_checkpointing']}" if r["hfu"] != r["mfu"] else ""),
        f"device      {r['device']}",
        f"timed       {r['steps']} steps after {r['warmup']} warm-up",
        f"tokens/s    {r['tokens_per_sec']:,.0f}",
        f"step time   {t:.4f} s mean, {r['step_time_median_s']:.4f} median, "
        f"{r['step_time_min_s']:.4f} best",
        "  = "
        + " + ".join(
            f"{label} {r[k]:.4f} s ({100 * r[k] / t:.1f}%)"
            for label, k in [
                ("data wait", "data_wait_s"),
                ("fwd+bwd", "fwd_bwd_s"),
                ("optimizer", "optim_s"),
                ("overhead", "overhead_s"),
            ]
        ),
    ]
    if r["peak_flops"]:
        lines.append(
            f"MFU         {_pct(r['mfu'])}   (peak {r['peak_flops'] / 1e9:,.1f} GFLOP/s: "
            f"{r['peak_source']})"
        )
        lines.append(f"HFU         {_pct(r['hfu'])}   (counts activation-checkpointing recompute)")
        if r.get("mfu_by_cpu_time") is not None:
            lines.append(
                f"MFU by CPU time {_pct(r['mfu_by_cpu_time'])}   (the CPU time the process got, "
                "not the wall clock: robust to a busy machine)"
            )
    else:
        lines.append(f"MFU         n/a   ({r['peak_source']})")
    lines.append(
        f"FLOPs/token {r['flops_per_token'] / 1e6:,.2f} M model (6N + 12LTC), "
        f"{r['hardware_flops_per_token'] / 1e6:,.2f} M hardware"
    )
    lines.append(f"peak memory {_mib(r['peak_memory_bytes'])}")
    lines += _memory_table(r["memory"])
    return "\n".join(lines)


def _memory_table(mem: dict) -> list[str]:
    measured, predicted = mem["measured"], mem.get("predicted") or {}
    if "note" in mem:
        return [f"  ({mem['note']})"]
    out = [f"  {'':<30}{'predicted':>14}{'measured':>14}"]
    for n in [*STATE, "activations_and_temporaries", "peak"]:
        label = n.replace("_", " ")
        out.append(f"  {label:<30}{_mib(predicted.get(n)):>14}{_mib(measured.get(n)):>14}")
    out.append("  (activations and temporaries = the peak - weights - gradients - optimizer state)")
    return out


def format_compare(res: dict) -> str:
    head = (
        f"{'variant':<12}{'tokens/s':>12}{'ratio':>8}{'step s':>10}{'MFU':>8}{'HFU':>8}"
        f"{'data wait':>11}{'peak memory':>16}"
    )
    lines = [f"compare {res['compare']} ({res['steps']} timed steps after {res['warmup']})", head]
    for r in res["variants"]:
        if "error" in r:
            lines.append(f"{r['variant']:<12}  failed: {r['error']}")
            continue
        lines.append(
            f"{r['variant']:<12}{r['tokens_per_sec']:>12,.0f}{r['ratio']:>8.2f}"
            f"{r['step_time_s']:>10.4f}{_pct(r['mfu']):>8}{_pct(r['hfu']):>8}"
            f"{_pct(r['data_wait_frac']):>11}{_mib(r['peak_memory_bytes']):>16}"
        )
    return "\n".join(lines)
