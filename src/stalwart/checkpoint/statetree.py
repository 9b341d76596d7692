"""Nested state <-> (tensors, JSON): how a checkpoint stores state dicts without pickle.

Optimizer, scaler and RNG state dicts mix tensors, numbers, tuples and int-keyed dicts. `flatten`
turns such a tree into JSON with {"__tensor__": NAME} references plus a flat {NAME: tensor} dict
for safetensors; `unflatten` is its inverse. Nothing is ever pickled, so nothing can be unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TIED = "lm_head.weight"  # == transformer.wte.weight; safetensors refuses shared storage


def flatten(
    obj: Any,
    tensors: dict[str, torch.Tensor],
    prefix: str = "",
    copy: bool = False,
    pool: dict[str, torch.Tensor] | None = None,
):
    """Replace every tensor in a nested structure by a reference, collecting the tensors.

    copy=True clones CPU tensors too: an asynchronous save must not see the optimizer update
    them in place while it writes. `pool` (with copy) keeps those copies for the next save.
    Containers are always rebuilt, never shared with the caller.
    """
    if isinstance(obj, torch.Tensor):
        name = prefix or "tensor"
        tensors[name] = _to_cpu(obj, copy, pool, name)
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"cannot store dict keys {list(obj)[:3]} in a checkpoint")
        # JSON keys are strings; remember which were ints (optimizer state is keyed by index)
        return {
            "__dict__": [
                [k, flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k), copy, pool)]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        items = [flatten(v, tensors, f"{prefix}.{i}", copy, pool) for i, v in enumerate(obj)]
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
            return np.asarray(obj["__array__"], dtype=obj["dtype"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def _to_cpu(t: torch.Tensor, copy: bool, pool: dict | None = None, name: str = ""):
    # .to("cpu") returns the *same* tensor for a CPU tensor; copy=True forces a snapshot
    if not copy or pool is None:
        return t.detach().to("cpu", copy=copy).contiguous()
    # Reusing last save's buffers is several times faster than fresh ones (no page faults, no
    # zeroing of gigabytes); pinned buffers let CUDA copy asynchronously (see snapshot)
    buf = pool.get(name)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = pool[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    return buf.copy_(t.detach(), non_blocking=t.is_cuda)


def _storage(t: torch.Tensor) -> int:
    return getattr(t, "_local_tensor", t).data_ptr()  # a DTensor (FSDP2): its local shard


EMBEDDINGS = ("transformer.wte.weight", "model.embed_tokens.weight")  # GPT-2's, llama's


def is_tied_head(state_dict: dict[str, torch.Tensor]) -> bool:
    """lm_head.weight is the token embedding (GPT-2; llama unless untied): the same storage,
    or (a full state dict gathered from FSDP shards: two copies) the same values."""
    head = state_dict.get(TIED)
    emb = next((state_dict[k] for k in EMBEDDINGS if k in state_dict), None)
    if head is None or emb is None or head.shape != emb.shape:
        return False
    return _storage(head) == _storage(emb) or bool(torch.equal(head, emb))


def model_tensors(state_dict: dict[str, torch.Tensor], copy: bool = False, pool=None):
    # a tied head is stored once (as the embedding); an untied one (llama) is a weight of its own
    skip = TIED if is_tied_head(state_dict) else None
    return {k: _to_cpu(v, copy, pool, f"model.{k}") for k, v in state_dict.items() if k != skip}


@dataclass
class Snapshot:
    """Everything a checkpoint will hold, already on the CPU: what a background writer gets."""

    model: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    tree: Any


def snapshot(model_state: dict, state: dict, copy: bool = False, pool=None) -> Snapshot:
    """The state on the CPU. copy=True: a private copy (for a background writer), into the
    buffers of `pool` when given (the caller must not reuse a pool while a write reads it)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(state, tensors, copy=copy, pool=pool)
    model = model_tensors(model_state, copy, pool)
    if copy and pool is not None and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    return Snapshot(model, tensors, tree)
