"""Every experiment's sizes in one table, and the run settings the training experiments share.

FULL is the size a report is made at; QUICK is CI-sized (seconds, a smoke test, not a result).
An experiment reads its row with `preset(name, quick)`; what it varies (optimizer, schedule,
precision, ...) stays in its own module. Changing a number here changes that experiment's
results: rerun it.
"""

from __future__ import annotations

# The columns, in the order the reports' "Setup" lines list them.
COLUMNS = (
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.block_size",
    "train.micro_batch",
    "train.max_steps",
    "schedule.warmup_steps",
    "train.eval_interval",
    "train.eval_batches",
)
_ = None  # not set by the preset: the experiment's own arms set it, or the default stands

# fmt: off
#                 layers  heads  width  block  micro  steps  warmup  eval_every  eval_batches
PRESETS: dict[str, dict[str, tuple[int | None, ...]]] = {
    "optimizers": {
        "full":  (     4,     4,   128,    64,    16,   200,     20,         20,           20),
        "quick": (     1,     2,    32,    32,     4,    12,      2,          6,            2),
    },
    "schedule": {
        "full":  (     2,     2,    64,    64,     8,   300,      _,         50,           10),
        "quick": (     1,     2,    32,    32,     4,    12,      _,          6,            2),
    },
    "high-lr": {
        "full":  (     2,     2,    64,    64,     8,   300,     15,         50,           10),
        "quick": (     1,     2,    32,    32,     4,    12,      2,          6,            2),
    },
    "accumulation": {
        "full":  (     2,     2,    64,    64,     _,   150,     10,         50,           10),
        "quick": (     1,     2,    32,    32,     _,     8,      2,          4,            2),
    },
    "fp16-no-scaler": {
        "full":  (     2,     2,    64,   128,    16,    80,      8,         40,            4),
        "quick": (     1,     2,    32,    32,     4,     6,      2,          3,            2),
    },
    "precision": {
        "full":  (     2,     2,   128,    64,     8,     _,      _,          _,            _),
        "quick": (     1,     2,    32,    32,     2,     _,      _,          _,            _),
    },
    "main-job": {  # the candidates set their shapes; FULL's steps come from the budget
        "full":  (     _,     _,     _,     _,     _,     _,      _,          _,            _),
        "quick": (     1,     2,    32,    32,     4,     4,      1,          2,            2),
    },
    "activation-checkpointing": {
        "full":  (     4,     4,   128,   128,     _,     _,      _,          _,            _),
        "quick": (     2,     2,    32,    32,     _,     _,      _,          _,            _),
    },
}
# fmt: on

SEED = 1337
# How every training experiment runs: fp32 on one CPU thread (the machine is shared; one thread
# makes every run bit-reproducible), a record every step, no sample, and one checkpoint, at the
# end (the optimizers experiment measures its optimizer state).
RUN = {
    "train.precision": "fp32",
    "train.log_interval": 1,
    "train.sample_tokens": 0,
    "ckpt.interval": 0,
    "ckpt.keep_last": 1,
    "run.seed": SEED,
    "run.threads": 1,
    "run.device": "cpu",
}


def preset(name: str, quick: bool) -> dict[str, int]:
    """Experiment `name`'s QUICK or FULL size as config overrides ({"model.n_layer": 2, ...})."""
    row = PRESETS[name]["quick" if quick else "full"]
    return {key: value for key, value in zip(COLUMNS, row, strict=True) if value is not None}
