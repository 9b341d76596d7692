"""Checkpoints on disk: full training state, in safe formats, written atomically, verified on load.

Layout of one checkpoint directory (`RUN_DIR/checkpoints/step_XXXXXXXX/` or `best/`):
    model.safetensors   the model's weights (tied head stored once), loadable by safetensors alone
    state.safetensors   every other tensor: optimizer moments, RNG states, scaler, ...
    state.json          everything else, with {"__tensor__": NAME} where a tensor was
    tokenizer.json      the dataset's tokenizer, when it has one (sampling needs nothing else)
    manifest.json       sha256 and size of every file above; written last
Nothing here is ever unpickled: a checkpoint from a stranger cannot run code.

A save writes into a temporary directory `.tmp-NAME-PID-HOST`, fsyncs every file and the
directory, writes the manifest last, then renames the directory into place (and fsyncs the
parent): a crash at any instant leaves the old set of checkpoints, or the old set plus one
complete new one, plus at worst a stray temporary directory that is never loaded. A directory
without a valid manifest is never loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stalwart.checkpoint.statetree import (  # noqa: F401 (public here: the checkpoint API)
    EMBEDDINGS,
    TIED,
    Snapshot,
    flatten,
    is_tied_head,
    model_tensors,
    snapshot,
    unflatten,
)
from stalwart.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


class CheckpointUnreadable(UserError):
    """A checkpoint whose files pass their checksums but cannot be parsed (foreign or forged)."""


# ----------------------------------------------------------------------------------------------
# Writing: staging directory -> files (each fsynced) -> manifest (last) -> rename into place


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


def _file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _write_bytes(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    try:
        save_file(tensors, str(path))
    except Exception as e:  # safetensors reports a failed write as "... (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
    _fsync_file(path)
    return _file_record(path)  # hashed from what the file system now holds


def temp_dir_for(final: Path, tag: str = "") -> Path:
    """`.tmp-NAME-PID-HOST` next to `final`: the owner is in the name, so a later process can
    tell an interrupted save (owner dead) from a save in progress (owner alive)."""
    return final.parent / f"{TMP_PREFIX}{tag}{final.name}-{os.getpid()}-{socket.gethostname()}"


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A fresh temporary directory for `final`; removed again if anything fails inside."""
    tmp = temp_dir_for(Path(final))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit(tmp: Path, final: Path, info: dict, known: dict[str, dict] | None = None) -> Path:
    """Write the manifest of every file under `tmp` (last), fsync, and rename into `final`."""
    known = dict(known or {})
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = f.relative_to(tmp).as_posix()
        if rel != MANIFEST:
            files[rel] = known.get(rel) or _file_record(f)
    manifest = {"format": FORMAT, "created": time.time(), **info, "files": files}
    _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
    for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        _fsync_dir(d)
    _replace_dir(tmp, Path(final))
    _fsync_dir(Path(final).parent)
    return Path(final)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    # best/ (or a step re-saved after a resume) is replaced: swap atomically where the kernel
    # can, so there is no instant without a complete `final`; the old one ends up in `tmp`.
    if _rename_exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_dir_for(final, "old_")
    final.rename(old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_snapshot(
    final: Path,
    snap: Snapshot,
    info: dict,
    extra_files: dict[str, Path] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write one checkpoint directory atomically. `info` goes into the manifest (step, val...);
    `extra_files` (name -> source path) are copied in; `before_commit(tmp)` runs once the files
    are written, before the manifest (distributed.py: FSDP's shards; the debug save pause)."""
    final = Path(final)
    with staging(final) as tmp:
        known = {
            "model.safetensors": _save_tensors(tmp / "model.safetensors", snap.model),
            "state.safetensors": _save_tensors(tmp / "state.safetensors", snap.tensors),
            "state.json": _write_bytes(tmp / "state.json", json.dumps(snap.tree).encode()),
        }
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
            _fsync_file(tmp / name)
        if before_commit is not None:
            before_commit(tmp)
        return commit(tmp, final, info, known)


def write_checkpoint(
    final: Path,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    info: dict,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write one checkpoint directory atomically (synchronously)."""
    return write_snapshot(final, snapshot(model_state, state), info, extra_files)


def link_checkpoint(src: Path, final: Path, info: dict) -> Path:
    """A second checkpoint with the same files (best/ saved at a step that is also saved):
    hard links where the file system allows (files are never modified in place), else copies."""
    manifest = json.loads((Path(src) / MANIFEST).read_text())
    with staging(Path(final)) as tmp:
        for name in manifest["files"]:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(src) / name, tmp / name)
            except OSError:
                shutil.copyfile(Path(src) / name, tmp / name)
                _fsync_file(tmp / name)
        return commit(tmp, Path(final), info, manifest["files"])


# ----------------------------------------------------------------------------------------------
# Reading and verifying


@dataclass
class CheckpointInfo:
    path: Path
    step: int | None
    ok: bool
    problem: str
    manifest: dict
    unlisted: list[str] = field(default_factory=list)  # files the manifest does not know


def verify(path: Path) -> CheckpointInfo:
    """Re-hash every file against the manifest. Never raises for a bad checkpoint."""
    path = Path(path)
    m = STEP_RE.match(path.name)
    step = int(m.group(1)) if m else None
    if not path.is_dir():
        return CheckpointInfo(path, step, False, "not a directory", {})
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError
    except FileNotFoundError:
        return CheckpointInfo(path, step, False, "no manifest (incomplete write)", {})
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return CheckpointInfo(path, step, False, "manifest is unreadable", {})
    if manifest.get("format", FORMAT) > FORMAT:
        return CheckpointInfo(path, step, False, "written by a newer stalwart", manifest)
    unlisted = sorted(
        f.relative_to(path).as_posix()
        for f in path.rglob("*")
        if f.is_file() and f.name != MANIFEST and f.relative_to(path).as_posix() not in files
    )
    for name, rec in files.items():
        f = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return CheckpointInfo(path, step, False, f"manifest names {name!r}", manifest)
        problem = ""
        if not f.is_file():
            problem = f"{name} is missing"
        elif f.stat().st_size != rec.get("bytes"):
            problem = f"{name} has the wrong size ({f.stat().st_size} != {rec.get('bytes')} bytes)"
        elif sha256_file(f) != rec.get("sha256"):
            problem = f"{name} fails its sha256 checksum"
        if problem:
            return CheckpointInfo(path, step, False, problem, manifest, unlisted)
    return CheckpointInfo(path, manifest.get("step", step), True, "", manifest, unlisted)


def read_checkpoint(path: Path, check: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict without the tied head, full state) of a verified checkpoint.

    Only safetensors and JSON are parsed: a forged file fails to parse, it never runs."""
    path = Path(path)
    if check:
        info = verify(path)
        if not info.ok:
            raise UserError(f"checkpoint {path} is unusable: {info.problem}")
    try:
        model_state = load_file(str(path / "model.safetensors"))
        tensors = load_file(str(path / "state.safetensors"))
        state = unflatten(json.loads((path / "state.json").read_text()), tensors)
    except Exception as e:  # safetensors' own error type, JSON, a dangling tensor reference
        raise CheckpointUnreadable(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it was not written by "
            "stalwart or is damaged: use another checkpoint"
        ) from None
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
    if TIED in missing and not is_tied_head(model.state_dict()):
        # an untied head saved while it still equalled the embedding was stored as tied
        emb = next((model_state[k] for k in EMBEDDINGS if k in model_state), None)
        if emb is not None:
            with torch.no_grad():
                model.lm_head.weight.copy_(emb)
    missing = [k for k in missing if k != TIED]
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; check --model.* against the run's config.toml"
        )


# ----------------------------------------------------------------------------------------------
# The checkpoints/ directory


def step_dirs(ckpt_root: Path) -> list[Path]:
    """step_* directories, oldest first (temporary and foreign directories ignored)."""
    if not Path(ckpt_root).is_dir():
        return []
    return sorted(p for p in Path(ckpt_root).iterdir() if p.is_dir() and STEP_RE.match(p.name))


def step_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    """The step in a `step_XXXXXXXX` directory name; None for any other name."""
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def manifest_step(path: Path) -> int | None:
    """The step a checkpoint says it holds (from its manifest, no hashing); None if unreadable."""
    try:
        return int(json.loads((Path(path) / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def temp_dirs(ckpt_root: Path) -> list[Path]:
    if not Path(ckpt_root).is_dir():
        return []
    return sorted(p for p in Path(ckpt_root).iterdir() if p.name.startswith(TMP_PREFIX))


def temp_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) from `.tmp-NAME-PID-HOST`; None for a name in another format."""
    parts = Path(path).name[len(TMP_PREFIX) :].split("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None
