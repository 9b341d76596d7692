"""The dashboard page's downstream section: multiple-choice accuracy against the step (an inline
SVG per task, with its chance level) and the samples of samples.jsonl, first and latest side by
side, so a reader sees the text improve. Plain HTML and SVG: no network, no script."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

W, H, PAD = 420, 150, 28


def task_series(train: list[dict]) -> dict[str, list[tuple[int, float, float, float]]]:
    """{task: [(step, acc, acc_norm, chance)]} from the training records that carry them."""
    out: dict[str, list[tuple[int, float, float, float]]] = {}
    for r in train:
        for key in r:
            if key.startswith("task/") and key.endswith("/acc"):
                name = key[len("task/") : -len("/acc")]
                row = (int(r["step"]), float(r[key]), float(r.get(f"task/{name}/acc_norm", "nan")),
                       float(r.get(f"task/{name}/chance", "nan")))  # fmt: skip
                out.setdefault(name, []).append(row)
    return out


def _svg(rows: list[tuple[int, float, float, float]]) -> str:
    steps = [r[0] for r in rows]
    lo, hi = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(step: int, v: float) -> str:
        x = PAD + (W - 2 * PAD) * (step - lo) / (hi - lo)
        return f"{x:.1f},{H - PAD - (H - 2 * PAD) * v:.1f}"

    def line(i: int, color: str) -> str:
        pts = " ".join(xy(r[0], r[i]) for r in rows if math.isfinite(r[i]))
        dot = "".join(
            f"<circle cx='{xy(r[0], r[i]).split(',')[0]}' cy='{xy(r[0], r[i]).split(',')[1]}' "
            f"r='2.5' fill='{color}'/>"
            for r in rows
            if math.isfinite(r[i])
        )
        return f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{pts}'/>{dot}"

    chance = rows[-1][3]
    guide = ""
    if math.isfinite(chance):
        y = H - PAD - (H - 2 * PAD) * chance
        guide = (f"<line x1='{PAD}' x2='{W - PAD}' y1='{y:.1f}' y2='{y:.1f}' stroke='#999' "
                 f"stroke-dasharray='4 3'/><text x='{W - PAD}' y='{y - 3:.1f}' font-size='10' "
                 f"text-anchor='end' fill='#777'>chance {chance:.2f}</text>")  # fmt: skip
    axes = (
        f"<line x1='{PAD}' x2='{W - PAD}' y1='{H - PAD}' y2='{H - PAD}' stroke='#444'/>"
        f"<line x1='{PAD}' x2='{PAD}' y1='{PAD}' y2='{H - PAD}' stroke='#444'/>"
        f"<text x='{PAD - 4}' y='{PAD + 4}' font-size='10' text-anchor='end'>1</text>"
        f"<text x='{PAD - 4}' y='{H - PAD}' font-size='10' text-anchor='end'>0</text>"
        f"<text x='{PAD}' y='{H - 8}' font-size='10'>step {lo}</text>"
        f"<text x='{W - PAD}' y='{H - 8}' font-size='10' text-anchor='end'>step {hi}</text>"
    )
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}'>{axes}{guide}"
            f"{line(1, '#1f77b4')}{line(2, '#ff7f0e')}</svg>")  # fmt: skip


def read_samples(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def _samples_html(samples: list[dict]) -> str:
    e = html.escape
    steps = sorted({int(s["step"]) for s in samples if "step" in s})
    if not steps:
        return ""
    shown = [steps[0], steps[-1]] if len(steps) > 1 else steps
    rows = ""
    for s in samples:
        if int(s.get("step", -1)) in shown:
            text = e(str(s.get("prompt", "")) + str(s.get("text", "")))
            rows += (f"<tr><td>{s['step']}</td><td>{e(repr(s.get('prompt')))}</td>"
                     f"<td>{s.get('temperature')}</td><td><pre>{text}</pre></td></tr>")  # fmt: skip
    return (f"<h2>Samples</h2><p class='note'>steps {', '.join(map(str, shown))} of "
            f"{len(steps)} in samples.jsonl (greedy = temperature 0)</p><table><tr><th>step</th>"
            f"<th>prompt</th><th>temperature</th><th>text</th></tr>{rows}</table>")  # fmt: skip


def eval_section(train: list[dict], samples_path: Path) -> str:
    """The HTML of the downstream section ('' for a run without tasks or samples)."""
    e = html.escape
    parts = []
    for name, rows in task_series(train).items():
        last = rows[-1]
        parts.append(
            f"<h3>{e(name)}</h3><p>step {last[0]}: acc {last[1]:.4f}, acc_norm {last[2]:.4f}"
            f"{f' (chance {last[3]:.4f})' if math.isfinite(last[3]) else ''}; "
            f"<span style='color:#1f77b4'>acc</span>, <span style='color:#ff7f0e'>acc_norm"
            f"</span></p>{_svg(rows)}"
        )
    tasks = f"<h2>Downstream tasks</h2>{''.join(parts)}" if parts else ""
    return tasks + _samples_html(read_samples(samples_path))
