"""The optimizers experiment: one tiny GPT, one dataset, one step budget, five optimizers.

SGD, SGD with momentum, Adam (coupled decay), AdamW (decoupled decay) and Muon train the same
model from the same initialisation on the same batches (same seed) for the same number of steps
under the same warmup + cosine schedule, weight decay 0.1 and grad clip 1.0. Only the optimizer
and its peak learning rate differ. The report compares final held-out loss and the optimizer
state each one keeps (measured from the run's own final checkpoint, and predicted from the
config by `stalwart.optim.optimizer_state_bytes_for`).
"""

from __future__ import annotations

from pathlib import Path

from stalwart.experiments.common import (
    Context,
    RunRecord,
    final_checkpoint,
    fmt_bytes,
    markdown_table,
    new_figure,
    run_training,
    save_figure,
    smooth,
    write_report,
)

# Peak LRs, chosen by a 100-step sweep (docs/optimizers.md) around the usual values. With the
# gradient clipped to norm 1, SGD's step is at most lr in norm, while Adam moves *every* weight by
# about lr (a step of norm ~ lr * sqrt(n_params)); SGD needs a ~1000x larger LR to move as far.
# Momentum's velocity sums ~1/(1 - 0.9) = 10 gradients, so it needs ~10x less than SGD.
# Adam and AdamW share an LR so that the decay is the only difference between them.
# Muon: optim.lr is its AdamW part (embeddings, norms, biases); muon_lr its hidden matrices.
OPTIMIZERS: dict[str, dict] = {
    "sgd": {"optim.name": "sgd", "optim.lr": 1.0},
    "momentum": {"optim.name": "momentum", "optim.lr": 0.1, "optim.momentum": 0.9},
    "adam": {"optim.name": "adam", "optim.lr": 3e-3},
    "adamw": {"optim.name": "adamw", "optim.lr": 3e-3},
    "muon": {
        "optim.name": "muon",
        "optim.lr": 3e-3,
        "optim.muon_lr": 0.02,
        "optim.momentum": 0.95,  # Keller Jordan's default for Muon
    },
}

FULL = {
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 128,
    "model.block_size": 64,
    "train.micro_batch": 16,
    "train.max_steps": 300,
    "schedule.warmup_steps": 30,
    "train.eval_interval": 25,
    "train.eval_batches": 20,
}
QUICK = {  # CI-sized: seconds in total
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 32,
    "train.micro_batch": 4,
    "train.max_steps": 12,
    "schedule.warmup_steps": 2,
    "train.eval_interval": 6,
    "train.eval_batches": 2,
}
COMMON = {
    "optim.weight_decay": 0.1,
    "optim.grad_clip": 1.0,
    "schedule.name": "cosine",
    "train.precision": "fp32",
    "train.log_interval": 1,
    "train.sample_tokens": 0,
    "ckpt.interval": 0,  # one checkpoint at the end: its optimizer state is what we measure
    "ckpt.keep_last": 1,
    "run.seed": 1337,
    "run.threads": 1,  # the machine is shared; one thread makes every run bit-reproducible
    "run.device": "cpu",
}


def measured_state_bytes(rec: RunRecord) -> int:
    """optimizer_state_bytes of the run's optimizer, rebuilt from its final checkpoint."""
    from stalwart import checkpoint as ck
    from stalwart.optim import build_optimizer, optimizer_state_bytes

    _, state = ck.read_checkpoint(final_checkpoint(rec))
    opt = build_optimizer(rec.cfg.optim, rec.result.model)
    opt.load_state_dict(state["optimizer"])
    return optimizer_state_bytes(opt)


def predicted_state_bytes(rec: RunRecord) -> int:
    from stalwart.optim import optimizer_state_bytes_for

    return optimizer_state_bytes_for(rec.cfg.optim, rec.cfg.model, rec.cfg.model.vocab_size)


def plot(runs: list[RunRecord], path: Path, title: str) -> Path:
    fig, (ax_train, ax_val) = new_figure(ncols=2)
    for rec in runs:
        steps, train = rec.curve("train_loss")
        (line,) = ax_train.plot(steps, smooth(train), label=rec.name, linewidth=1.5)
        ax_train.plot(steps, train, color=line.get_color(), alpha=0.15, linewidth=0.8)
        vsteps, val = rec.curve("val_loss")
        ax_val.plot(vsteps, val, marker="o", markersize=3, label=rec.name, color=line.get_color())
    ax_train.set_title("training loss (EMA 0.9; raw faint)")
    ax_val.set_title("held-out loss")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def conclusion(runs: list[RunRecord], state: dict[str, int], quick: bool) -> str:
    """What the numbers support, written from the numbers."""
    by = {r.name: r.final_val for r in runs}
    ranked = sorted(by, key=by.get)
    lines = [
        "Ranking by final held-out loss (lower is better): "
        + " < ".join(f"{n} ({by[n]:.3f})" for n in ranked)
        + "."
    ]
    if {"sgd", "adamw"} <= by.keys():
        gap = by["sgd"] - by["adamw"]
        lines.append(
            f"At the same step budget plain SGD ends {gap:+.3f} nats/token relative to AdamW"
            + (
                f"; momentum closes {(by['sgd'] - by['momentum']) / gap:.0%} of that gap."
                if "momentum" in by and gap > 0
                else "."
            )
        )
    if {"adam", "adamw"} <= by.keys():
        d = by["adam"] - by["adamw"]
        lines.append(
            f"Adam (coupled decay) vs AdamW (decoupled), same LR and decay 0.1: {d:+.4f} nats; "
            + (
                "too small to matter in a run this short (the decay term lr·λ·w is tiny over "
                "a few hundred steps)."
                if abs(d) < 0.01
                else "the decoupling is visible even in this short run."
            )
        )
    if {"muon", "adamw"} <= by.keys():
        d = by["muon"] - by["adamw"]
        lines.append(
            f"Muon vs AdamW: {d:+.3f} nats/token, with "
            f"{state['muon'] / state['adamw']:.0%} of AdamW's optimizer state."
        )
    lines.append(
        "One seed per optimizer and one LR each (picked by a short sweep): differences of a few "
        "hundredths of a nat are within what a re-tuned LR or another seed could change."
    )
    if quick:
        lines.insert(0, "**--quick run: too short to support any conclusion; smoke test only.**")
    return "\n".join(f"- {line}" for line in lines)


def run(ctx: Context) -> Path:
    size = QUICK if ctx.quick else FULL
    runs = [run_training(ctx, name, {**COMMON, **size, **o}) for name, o in OPTIMIZERS.items()]
    state = {r.name: measured_state_bytes(r) for r in runs}
    params = sum(p.numel() for p in runs[0].result.model.parameters())
    m = runs[0].cfg.model
    tokens = runs[0].curve("tokens")[1][-1]
    title = (
        f"{m.n_layer}-layer, {m.n_embd}-wide GPT ({params / 1e6:.2f}M params), "
        f"{size['train.max_steps']} steps, {tokens:,} tokens each"
    )
    figure = plot(runs, ctx.out / "loss_curves.png", title)
    rows = [
        [
            f"`{r.name}`",
            f"{r.cfg.optim.lr:g}"
            + (f" (matrices {r.cfg.optim.muon_lr:g})" if r.name == "muon" else ""),
            f"{r.final_val:.4f}",
            f"{min(r.curve('val_loss')[1]):.4f}",
            f"{state[r.name]:,} ({fmt_bytes(state[r.name])})",
            f"{state[r.name] / (4 * params):.2f}x",
            f"{predicted_state_bytes(r):,}",
            f"{r.median('tokens_per_sec'):,.0f}",
            f"{r.wall_s:.0f}",
        ]
        for r in runs
    ]
    table = markdown_table(
        [
            "optimizer",
            "peak LR",
            "final val loss (nats/token)",
            "best val loss",
            "optimizer state, measured (bytes)",
            "state / fp32 weights",
            "predicted by `optimizer_state_bytes_for`",
            "median tokens/s",
            "wall (s)",
        ],
        rows,
    )
    setup = ", ".join(f"`{k} = {v}`" for k, v in {**COMMON, **size}.items())
    body = f"""
## Setup

{title}; data `{ctx.data_dir}` (byte tokens). Identical for every run: {setup}.
Peak learning rates per optimizer are in the table; why they differ is in
[docs/optimizers.md](../../docs/optimizers.md#the-optimizers-experiment) (SGD needs a far larger
LR than Adam: with the gradient clipped to norm 1 its step has norm at most `lr`, while Adam
moves every weight by about `lr`).

## Results

![loss curves]({figure.name})

{table}

Optimizer state is measured with `stalwart.optim.optimizer_state_bytes` on the optimizer rebuilt
from each run's final checkpoint (per-element state only; the per-tensor step counters are a
few hundred bytes and left out) and predicted from the config alone by
`stalwart.optim.optimizer_state_bytes_for` (what the memory planner uses).

## Conclusion

{conclusion(runs, state, ctx.quick)}
"""
    return write_report(ctx, "Optimizers: SGD, momentum, Adam, AdamW, Muon", body)
