"""The dataset on disk and the batch loader.

A dataset is its meta.json plus token shards (shards.py); each split reads as one token stream
through memory maps, so the data never has to fit in RAM and opening it reads nothing but
meta.json and the files' sizes. Old single-file datasets (train.bin / val.bin) open the same way.

Batches are windows of block_size + 1 tokens. The windows of step `k`'s *global* batch are a
pure function of (seed, k), so:
  * the loader's whole state is one integer (`position`), and a resume continues the exact
    sequence of batches;
  * micro-batching and data parallelism only decide how that global batch is split, never which
    sequences a step sees (DESIGN.md): 1 process x accum 4 == 2 processes x accum 2 == 4 x 1;
  * the next batch can be built ahead, in a background thread, while the step runs.
Two samplings: `random` (offsets drawn anywhere, as nanoGPT does) and `epoch` (the stream cut
into non-overlapping windows, each visited once per epoch in an order seeded by (seed, epoch)).
Held-out batches are fixed: the same windows at every evaluation, so val loss is comparable.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stalwart.data.shards import TokenStream
from stalwart.errors import UserError

_TRAIN_STREAM, _VAL_STREAM, _EPOCH_STREAM = 0, 1, 2


@dataclass
class Dataset:
    dir: Path
    meta: dict
    train: TokenStream
    val: TokenStream


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
        int(meta["vocab_size"])
        shards = meta.get("shards") or {  # format 1: one file per split
            s: [{"file": f"{s}.bin", "tokens": meta.get(f"{s}_tokens")}] for s in ("train", "val")
        }
        splits = {s: _open_split(d, s, shards[s], dtype) for s in ("train", "val")}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is malformed ({e}): re-run prepare") from None
    return Dataset(d, meta, splits["train"], splits["val"])


def _open_split(d: Path, split: str, shards: list[dict], dtype: np.dtype) -> TokenStream:
    """Check every shard's size against meta.json (no data is read), then map them."""
    paths = []
    for s in shards:
        path = d / s["file"]
        if not path.is_file() or path.stat().st_size == 0:
            raise UserError(f"{path} is missing or empty: re-run prepare")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise UserError(f"{path} is truncated (size not a multiple of {dtype}): re-run prepare")
        if s.get("tokens") is not None and s["tokens"] != size // dtype.itemsize:
            raise UserError(
                f"{path} has {size // dtype.itemsize} tokens but meta.json says {s['tokens']}: "
                "re-run prepare"
            )
        paths.append(path)
    if not paths:
        raise UserError(f"{d} has no {split} shards: re-run prepare")
    return TokenStream(paths, dtype)


def _offsets(seed: int, stream: int, key: int, count: int, high: int) -> np.ndarray:
    ss = np.random.SeedSequence(seed, spawn_key=(stream, key))
    return np.random.default_rng(ss).integers(0, high, size=count)


def _windows(data: TokenStream, offsets: np.ndarray, block_size: int) -> torch.Tensor:
    return torch.from_numpy(data.windows(offsets, block_size + 1))


class EpochOrder:
    """`epoch` sampling: window j of the endless sequence is the `perm_e[j mod n]`-th of the n
    non-overlapping windows, e = j // n, perm_e a permutation seeded by (seed, e). The loader's
    state stays one integer; the permutation of the current epoch is recomputed on demand."""

    def __init__(self, n_windows: int, seed: int):
        self.n, self.seed = n_windows, seed
        self._epoch, self._perm = -1, np.zeros(0, np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            ss = np.random.SeedSequence(self.seed, spawn_key=(_EPOCH_STREAM, epoch))
            self._epoch, self._perm = epoch, np.random.default_rng(ss).permutation(self.n)
        return self._perm

    def windows(self, first: int, count: int) -> np.ndarray:
        """Window indices of samples first .. first+count-1 (they may span two epochs)."""
        j = np.arange(first, first + count, dtype=np.int64)
        out = np.empty(count, np.int64)
        for e in np.unique(j // self.n):
            sel = j // self.n == e
            out[sel] = self._permutation(int(e))[j[sel] % self.n]
        return out


class BatchLoader:
    """Global batch of step k -> this rank's `grad_accum` micro-batches of (x, y)."""

    def __init__(
        self,
        data: TokenStream,
        block_size: int,
        micro_batch: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        sampling: str = "random",
        prefetch: bool = False,
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
        self.sampling = sampling
        self.order = (
            EpochOrder((len(data) - 1) // block_size, seed) if sampling == "epoch" else None
        )
        self.position = 0  # index of the next global batch
        self.last_digest = ""  # hash of the last batch's windows: repeated data is detectable
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._pending = None  # (position, future) of the batch being built ahead

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in (`epoch` sampling; 0 with `random`)."""
        return self.position * self.global_batch // self.order.n if self.order else 0

    def _offsets(self, position: int) -> np.ndarray:
        if self.order is not None:
            first = position * self.global_batch
            return self.order.windows(first, self.global_batch) * self.block_size
        high = len(self.data) - self.block_size - 1
        return _offsets(self.seed, _TRAIN_STREAM, position, self.global_batch, high)

    def _build(self, position: int) -> tuple[str, torch.Tensor]:
        """The host side of batch `position`: its digest and this rank's rows (pinned on CUDA)."""
        offsets = self._offsets(position)
        digest = hashlib.blake2b(offsets.tobytes(), digest_size=8).hexdigest()
        per_rank = self.micro_batch * self.grad_accum
        rows = _windows(
            self.data, offsets[self.rank * per_rank : (self.rank + 1) * per_rank], self.block_size
        )
        if self.device.type == "cuda":
            rows = rows.pin_memory()  # pinned: the copy to the device can be asynchronous
        return digest, rows

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pos = self.position
        if self._pending is not None and self._pending[0] == pos:
            digest, rows = self._pending[1].result()
        else:  # first batch, prefetch off, or the position was moved (resume, rollback)
            digest, rows = self._build(pos)
        self.last_digest, self.position = digest, pos + 1
        if self._ahead is not None:
            self._pending = (pos + 1, self._ahead.submit(self._build, pos + 1))
        if self.device.type == "cuda":
            # non_blocking from pinned memory: the copy overlaps the previous step's compute
            rows = rows.to(self.device, non_blocking=True)
        return [(r[:, :-1], r[:, 1:]) for r in rows.split(self.micro_batch)]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def eval_batches(
    data: TokenStream,
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
