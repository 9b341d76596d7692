"""DCP shards (an FSDP checkpoint's `dcp/`), read safely.

DCP's `.metadata` is a pickle: it is read with an unpickler that admits only DCP's own metadata
classes, so a forged file cannot name any other class (no code runs), and a shard that holds a
pickled object instead of tensors is refused. This is the one module of the checkpoint package
that unpickles anything (tests/test_checkpoint.py checks the others never do).

torch.distributed.checkpoint is imported inside the functions: it takes ~0.4 s to import, and
most runs (one process, DDP) never read shards.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from stalwart.checkpoint import format as ck


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata, without letting a forged file name any other class (no code runs)."""

    _ALLOWED = {
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    }

    def find_class(self, module: str, name: str):
        ok = (module, name) in self._ALLOWED or module == "torch.distributed.checkpoint.metadata"
        ok = ok or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            try:
                with open(Path(path) / ".metadata", "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
                raise ck.CheckpointUnreadable(
                    f"{path}/.metadata cannot be read safely ({e}): use another checkpoint"
                ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def load_shards(state_dict: dict, path: Path) -> None:
    """Fill the tensors of `state_dict` from the DCP shards in `path` (this run's layout:
    resharded as need be). Raises CheckpointUnreadable for a forged or damaged directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise ck.CheckpointUnreadable(f"{path} holds a pickled object: not a stalwart shard")

    try:
        with warnings.catch_warnings():  # one process loading shards is what we mean to do
            warnings.filterwarnings(
                "ignore", message=".*assuming the intent is to load in a single"
            )
            dcp.load(state_dict, storage_reader=_reader(path), planner=TensorsOnly())
    except dcp.api.CheckpointException as e:  # every rank's failure, tracebacks included
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        ours = [ln for ln in lines if "use another checkpoint" in ln]
        reason = (ours or lines or ["unknown error"])[-1]
        raise ck.CheckpointUnreadable(
            f"the shards in {path} cannot be loaded ({reason[-300:]}); use another checkpoint"
        ) from None
