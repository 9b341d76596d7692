"""The command line, in real subprocesses: exit codes, one-line errors, nothing damaged."""

import hashlib

import pytest

from tests.conftest import TINY, run_cli


def _digest(path):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def _assert_user_error(res, needle):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_train_sample_and_ckpt_end_to_end(tmp_path, tiny_data):
    run = tmp_path / "run"
    res = run_cli(
        "train", *TINY, "--run.dir", run, "--data.dir", tiny_data, "--train.sample_tokens", "20"
    )
    assert res.returncode == 0, res.stderr
    assert "held-out loss:" in res.stdout and "bits/byte" in res.stdout and "sample:" in res.stdout
    assert "step 20/20" in res.stderr  # plain progress lines when not a terminal
    res = run_cli("sample", run, "--prompt", "def ", "--max-new-tokens", "20", "--temperature", "0")
    assert res.returncode == 0 and res.stdout.startswith("def ")
    res = run_cli("ckpt", "verify", run)
    assert res.returncode == 0 and "3/3 checkpoints ok" in res.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model.n_layerz", "2"], "unknown option --model.n_layerz"),
        (["--model.n_layer", "two"], "--model.n_layer expects int"),
        (["--optim.lr", "-0.1"], "--optim.lr must be positive"),
        (["--train.micro_batch", "0"], "--train.micro_batch must be positive"),
        (["--schedule.warmup_steps", "50"], "--schedule.warmup_steps (50) must be shorter"),
        (["--model.block_size", "100000"], "--model.block_size (100000) is larger than"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, tiny_data, args, needle):
    res = run_cli("train", *TINY, "--run.dir", tmp_path / "run", "--data.dir", tiny_data, *args)
    _assert_user_error(res, needle)


def test_missing_data_and_malformed_toml(tmp_path, tiny_data):
    _assert_user_error(
        run_cli("train", "--data.dir", tmp_path / "none", "--run.dir", tmp_path / "r"),
        "no dataset at",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "meta.json").write_text((tiny_data / "meta.json").read_text())
    (empty / "train.bin").write_bytes(b"")
    (empty / "val.bin").write_bytes(b"")
    _assert_user_error(
        run_cli("train", "--data.dir", empty, "--run.dir", tmp_path / "r"), "missing or empty"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2")
    _assert_user_error(run_cli("train", "--config", bad), "is not valid TOML")
    _assert_user_error(run_cli("prepare"), "required: --out")
    _assert_user_error(run_cli("nosuchcommand"), "invalid choice")


def test_failed_command_damages_nothing(tmp_path, tiny_data):
    run = tmp_path / "run"
    res = run_cli(
        "train", *TINY, "--run.dir", run, "--data.dir", tiny_data, "--train.max_steps", "10"
    )
    assert res.returncode == 0, res.stderr
    before = _digest(run)
    # a bad flag, a shape change that cannot resume, and a refused fresh start
    _assert_user_error(
        run_cli("train", *TINY, "--run.dir", run, "--data.dir", tiny_data, "--optim.lr", "nan"),
        "--optim.lr",
    )
    _assert_user_error(
        run_cli("train", *TINY, "--run.dir", run, "--data.dir", tiny_data, "--model.n_embd", "128"),
        "cannot resume",
    )
    _assert_user_error(
        run_cli("train", *TINY, "--run.dir", run, "--data.dir", tiny_data, "--run.resume", "never"),
        "already holds checkpoints",
    )
    assert _digest(run) == before
    data_before = _digest(tiny_data)
    _assert_user_error(run_cli("prepare", "--out", tiny_data), "already exists")
    assert _digest(tiny_data) == data_before


def test_gpt2_tokenizer_offline_error(tmp_path, tiny_text_dir):
    res = run_cli(
        "prepare",
        tiny_text_dir,
        "--tokenizer",
        "gpt2",
        "--out",
        tmp_path / "g",
        env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "nocache")},
    )
    if res.returncode == 0:
        pytest.skip("this machine can reach the GPT-2 vocabulary")
    _assert_user_error(res, "GPT-2 vocabulary could not be loaded")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("rank, torn_down", [("1", False), ("0", True)])
def test_a_torchrun_worker_past_rank_0_exits_without_interpreter_teardown(rank, torn_down):
    """Rank > 0 under torchrun leaves with os._exit (gloo's threads can abort a teardown, see
    cli._leave_if_torchrun_worker): its exit code stands, its output is flushed, and no
    teardown runs (an atexit hook stands for it); rank 0 exits the ordinary way."""
    import subprocess
    import sys

    code = (
        "import atexit, sys\n"
        "from stalwart import cli\n"
        "atexit.register(lambda: print('teardown', flush=True))\n"
        "sys.exit(cli.main(['config', '--optim.lr', 'not-a-number']))\n"
    )
    env = {"TORCHELASTIC_RUN_ID": "test", "RANK": rank, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 2  # the command's own exit code (a one-line error here)
    assert out.stderr.startswith("error: ")
    assert ("teardown" in out.stdout) is torn_down
