"""`stalwart doctor RUN_DIR` on healthy, stopped, crashed and silently sick runs; the exit
codes of `stalwart train` and `stalwart doctor` (docs/doctor.md)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stalwart.checkpoint import format as ck
from stalwart.cli import main
from stalwart.health.doctor import EXIT_CRITICAL, EXIT_OK, EXIT_WARNINGS, diagnose_run
from stalwart.health.recovery import EXIT_HEALTH_STOP
from stalwart.train import train
from tests.conftest import TINY, run_cli, tiny_config


@pytest.mark.slow
def test_healthy_run_exits_0_and_train_writes_the_dashboard(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    res = run_cli("train", *TINY, "--run.dir", run, "--data.dir", tiny_data, "--quiet")
    assert res.returncode == 0, res.stderr
    assert (run / "dashboard.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (run / "dashboard.html").read_text()
    assert main(["doctor", str(run)]) == EXIT_OK  # what the `stalwart` script exits with
    out = capsys.readouterr().out
    assert "finished: step 20/20" in out and "verdict: healthy" in out


@pytest.mark.slow
def test_a_doctor_stop_exits_3_and_the_doctor_names_it(tmp_path, tiny_data, capsys):
    """A NaN at step 15 with no rollbacks allowed: the run stops cleanly, exit 3; the doctor
    names the NaN and the spent budget, in words and in JSON, and exits 3 too."""
    run = tmp_path / "run"
    res = run_cli(
        "train", *TINY, "--run.dir", run, "--data.dir", tiny_data, "--quiet",
        "--debug.inject_nan_at_step", 15, "--health.max_rollbacks", 0,
    )  # fmt: skip
    assert res.returncode == EXIT_HEALTH_STOP == 3, res.stderr
    assert "stopped by the doctor at step 14" in res.stderr
    assert "Traceback" not in res.stderr
    assert main(["doctor", str(run)]) == EXIT_CRITICAL
    out = capsys.readouterr().out
    assert "stopped by the doctor" in out and "verdict: critical" in out
    assert "unrecoverable at step 15" in out and "nonfinite at step 15" in out
    assert "likely cause:" in out and "fix:" in out
    report = diagnose_run(run)
    assert [f.symptom for f in report.findings] == ["unrecoverable", "nonfinite"]


def test_doctor_json_and_exit_code_for_warnings(tmp_path, tiny_data, capsys):
    """A run trained with the live doctor off (--health.enabled false) and its gradients
    clipped at every step: the doctor re-runs the detectors over the records and finds it."""
    run = tmp_path / "run"
    cfg = tiny_config(
        run, tiny_data, "--health.enabled", "false", "--optim.name", "sgd", "--optim.lr", "2",
        "--schedule.name", "constant", "--train.max_steps", "35",
        "--health.window", "20", "--health.grace_steps", "10",
    )  # fmt: skip
    train(cfg, progress=False)
    assert "diagnosis" not in (run / "metrics.jsonl").read_text()
    assert main(["doctor", str(run), "--json"]) == EXIT_WARNINGS
    out = json.loads(capsys.readouterr().out)
    (finding,) = out["findings"]
    assert finding["symptom"] == "clipping" and finding["source"] == "offline"
    assert out["exit_code"] == EXIT_WARNINGS


def test_doctor_on_a_crashed_run_and_on_no_run(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, tiny_data, "--train.max_steps", "20"), progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if '"step": 13,' in line)
    # a process killed mid-write: records up to step 12 and half a line
    (run / "metrics.jsonl").write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:25])
    report = diagnose_run(run)
    assert report.status.startswith("incomplete: last record at step 12/20")
    assert report.exit_code == EXIT_OK
    assert main(["doctor", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_doctor_flags_a_checkpoint_with_nan_weights(tmp_path, tiny_data):
    """Written by something other than stalwart's guarded save path (an older run, a tool)."""
    run = tmp_path / "run"
    train(tiny_config(run, tiny_data, "--train.max_steps", "10"), progress=False)
    newest = run / "checkpoints/step_00000010"
    model_state = ck.read_model_state(newest)
    model_state["transformer.wte.weight"][3, 0] = float("nan")
    shutil.rmtree(run / "checkpoints")
    ck.write_checkpoint(ck.step_dir(run / "checkpoints", 20), model_state, {"x": torch.ones(1)},
                        {"step": 20})  # fmt: skip
    report = diagnose_run(run)
    assert report.exit_code == EXIT_CRITICAL
    assert report.findings[0].symptom == "nonfinite_weights"
    assert "transformer.wte.weight" in report.findings[0].evidence
