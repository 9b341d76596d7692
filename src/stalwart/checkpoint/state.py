"""The union of everything with state: what a checkpoint holds and how a resume puts it back.

Model, optimizer, GradScaler, loop counters, loader position, health monitor, every RNG, the
resolved config and the thread count (CPU matmul results depend on it). Anything left out would
make a resumed run start from a subtly different state (the lesson's checkpoint table).
`TrainParts` names the live objects that hold it; `capture` takes it, `restore` puts it back.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stalwart.checkpoint import format as ck
from stalwart.errors import UserError


@dataclass
class LoopState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens seen (all ranks)
    best_val: float = math.inf

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens, self.best_val = int(d["step"]), int(d["tokens"]), d["best_val"]


@dataclass
class TrainParts:
    """The live objects whose state a checkpoint holds (model: the unwrapped module)."""

    model: torch.nn.Module
    optimizer: Any
    scaler: Any
    loader: Any
    monitor: Any
    loop: LoopState


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state(tuple(np_state))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one generator per device; a resume on fewer devices restores those it has
        for i, s in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) before anything random is built."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture(
    config: dict, model, opt, scaler, loader, monitor, loop: LoopState, extra: dict | None = None
) -> tuple[dict, dict]:
    """(model state dict, everything else) for a checkpoint. `config`: the run's resolved
    config as a dict (config.to_dict), stored so that a resume can check what changed."""
    state = {
        "loop": loop.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "loader": loader.state_dict(),
        "health": monitor.state_dict(),
        "rng": capture_rng(),
        "config": config,
        "threads": torch.get_num_threads(),
        **(extra or {}),
    }
    return model.state_dict(), state


def restore(state: dict, opt, scaler, loader, monitor, loop: LoopState) -> None:
    """Everything but the model weights (see restore_checkpoint for the whole of it)."""
    opt.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])
    monitor.load_state_dict(state.get("health", {}))
    loop.load_state_dict(state["loop"])
    restore_rng(state["rng"])


# Settings that define *what* is trained: changing them makes the saved state meaningless.
_IMMUTABLE = [
    ("model", "n_layer"),
    ("model", "n_head"),
    ("model", "n_embd"),
    ("model", "block_size"),
    ("model", "vocab_size"),
    ("model", "bias"),
    ("optim", "name"),
]


# What a plain resume (run.resume auto) may change without being asked: how the run is executed
# or recorded, never what it computes. Any other change (a new LR, a longer schedule, another
# seed, other intervals) is refused unless run.resume is allow-changes (a mistaken re-run of a
# sweep must not silently continue the old run).
FREE_TO_CHANGE = {
    "run": {"dir", "resume", "init_from", "device", "threads"},
    "parallel": "*",  # the layout: results equal up to float rounding (docs/distributed.md)
    "debug": "*",  # test and demo knobs
    "train": {"log_interval", "loggers", "wandb_project", "wandb_entity", "wandb_mode",
              "dashboard", "sample_tokens", "sample_interval"},
    "ckpt": {"async_save", "resume_check"},
}  # fmt: skip


def changed_settings(saved: dict, now: dict, same_global_batch: bool = False) -> list[str]:
    """The changes between the checkpoint's config and this run's that a plain resume refuses.
    `same_global_batch`: the steps see the same sequences (micro_batch x grad_accum x world size
    unchanged), so a re-split of the batch (another world size, say) is free too."""
    split = {"micro_batch", "grad_accum"} if same_global_batch else set()
    out = []
    for sec, body in now.items():
        free = FREE_TO_CHANGE.get(sec, ())
        free = free if sec != "train" else free | split
        for key, value in body.items():
            old = saved.get(sec, {}).get(key, value)
            if old != value and free != "*" and key not in free:
                out.append(f"{sec}.{key} {old!r} -> {value!r}")
    return out


def check_compatible(saved: dict, now: dict, data_meta: dict, saved_meta: dict | None) -> list[str]:
    """Refuse a resume that cannot continue the same run; return the allowed changes made.
    `saved`, `now`: the checkpoint's config and this run's, as dicts (config.to_dict)."""
    for sec, key in _IMMUTABLE:
        if saved[sec][key] != now[sec][key]:
            raise UserError(
                f"cannot resume: the checkpoint has {sec}.{key} = {saved[sec][key]!r} but the "
                f"config says {now[sec][key]!r}; use the old value or a new --run.dir"
            )
    if saved_meta is not None:
        for key in ("tokenizer", "vocab_size"):
            if saved_meta.get(key) != data_meta.get(key):
                raise UserError(
                    f"cannot resume: the checkpoint was trained on data with {key} = "
                    f"{saved_meta.get(key)!r}, --data.dir has {data_meta.get(key)!r}"
                )
        old_sha = saved_meta.get("source", {}).get("sha256")
        new_sha = data_meta.get("source", {}).get("sha256")
        if old_sha and new_sha and old_sha != new_sha:
            raise UserError(
                "cannot resume: --data.dir holds a different dataset than the checkpoint was "
                "trained on (source sha256 differs); point it at the original data or a new run.dir"
            )
    changes = []
    for sec, body in now.items():
        for key, value in body.items():
            old = saved.get(sec, {}).get(key, value)
            if old != value and sec not in ("run",):
                changes.append(f"{sec}.{key}: {old!r} -> {value!r}")
    return changes


def restore_checkpoint(
    path: Path, model, opt, scaler, loader, monitor, loop: LoopState, check: bool = True
) -> dict:
    """Put every piece of state of checkpoint `path` back into the live objects (model: the
    unwrapped one). Returns the state dict read (config, data_meta, probe, ...)."""
    model_state, state = ck.read_checkpoint(path, check=check)
    ck.load_model_state(model, model_state)
    restore(state, opt, scaler, loader, monitor, loop)
    return state
