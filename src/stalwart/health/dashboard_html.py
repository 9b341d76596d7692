"""dashboard.html: one self-contained file (no network): the doctor's findings, the
rollbacks, and the dashboard PNG inlined as a data: URI. The page holds no per-step data of
its own: a long run's reduction (downsample.py) is the picture's, so the page stays a few
hundred KB however long the run, and `note` says how the picture was reduced."""

from __future__ import annotations

import base64
import html


def to_html(report, run, png_bytes: bytes, note: str = "", downstream: str = "") -> str:
    """`report`: the doctor's Report; `run`: dashboard.RunData; `note`: how a long run was
    drawn (empty for a short one); `downstream`: task accuracy and samples (dashboard_eval);
    the style inline."""
    e = html.escape
    img = base64.b64encode(png_bytes).decode("ascii")
    rows = "".join(
        f"<tr class='{e(f.severity)}'><td>{f.first_step}</td><td>{e(f.severity)}</td>"
        f"<td>{e(f.symptom)} ({f.count}x)</td><td>{e(f.evidence)}</td><td>{e(f.cause)}</td>"
        f"<td>{e(f.fix)}</td></tr>"
        for f in report.findings
    )
    table = (
        "<table><tr><th>step</th><th>severity</th><th>symptom</th><th>evidence</th>"
        f"<th>likely cause</th><th>fix</th></tr>{rows}</table>"
        if rows
        else "<p>No symptoms of the playbook found.</p>"
    )
    rollbacks = "".join(
        f"<li>step {r['step']} &rarr; step {r.get('to_step')} ({e(str(r.get('symptom')))}), "
        f"skipped batches {e(str(r.get('skipped_batches')))}</li>"
        for r in run.rollbacks
    )
    summary = "".join(f"<li>{e(line)}</li>" for line in report.summary)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stalwart dashboard: {e(report.run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1150px; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr.critical td {{ color: #a00; }} tr.warning td {{ color: #a50; }}
img {{ width: 100%; max-width: 1100px; }} p.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>stalwart run {e(str(report.run_dir))}</h1>
<p>{e(report.status)}</p><ul>{summary}</ul>
<h2>Diagnoses</h2>{table}
{f"<h2>Rollbacks</h2><ul>{rollbacks}</ul>" if rollbacks else ""}
<h2>Dashboard</h2>{f"<p class='note'>{e(note)}</p>" if note else ""}
<img alt="train loss, val loss, grad norm, learning rate and throughput against the step"
 src="data:image/png;base64,{img}">
{downstream}
</body></html>
"""
