"""Finding a checkpoint to read from: `RUN_DIR` or `CKPT_DIR` -> a verified checkpoint directory,
and its config and data meta without loading a tensor. For the readers of finished runs
(`sample`, `export`, `run.init_from`); resuming a run is checkpoint.resume.
"""

from __future__ import annotations

from pathlib import Path

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.resume import latest_valid_checkpoint
from stalwart.errors import UserError


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir -> its newest valid checkpoint (the one a resume would take); a checkpoint dir
    -> itself (verified)."""
    p = Path(path)
    if (p / ck.MANIFEST).is_file():
        info = ck.verify(p)
        if not info.ok:
            raise UserError(f"checkpoint {p} is unusable: {info.problem}")
        return p
    newest = latest_valid_checkpoint(p)
    if newest is not None:
        return newest
    raise UserError(
        f"{p} holds no valid checkpoint: pass a run dir, a checkpoint dir or an exported dir"
    )


def read_meta(ckpt_dir: Path) -> tuple[dict, dict]:
    """(config dict, data meta) from a checkpoint's state.json without loading any tensor."""
    tree = ck.read_json_state(ckpt_dir, ("config", "data_meta"))
    return tree["config"], tree.get("data_meta", {})
