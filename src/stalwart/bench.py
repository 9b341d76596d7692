"""`stalwart bench`: measured tokens/s, MFU, HFU, step-time breakdown and peak memory.

The bench times the real training step, not a copy of it: it calls `train()` itself on a throwaway
run directory, with evaluation and periodic checkpoints off, and reads the per-step metrics
records (log_interval 1) that the loop writes anyway:

    steps 1 .. warmup                warm-up (allocator, thread pools, compile): not timed
    warmup+1 .. warmup+steps         timed: tokens/s, MFU, HFU, phase breakdown
    (CUDA) the next step             peak memory (torch.cuda.max_memory_allocated)
    the last step                    the loop's end-of-run evaluation and save: not timed

On a CPU, peak memory is measured in a fresh process (`--memory-only`, one warm-up step and one
measured step): the exact method (stalwart.memory.measure.PeakMemory) needs glibc to map every large
block fresh from the start, which makes a CPU step ~30% slower, so it must not touch the timing.

`--compare X` runs the variants of X in one process, one after the other, and prints ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from stalwart import parallel
from stalwart.config import Config, to_toml, with_overrides
from stalwart.errors import UserError
from stalwart.hardware import describe_peak, device_name
from stalwart.logs.metrics import PHASES, utilization
from stalwart.memory.measure import PeakMemory, enable_exact_cpu_peak
from stalwart.memory.planner import plan_training
from stalwart.model import cpu_kernels
from stalwart.model.gpt import flops_per_token, hardware_flops_per_token
from stalwart.precision import resolve_precision
from stalwart.train import Callback, train

MiB = 1024**2
STATE = ("weights", "gradients", "optimizer")


def bench_config(cfg: Config, run_dir: str, total_steps: int) -> Config:
    """The config of a bench run: the same model, data, batch, precision and features, with a
    throwaway run dir, a record every step, and no evaluation or checkpoint until the end."""
    return with_overrides(
        cfg,
        {
            "run.dir": run_dir,
            "run.resume": "auto",
            "train.max_steps": total_steps,
            "train.log_interval": 1,
            "train.eval_interval": 0,
            "train.eval_batches": 1,
            "train.sample_tokens": 0,
            "ckpt.interval": 0,
            "ckpt.interval_minutes": 0.0,
            "schedule.warmup_steps": min(cfg.schedule.warmup_steps, total_steps - 1),
        },
    )


class _Probe(Callback):
    """The bench's callback: keeps the records of the timed steps and the process CPU time at
    their ends, the trainer's optimizer (its state is measured) and resolved config, and holds
    a PeakMemory open over step `mem_step`."""

    def __init__(self, first: int, last: int, device: torch.device, mem_step: int | None = None):
        self.first, self.last, self.device, self.mem_step = first, last, device, mem_step
        self.records: list[dict] = []
        self.cpu_marks: list[float] = []
        self.optimizer, self.cfg = None, None
        self.peak_bytes, self.note, self._pm = None, "", None
        self._mem = ExitStack()

    def on_step_end(self, trainer, record: dict) -> None:
        self.optimizer, self.cfg = trainer.optimizer, trainer.cfg
        step = trainer.loop.step
        if self.first <= step <= self.last:
            self.records.append(record)
        if step in (self.first - 1, self.last):
            self.cpu_marks.append(time.process_time())
        if self.device.type == "cuda" and step == self.mem_step:
            # the loop's own record: max_memory_allocated since the last log boundary (reset
            # there), i.e. this step's peak with everything held at its start
            self.peak_bytes = record.get("peak_memory_bytes")
        elif self.mem_step is not None and step == self.mem_step - 1:
            try:
                self._pm = self._mem.enter_context(PeakMemory(self.device))
            except UserError as e:
                self.note = f"peak memory not measured: {e}"
        elif self._pm is not None and step == self.mem_step:
            self._mem.close()
            self.peak_bytes = self._pm.peak_bytes

    def run(self, cfg: Config, total_steps: int):
        """train() for `total_steps` steps on a throwaway run dir, with this probe as callback;
        returns the config as the run resolved it, and the run's result."""
        with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as run_dir, self._mem:
            result = train(
                bench_config(cfg, run_dir, total_steps), progress=False, callbacks=[self]
            )
        return result.cfg, result


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, memory: bool = True) -> dict:
    """Time `steps` training steps of `cfg` after `warmup`; measure one step's peak memory."""
    if steps < 1 or warmup < 1:
        raise UserError("--steps and --warmup must be at least 1 (the first step warms up)")
    device = parallel.pick_device(cfg.run.device)
    first, last = warmup + 1, warmup + steps
    here = memory and device.type == "cuda"  # CUDA: measured in the timed run, after the timing
    probe = _Probe(first, last, device, mem_step=last + 1 if here else None)
    bcfg, result = probe.run(cfg, last + (2 if here else 1))
    out = summarize(bcfg, probe, device, steps, warmup)
    if here:
        out.update(memory_fields(bcfg, result.model, probe, device))
    elif memory:
        out.update(memory_in_fresh_process(bcfg))
    else:
        out.update(peak_memory_bytes=None, memory=None)
    return out


def run_memory(cfg: Config) -> dict:
    """`bench --memory-only`: one warm-up step, then the peak memory of one step, here."""
    device = parallel.pick_device(cfg.run.device)
    if device.type == "cpu":
        enable_exact_cpu_peak()  # before the model is built: see stalwart.memory.measure
    probe = _Probe(first=2, last=2, device=device, mem_step=2)
    bcfg, result = probe.run(cfg, 3)
    return memory_fields(bcfg, result.model, probe, device)


def memory_in_fresh_process(cfg: Config) -> dict:
    """Run `stalwart bench --memory-only` on the same config in a new process (exact on CPU)."""
    with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as d:
        path = Path(d) / "bench.toml"
        path.write_text(to_toml(cfg))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        cmd = [sys.executable, "-m", "stalwart", "bench", "--config", str(path)]
        r = subprocess.run(
            [*cmd, "--memory-only", "--json"], capture_output=True, text=True, env=env
        )
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_memory_bytes": None, "memory": {"note": f"not measured: {why}"}}
    return json.loads(r.stdout)


def summarize(cfg: Config, probe: _Probe, device, steps: int, warmup: int) -> dict:
    records, vocab = probe.records, cfg.model.vocab_size
    precision = resolve_precision(cfg.train.precision, device)
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
        "step_time_s": step_time,
        "step_time_median_s": statistics.median(times),
        "step_time_min_s": min(times),
    }
    for phase in (*PHASES, "overhead"):
        out[f"{phase}_s"] = statistics.fmean(r[f"{phase}_s"] for r in records)
    out["data_wait_frac"] = out["data_wait_s"] / step_time
    threads = torch.get_num_threads() if device.type == "cpu" else None
    if threads and peak:
        # CPU time the process got per step, over its threads: unlike the wall clock, it does
        # not count time the scheduler gave to other processes (a lower bound of what the step
        # would reach alone: threads that spin-wait for a descheduled partner still count)
        busy = (probe.cpu_marks[1] - probe.cpu_marks[0]) / steps / threads
        out["mfu_by_cpu_time"] = utilization(fpt * tokens_per_step, busy, peak)
    micro = cfg.train.micro_batch
    out.update(
        peak_flops=peak,
        peak_source=peak_note,
        device=device_name(device),
        precision=precision,
        threads=threads,
        compile=cfg.train.compile,
        cpu_kernels=_cpu_kernels_ran(cfg, device, precision),
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
    return out


# ---- Memory: measured beside predicted -------------------------------------------------------


def _tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _with_rest(parts: dict, peak: int | None) -> dict:
    """Add what the peak holds beyond weights, gradients and optimizer state, and the peak."""
    if peak is not None:
        parts["activations_and_temporaries"] = max(peak - sum(parts[k] for k in STATE), 0)
        parts["peak"] = peak
    return parts


def memory_fields(cfg: Config, model: torch.nn.Module, probe: _Probe, device) -> dict:
    """peak_memory_bytes, and the components measured (weights, gradients and optimizer state
    from the tensors' sizes; activations and temporaries = the peak minus those) beside the
    planner's prediction."""
    params = list(model.parameters())
    opt_state = probe.optimizer.state.values() if probe.optimizer else []
    measured = {
        "weights": _tensor_bytes(params),
        "gradients": _tensor_bytes(p.grad for p in params),
        "optimizer": _tensor_bytes(v for state in opt_state for v in state.values()),
    }
    memory = {"measured": _with_rest(measured, probe.peak_bytes)}
    if probe.note:
        memory["note"] = probe.note
    if cfg.train.micro_batch != "auto":
        plan = plan_training(
            cfg,
            micro_batch=int(cfg.train.micro_batch),
            precision=resolve_precision(cfg.train.precision, device),
            vocab_size=cfg.model.vocab_size,
        )
        predicted = {k: int(plan.components.get(k, 0)) for k in STATE}
        memory["predicted"] = _with_rest(predicted, int(plan.total_bytes))
    return {"peak_memory_bytes": probe.peak_bytes, "memory": memory}


def _cpu_kernels_ran(cfg: Config, device: torch.device, precision: str) -> bool:
    """Whether the run's model took train.cpu_kernels (GPT-2, CPU, fp32, eager, built)."""
    return bool(
        cfg.train.cpu_kernels
        and cfg.model.arch == "gpt2"
        and device.type == "cpu"
        and precision == "fp32"
        and not cfg.train.compile
        and cpu_kernels.kernels() is not None
    )


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
    elif what in ("compile", "fused_gelu", "cpu_kernels"):
        names = [False, True]
        field = ("train", what)
    else:
        raise UserError(
            f"--compare {what}: choose precision, activation_checkpointing, compile, fused_gelu "
            "or cpu_kernels"
        )
    variants = []
    for name in names:
        c = with_overrides(cfg, {".".join(field): name})
        if what == "fused_gelu":  # train.cpu_kernels would take the GELU in both
            c = with_overrides(c, {"train.cpu_kernels": False})
        label = {
            "compile": {False: "eager", True: "compiled"},
            "fused_gelu": {False: "torch GELU", True: "fused GELU"},
            "cpu_kernels": {False: "torch ops", True: "stalwart kernels"},
        }.get(what, {}).get(name, name)
        variants.append((str(label), c))
    return variants


def run_compare(
    cfg: Config, what: str, steps: int, warmup: int, say=print, memory: bool = True
) -> dict:
    device = parallel.pick_device(cfg.run.device)
    rows = []
    for label, c in compare_variants(what, cfg, device):
        say(f"bench: {what} = {label} ...")
        try:
            rows.append({"variant": label, **run_bench(c, steps, warmup, memory)})
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
        + (", stalwart CPU kernels" if r.get("cpu_kernels") else "")
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


def _memory_table(mem: dict | None) -> list[str]:
    if not mem or "measured" not in mem:
        return [f"  ({mem['note']})"] if mem and "note" in mem else []
    measured, predicted = mem["measured"], mem.get("predicted") or {}
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
