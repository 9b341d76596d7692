"""The optimizers experiment: one tiny GPT, one dataset, one step budget, five optimizers.

SGD, SGD with momentum, Adam (coupled decay), AdamW (decoupled decay) and Muon train the same
model from the same initialisation on the same batches (same seed) for the same number of steps
under the same warmup + cosine schedule and grad clip 1.0. Only the optimizer, its peak learning
rate and (for the SGD family) the weight decay differ. The report compares final held-out loss,
the size of the trained weights, and the optimizer state each one keeps (measured from the run's
own final checkpoint, and predicted from the config by `optimizer_state_bytes_for`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stalwart.checkpoint import format as ck
from stalwart.checkpoint.state import seed_everything
from stalwart.experiments.common import (
    Context,
    RunRecord,
    bullets,
    final_checkpoint,
    fmt_bytes,
    markdown_table,
    new_figure,
    run_training,
    save_curves,
    setup_text,
    smooth,
    write_report,
)
from stalwart.experiments.presets import RUN, preset
from stalwart.model.gpt import build_model
from stalwart.optim.build import build_optimizer, optimizer_state_bytes, optimizer_state_bytes_for

# Peak LRs: the best of a 3-4 point sweep per optimizer in 100-step runs of the FULL model
# (docs/optimizers.md has the numbers). SGD needs ~300x Adam's LR: with the gradient clipped to
# norm 1 its whole step has norm <= lr, while Adam moves *every* weight by about lr (a step of
# norm ~ lr * sqrt(n_params)). Momentum's velocity sums ~1/(1 - 0.9) = 10 gradients, so its best
# LR is 10x smaller than SGD's. Adam and AdamW share an LR so that the decay is their only
# difference. Muon: optim.lr is its AdamW part (embeddings, norms, biases), muon_lr its matrices.
#
# Weight decay: 0.1 is an AdamW number (shrink per step lr·λ = 1e-4 at lr 1e-3). In SGD the
# same λ at lr 0.3 shrinks every weight by 3% a step and collapses the matrices to ~0.002 RMS in
# 200 steps (we measured it), so the SGD family gets λ = 3e-4: the same 1e-4 per step at peak.
# Adam keeps AdamW's λ = 0.1, coupled: that contrast is the lesson's point.
SGD_DECAY = 3e-4
OPTIMIZERS: dict[str, dict] = {
    "sgd": {"optim.name": "sgd", "optim.lr": 0.3, "optim.weight_decay": SGD_DECAY},
    "momentum": {
        "optim.name": "momentum",
        "optim.lr": 0.03,
        "optim.momentum": 0.9,
        "optim.weight_decay": SGD_DECAY,
    },
    "adam": {"optim.name": "adam", "optim.lr": 1e-3, "optim.weight_decay": 0.1},
    "adamw": {"optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.1},
    "muon": {
        "optim.name": "muon",
        "optim.lr": 3e-3,
        "optim.muon_lr": 0.02,
        "optim.momentum": 0.95,  # Keller Jordan's default for Muon
        "optim.weight_decay": 0.1,
    },
}

COMMON = {"optim.grad_clip": 1.0, "schedule.name": "cosine", **RUN}


def measured_state_bytes(rec: RunRecord) -> int:
    """optimizer_state_bytes of the run's optimizer, rebuilt from its final checkpoint."""
    _, state = ck.read_checkpoint(final_checkpoint(rec))
    opt = build_optimizer(rec.cfg.optim, rec.result.model)
    opt.load_state_dict(state["optimizer"])
    return optimizer_state_bytes(opt)


def predicted_state_bytes(rec: RunRecord) -> int:
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
        ax.set_ylabel("cross-entropy (nats/token)")
    return save_curves(fig, (ax_train, ax_val), path, title)


def matrix_rms(model: torch.nn.Module) -> float:
    """RMS of all weight matrices (the decayed tensors): how far decay pulled them to 0."""
    mats = [p.detach().flatten() for p in model.parameters() if p.dim() >= 2]
    return float(torch.cat(mats).pow(2).mean().sqrt())


def init_matrix_rms(rec: RunRecord) -> float:
    """The same statistic at initialisation (same seed, same init as the run)."""
    seed_everything(rec.cfg.run.seed)
    return matrix_rms(build_model(rec.cfg.model, rec.cfg.model.vocab_size))


def conclusion(stats: dict[str, dict], init_rms: float, quick: bool) -> str:
    """What the numbers support, written from the numbers."""
    val = {n: s["val"] for n, s in stats.items()}
    rms = {n: s["rms"] for n, s in stats.items()}
    ranked = sorted(val, key=val.get)
    lines = ["Final held-out loss: " + " < ".join(f"{n} ({val[n]:.3f})" for n in ranked) + "."]
    if {"sgd", "adamw"} <= val.keys():
        lines.append(
            f"At the same step budget plain SGD ends {val['sgd'] - val['adamw']:+.3f} nats/token "
            "relative to AdamW."
        )
    if {"sgd", "momentum"} <= val.keys():
        d = val["momentum"] - val["sgd"]
        lines.append(
            f"Momentum ends {d:+.3f} nats/token relative to plain SGD"
            + (
                ": at this budget and these LRs it did not help."
                if d > 0
                else ", for one extra state tensor per parameter."
            )
        )
    if {"adam", "adamw"} <= val.keys():
        d = val["adam"] - val["adamw"]
        lines.append(
            f"Adam vs AdamW, same LR, same λ = 0.1: {d:+.3f} nats/token. Adam's matrices end at "
            f"RMS {rms['adam']:.4f}, AdamW's at {rms['adamw']:.4f} (init {init_rms:.4f}): "
            "coupled decay is divided by √v̂, so weights with small gradients are pulled to 0 "
            "at up to lr per step, which AdamW's decoupled (1 − lr·λ) shrink never does."
            if abs(d) >= 0.01
            else f"Adam vs AdamW, same LR, same λ = 0.1: {d:+.4f} nats/token, too small to "
            "matter in a run this short."
        )
    if {"muon", "adamw"} <= val.keys():
        ratio = stats["muon"]["state"] / stats["adamw"]["state"]
        lines.append(
            f"Muon vs AdamW: {val['muon'] - val['adamw']:+.3f} nats/token, with {ratio:.0%} of "
            "AdamW's optimizer state."
        )
    lines.append(
        "One seed per optimizer and one LR each (picked by a short sweep): differences of a few "
        "hundredths of a nat are within what a re-tuned LR or another seed could change."
    )
    return bullets(lines, quick)


HEADERS = [
    "optimizer",
    "peak LR",
    "weight decay λ",
    "final val loss (nats/token)",
    "best val loss",
    "matrix RMS at end",
    "optimizer state, measured (bytes)",
    "state / fp32 weights",
    "predicted by `optimizer_state_bytes_for`",
    "median tokens/s",
    "wall (s)",
]


def table_row(rec: RunRecord, s: dict, param_bytes: int) -> list[str]:
    o = rec.cfg.optim
    return [
        f"`{rec.name}`",
        f"{o.lr:g}" + (f" (matrices {o.muon_lr:g})" if o.name == "muon" else ""),
        f"{o.weight_decay:g}",
        f"{s['val']:.4f}",
        f"{min(rec.curve('val_loss')[1]):.4f}",
        f"{s['rms']:.4f}",
        f"{s['state']:,} ({fmt_bytes(s['state'])})",
        f"{s['state'] / param_bytes:.2f}x",
        f"{predicted_state_bytes(rec):,}",
        f"{rec.median('tokens_per_sec'):,.0f}",
        f"{rec.wall_s:.0f}",
    ]


def run(ctx: Context) -> Path:
    size = preset("optimizers", ctx.quick)
    runs = [run_training(ctx, name, {**COMMON, **size, **o}) for name, o in OPTIMIZERS.items()]
    stats = {
        r.name: {
            "val": r.final_val,
            "rms": matrix_rms(r.result.model),
            "state": measured_state_bytes(r),
        }
        for r in runs
    }
    params = sum(p.numel() for p in runs[0].result.model.parameters())
    m = runs[0].cfg.model
    tokens = int(runs[0].curve("tokens")[1][-1])
    title = (
        f"{m.n_layer}-layer, {m.n_embd}-wide GPT ({params / 1e6:.2f}M params), "
        f"{size['train.max_steps']} steps, {tokens:,} tokens each"
    )
    figure = plot(runs, ctx.out / "loss_curves.png", title)
    table = markdown_table(HEADERS, [table_row(r, stats[r.name], 4 * params) for r in runs])
    init_rms = init_matrix_rms(runs[0])
    setup = setup_text({**COMMON, **size})
    body = f"""
## Setup

{title}; data `{ctx.data_dir}` (byte tokens). Identical for every run: {setup}.
The peak LR and weight decay of each optimizer are in the table; why they differ is in
[docs/optimizers.md](../../docs/optimizers.md#the-optimizers-experiment): SGD needs a far larger
LR than Adam (with the gradient clipped to norm 1 its step has norm at most `lr`, while Adam
moves every weight by about `lr`), and so a far smaller λ for the same shrink per step.

## Results

![loss curves]({figure.name})

{table}

Matrix RMS: root-mean-square of all weight matrices at the end (at initialisation:
{init_rms:.4f}). Optimizer state is measured with `stalwart.optim.build.optimizer_state_bytes` on the
optimizer rebuilt from each run's final checkpoint (per-element state; the per-tensor step
counters are a few hundred bytes and left out) and predicted from the config alone by
`stalwart.optim.build.optimizer_state_bytes_for` (what the memory planner uses).

## Conclusion

{conclusion(stats, init_rms, ctx.quick)}
"""
    return write_report(ctx, "Optimizers: SGD, momentum, Adam, AdamW, Muon", body)
