"""The schedule experiment: warmup + cosine against a constant LR, and a sweep of warmup lengths.

Every run trains the same small GPT from the same initialisation on the same batches; only the
schedule differs. The peak LR (3e-3) is deliberately on the high side for this model: warmup
exists to protect the first steps, when Adam's second-moment estimate is still poor and the
weights are random, so a too-gentle LR would hide what it does.
"""

from __future__ import annotations

from pathlib import Path

from stalwart.experiments.common import (
    Context,
    RunRecord,
    bullets,
    markdown_table,
    new_figure,
    run_training,
    save_curves,
    setup_text,
    smooth,
    write_report,
)
from stalwart.experiments.presets import RUN, SEED, preset

PEAK_LR = 3e-3
SEEDS_FULL = (SEED, SEED + 1, SEED + 2)  # one seed's differences are noise-sized: average three
COMMON = {"optim.lr": PEAK_LR, "optim.grad_clip": 1.0, **RUN}


def variants(max_steps: int) -> dict[str, dict]:
    """constant LR (no warmup), then cosine with warmup 0 and a sweep up to a third of the run."""
    fracs = (0.0, 0.01, 0.033, 0.1, 0.33)
    out = {"constant, warmup 0": {"schedule.name": "constant", "schedule.warmup_steps": 0}}
    for f in fracs:
        w = int(round(f * max_steps))
        out[f"cosine, warmup {w}"] = {"schedule.name": "cosine", "schedule.warmup_steps": w}
    return out


def plot(runs: list[RunRecord], path: Path, title: str) -> Path:
    fig, (ax_lr, ax_loss) = new_figure(ncols=2)
    for rec in runs:
        steps, lr = rec.curve("lr")
        (line,) = ax_lr.plot(steps, lr, label=rec.name, linewidth=1.5)
        steps, loss = rec.curve("train_loss")
        ax_loss.plot(steps, smooth(loss), label=rec.name, color=line.get_color(), linewidth=1.5)
    ax_lr.set_title("learning rate per step")
    ax_lr.set_ylabel("learning rate")
    ax_loss.set_title("training loss (EMA 0.9)")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    return save_curves(fig, (ax_lr, ax_loss), path, title, fontsize=8)


def early(rec: RunRecord, key: str, upto: int) -> float:
    values = [v for s, v in zip(*rec.curve(key)) if s <= upto]
    return max(values) if values else float("nan")


def mean_val(vals: list[float]) -> float:
    return sum(vals) / len(vals)


def spread(vals: list[float]) -> float:
    return max(vals) - min(vals)


def conclusion(runs: list[RunRecord], seed_vals: dict[str, list[float]], quick: bool) -> str:
    val = {n: mean_val(v) for n, v in seed_vals.items()}
    noise = max(spread(v) for v in seed_vals.values())
    cos = [r.name for r in runs if r.name.startswith("cosine")]
    no_warm = cos[0]
    best = min(cos, key=val.get)
    k = len(next(iter(seed_vals.values())))
    lines = [
        f"Final held-out loss, mean of {k} seed(s). Cosine decay vs a constant LR (both without "
        f"warmup): {val[no_warm] - val['constant, warmup 0']:+.3f} nats/token.",
        f"Best warmup in the sweep: `{best}` ({val[best]:.3f}); warmup 0 ends at "
        f"{val[no_warm]:.3f} ({val[no_warm] - val[best]:+.3f}).",
    ]
    for name in cos[1:]:
        # paired by seed: the same init and batches, only the warmup differs
        diffs = [a - b for a, b in zip(seed_vals[name], seed_vals[no_warm])]
        agree = all(d < 0 for d in diffs) or all(d > 0 for d in diffs)
        lines.append(
            f"`{name}` vs warmup 0, same seed: {mean_val(diffs):+.3f} nats/token (per seed "
            + " / ".join(f"{d:+.3f}" for d in diffs)
            + (
                "; the same sign in every seed)"
                if agree and k > 1
                else "; signs differ across seeds: not evidence)"
                if k > 1
                else ")"
            )
        )
    lines.append(
        f"Across seeds (different init and batches) one schedule's final loss spreads by up to "
        f"{noise:.3f} nats/token, so only the paired (same-seed) differences above are evidence: "
        "warmup matters where they keep one sign in every seed."
    )
    by_name = {r.name: r for r in runs}
    upto = max(2, runs[0].cfg.train.max_steps // 10)
    lines.append(
        f"The first {upto} steps: max pre-clip gradient norm {early(by_name[no_warm], 'grad_norm', upto):.1f} "
        f"without warmup, {early(by_name[cos[-1]], 'grad_norm', upto):.1f} with `{cos[-1]}`."
    )
    return bullets(lines, quick)


def run(ctx: Context) -> Path:
    size = preset("schedule", ctx.quick)
    steps = size["train.max_steps"]
    runs = [
        run_training(ctx, name.replace(", ", "_").replace(" ", ""), {**COMMON, **size, **v})
        for name, v in variants(steps).items()
    ]
    for rec, name in zip(runs, variants(steps)):
        rec.name = name
    seed_vals = {r.name: [r.final_val] for r in runs}
    for seed in () if ctx.quick else SEEDS_FULL[1:]:
        for name, v in variants(steps).items():
            run_name = name.replace(", ", "_").replace(" ", "") + f"_seed{seed}"
            rec = run_training(ctx, run_name, {**COMMON, **size, **v, "run.seed": seed})
            seed_vals[name].append(rec.final_val)
    m = runs[0].cfg.model
    title = f"{m.n_layer}-layer {m.n_embd}-wide GPT, peak LR {PEAK_LR:g}, {steps} steps"
    figure = plot(runs, ctx.out / "lr_and_loss.png", title)
    first = max(2, steps // 10)
    seeds = (COMMON["run.seed"],) if ctx.quick else SEEDS_FULL
    rows = [
        [
            f"`{r.name}`",
            f"{mean_val(seed_vals[r.name]):.4f}",
            " / ".join(f"{v:.3f}" for v in seed_vals[r.name]),
            f"{min(r.curve('val_loss')[1]):.4f}",
            f"{early(r, 'grad_norm', first):.2f}",
            f"{sum(r.curve('clipped')[1][:first]) / first:.0%}",
            f"{r.wall_s:.0f}",
        ]
        for r in runs
    ]
    headers = [
        "schedule",
        "final val loss, mean over seeds (nats/token)",
        "per seed",
        "best val loss (first seed)",
        f"max pre-clip grad norm, steps 1-{first}",
        f"clipped steps, 1-{first}",
        "wall (s)",
    ]
    setup = setup_text({**COMMON, **size})
    body = f"""
## Setup

{title}; data `{ctx.data_dir}`. Same seed, init and batches for every run; only
`schedule.name` and `schedule.warmup_steps` differ. Cosine decays to `lr / 10`. {setup}.
Every schedule is run with seeds {", ".join(str(x) for x in seeds)} (init and batches change with
the seed); the curves and the gradient-norm columns are of the first seed.

## Results

![LR and loss curves]({figure.name})

{markdown_table(headers, rows)}

## Conclusion

{conclusion(runs, seed_vals, ctx.quick)}
"""
    return write_report(ctx, "Schedule: warmup + cosine vs constant LR", body)
