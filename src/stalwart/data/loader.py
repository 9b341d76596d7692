"""The dataset on disk and the batch loader.

Batches are random windows of a memory-mapped token file. The offsets of step `k`'s *global*
batch are a pure function of (seed, k), so:
  * the loader's whole state is one integer (`position`), and a resume continues the exact
    sequence of batches;
  * micro-batching and data parallelism only decide how that global batch is split, never which
    sequences a step sees (DESIGN.md): 1 process x accum 4 == 2 processes x accum 2 == 4 x 1.
Held-out batches are fixed: the same windows at every evaluation, so val loss is comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stalwart.errors import UserError

_TRAIN_STREAM, _VAL_STREAM = 0, 1


@dataclass
class Dataset:
    dir: Path
    meta: dict
    train: np.ndarray  # memory maps: the data never has to fit in RAM
    val: np.ndarray


def open_dataset(data_dir: str | Path) -> Dataset:
    d = Path(data_dir)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"no dataset at {d} (meta.json missing): run `stalwart prepare --out {d}` "
            "or point --data.dir at a prepared dataset"
        )
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        vocab = int(meta["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is malformed ({e}): re-run prepare") from None
    splits = {}
    for split in ("train", "val"):
        path = d / f"{split}.bin"
        if not path.is_file() or path.stat().st_size == 0:
            raise UserError(f"{path} is missing or empty: re-run prepare")
        if path.stat().st_size % dtype.itemsize:
            raise UserError(f"{path} is truncated (size not a multiple of {dtype}): re-run prepare")
        splits[split] = np.memmap(path, dtype=dtype, mode="r")
    for split, arr in splits.items():
        expected = meta.get(f"{split}_tokens")
        if expected is not None and expected != len(arr):
            raise UserError(
                f"{d}/{split}.bin has {len(arr)} tokens but meta.json says {expected}: re-run prepare"
            )
    if vocab < 1 << 16 and int(splits["val"].max()) >= vocab:
        raise UserError(f"{d}/val.bin holds ids outside the vocabulary of {vocab}: re-run prepare")
    return Dataset(d, meta, splits["train"], splits["val"])


def _offsets(seed: int, stream: int, key: int, count: int, high: int) -> np.ndarray:
    ss = np.random.SeedSequence(seed, spawn_key=(stream, key))
    return np.random.default_rng(ss).integers(0, high, size=count)


def _windows(data: np.ndarray, offsets: np.ndarray, block_size: int) -> torch.Tensor:
    rows = np.stack([data[o : o + block_size + 1] for o in offsets]).astype(np.int64)
    return torch.from_numpy(rows)


class BatchLoader:
    """Global batch of step k -> this rank's `grad_accum` micro-batches of (x, y)."""

    def __init__(
        self,
        data: np.ndarray,
        block_size: int,
        micro_batch: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        if len(data) < block_size + 2:
            raise UserError(
                f"--model.block_size ({block_size}) is larger than the training data "
                f"({len(data)} tokens): lower it or prepare more text"
            )
        self.data, self.block_size, self.seed = data, block_size, seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.position = 0  # index of the next global batch
        self.last_digest = ""  # hash of the last batch's windows: repeated data is detectable

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        high = len(self.data) - self.block_size - 1
        offsets = _offsets(self.seed, _TRAIN_STREAM, self.position, self.global_batch, high)
        self.last_digest = hashlib.blake2b(offsets.tobytes(), digest_size=8).hexdigest()
        self.position += 1
        per_rank = self.micro_batch * self.grad_accum
        mine = offsets[self.rank * per_rank : (self.rank + 1) * per_rank]
        rows = _windows(self.data, mine, self.block_size)
        if self.device.type == "cuda":
            # pinned memory + non_blocking: the copy overlaps the previous step's compute
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return [(r[:, :-1], r[:, 1:]) for r in rows.split(self.micro_batch)]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def eval_batches(
    data: np.ndarray,
    block_size: int,
    micro_batch: int,
    n_batches: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out batches (this rank's share), identical at every evaluation."""
    if len(data) < block_size + 2:
        raise UserError(
            f"--model.block_size ({block_size}) is larger than the held-out data "
            f"({len(data)} tokens): lower it or prepare more text"
        )
    high = len(data) - block_size - 1
    offsets = _offsets(seed, _VAL_STREAM, 0, micro_batch * n_batches, high)
    rows = _windows(data, offsets, block_size)
    batches = [(r[:, :-1], r[:, 1:]) for r in rows.split(micro_batch)]
    return batches[rank::world_size]
