"""Checkpoints: full training state, in safe formats, written atomically, verified on load.

Layout of one checkpoint directory (`RUN_DIR/checkpoints/step_XXXXXXXX/` or `best/`):
    model.safetensors   the model's weights (tied head stored once), loadable by safetensors alone
    state.safetensors   every other tensor: optimizer moments, RNG states, scaler, ...
    state.json          everything else, with {"__tensor__": NAME} where a tensor was
    manifest.json       sha256 and size of every file above; written last
Nothing here is ever unpickled: a checkpoint from a stranger cannot run code.

A save writes into a temporary directory, fsyncs every file and the directory, writes the
manifest last, then renames the directory into place: a crash at any instant leaves either the
old set of checkpoints or the old set plus one complete new one, never a half-written one that
looks valid. A directory without a valid manifest is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stalwart.errors import UserError

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
TIED = "lm_head.weight"  # == transformer.wte.weight; safetensors refuses shared storage


# ----------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON): optimizer/scaler/RNG state dicts hold both.


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace every tensor in a nested structure by a reference, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        name = prefix or "tensor"
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"cannot store dict keys {list(obj)[:3]} in a checkpoint")
        # JSON keys are strings; remember which were ints (optimizer state is keyed by index)
        return {
            "__dict__": [
                [k, flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        items = [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        if isinstance(obj, float) and obj != obj:  # NaN survives as a tagged value
            return {"__float__": "nan"}
        if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
            return {"__float__": "inf" if obj > 0 else "-inf"}
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars (numpy RNG state)
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__array__" in obj:
            import numpy as np

            return np.asarray(obj["__array__"], dtype=obj["dtype"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k != TIED}


def write_checkpoint(
    final: Path, model_state: dict[str, torch.Tensor], state: dict[str, Any], info: dict
) -> Path:
    """Write one checkpoint directory atomically. `info` goes into the manifest (step, val...)."""
    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors: dict[str, torch.Tensor] = {}
        tree = flatten(state, tensors)
        save_file(model_tensors(model_state), str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(tree))
        files = {}
        for name in ("model.safetensors", "state.safetensors", "state.json"):
            _fsync_file(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {"format": 1, "created": time.time(), **info, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # e.g. best/ is replaced: move the old one aside first
            old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------------------------
# Reading and verifying


@dataclass
class CheckpointInfo:
    path: Path
    step: int | None
    ok: bool
    problem: str
    manifest: dict


def verify(path: Path) -> CheckpointInfo:
    """Re-hash every file against the manifest. Never raises for a bad checkpoint."""
    path = Path(path)
    m = STEP_RE.match(path.name)
    step = int(m.group(1)) if m else None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return CheckpointInfo(path, step, False, "no manifest (incomplete write)", {})
    except (json.JSONDecodeError, KeyError, TypeError):
        return CheckpointInfo(path, step, False, "manifest is unreadable", {})
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return CheckpointInfo(path, step, False, f"{name} is missing", manifest)
        if f.stat().st_size != rec["bytes"]:
            return CheckpointInfo(path, step, False, f"{name} has the wrong size", manifest)
        if sha256_file(f) != rec["sha256"]:
            return CheckpointInfo(path, step, False, f"{name} fails its checksum", manifest)
    return CheckpointInfo(path, manifest.get("step", step), True, "", manifest)


def read_checkpoint(path: Path, check: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict without the tied head, full state) of a verified checkpoint."""
    path = Path(path)
    if check:
        info = verify(path)
        if not info.ok:
            raise UserError(f"checkpoint {path} is unusable: {info.problem}")
    model_state = load_file(str(path / "model.safetensors"))
    tensors = load_file(str(path / "state.safetensors"))
    state = unflatten(json.loads((path / "state.json").read_text()), tensors)
    return model_state, state


def read_json_state(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Top-level entries of state.json that hold no tensors (config, data meta), cheaply."""
    tree = json.loads((Path(path) / "state.json").read_text())
    return {k: unflatten(v, {}) for k, v in tree["__dict__"] if k in keys}


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Only the weights (no optimizer state): what sampling and export need."""
    return load_file(str(Path(path) / "model.safetensors"))


def load_model_state(model: torch.nn.Module, model_state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if k != TIED]
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; check --model.* against the run's config.toml"
        )


def step_dirs(ckpt_root: Path) -> list[Path]:
    """step_* directories, oldest first (temporary and foreign directories ignored)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_RE.match(p.name))


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"
