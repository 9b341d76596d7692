"""`model.arch = "llama"`: equal to transformers' LlamaForCausalLM, exported and imported as one,
resumed bit-exactly with Muon (in process and after a real SIGKILL).

transformers builds its models here from a LlamaConfig, offline; nothing comes from a hub.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from stalwart import cli
from stalwart.config import ModelConfig
from stalwart.data.prepare import prepare
from stalwart.data.tokenizer import ByteTokenizer
from stalwart.eval.sample import generate
from stalwart.export import export, load_init_weights
from stalwart.model.gpt import build_model
from stalwart.model.llama_weights import hf_config
from stalwart.train import train
from tests.conftest import crash_and_resume, run_cli, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LLAMA = ["--model.arch", "llama", "--model.n_kv_head", "1", "--model.tie_embeddings", "false"]
LLAMA += ["--model.rope_theta", "500", "--model.norm_eps", "1e-6", "--train.fused_gelu", "false"]
CORPUS = "the quick brown fox jumps over the lazy dog; ça coûte 5 €.\n" * 20


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


def hf_model(tf, cfg: ModelConfig, vocab: int):
    """transformers' own LlamaForCausalLM for our config (built, never downloaded)."""
    hc = {k: v for k, v in hf_config(cfg, vocab, None, "fp32").items() if k != "dtype"}
    return tf.LlamaForCausalLM(tf.LlamaConfig(**hc)).eval()


@pytest.mark.parametrize("tie, kv", [(True, 2), (False, 1), (False, 4)])
def test_llama_is_transformers_llama(tf, tie, kv):
    cfg = ModelConfig(
        arch="llama", n_layer=2, n_head=4, n_kv_head=kv, n_embd=64, block_size=32,
        tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-6, intermediate_size=96,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = build_model(cfg, 97).eval()
    theirs = hf_model(tf, cfg, 97)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the same names and shapes
    x = torch.randint(0, 97, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).logits, atol=1e-5, rtol=0)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())


def test_default_intermediate_size_is_rounded_eight_thirds():
    assert ModelConfig(arch="llama", n_embd=768, n_head=12).ffn_size == 2048
    assert ModelConfig(arch="llama", n_embd=4096, n_head=32).ffn_size == 11008  # Llama 2 7B
    assert ModelConfig(arch="llama", n_embd=384, n_head=4).ffn_size == 1024


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    (d / "text").mkdir()
    for i in range(30):  # documents: prepare holds whole ones out
        (d / "text" / f"fox{i}.txt").write_text(f"# {i}\n" + CORPUS)
    prepare([str(d / "text")], "byte", d / "data")
    flags = [*LLAMA, "--train.max_steps", "40", "--optim.name", "muon"]
    result = train(tiny_config(d / "run", d / "data", *flags), progress=False)
    export(d / "run", "hf", d / "hf")
    return SimpleNamespace(run=d / "run", data=d / "data", model=result.model.eval(), hf=d / "hf")


def test_export_loads_in_transformers_same_logits_and_greedy_tokens(trained, tf):
    files = {p.name for p in trained.hf.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    config = json.loads((trained.hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 1
    model = tf.AutoModelForCausalLM.from_pretrained(trained.hf)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings
    ids = ByteTokenizer().encode("the quick brown fox jumps over the lazy dog")
    x = torch.tensor([ids[:32], ids[-32:]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, trained.model(x)[0], atol=1e-5, rtol=0)
    prompt = torch.tensor([ByteTokenizer().encode("the ")])
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, generate(trained.model, prompt, 24, temperature=0))


def test_hf_generate_equals_stalwart_sample_greedy_cli(trained, tf):
    model = tf.AutoModelForCausalLM.from_pretrained(trained.hf)
    prompt = "the "
    x = torch.tensor([ByteTokenizer().encode(prompt)])
    new = model.generate(x, max_new_tokens=24, do_sample=False)[0, x.shape[1] :].tolist()
    assert len(set(new)) >= 5, bytes(new)  # varied text, not a run of one token
    expected = prompt + ByteTokenizer().decode(new) + "\n"
    args = ["--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0"]
    for source in (trained.run, trained.hf):  # the run, and the exported directory itself
        res = run_cli("sample", source, *args, env={"PYTHONIOENCODING": "utf-8"})
        assert res.returncode == 0, res.stderr
        assert res.stdout == expected


def test_init_from_transformers_llama_then_export_is_bit_identical(trained, tf, tmp_path):
    cfg = build_model(tiny_config(tmp_path, trained.data, *LLAMA).model, 257).cfg
    torch.manual_seed(0)
    theirs = hf_model(tf, cfg, 257)
    with torch.no_grad():  # no exact ones in the norms, as in any trained model
        for p in theirs.parameters():
            p.add_(0.01 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    # the whole path: init_from, one step whose update is far below half an ulp, checkpoint
    flags = [*LLAMA, "--run.init_from", tmp_path / "theirs", "--optim.lr", "1e-30"]
    flags += ["--train.max_steps", "1", "--schedule.warmup_steps", "0", "--train.eval_interval"]
    train(tiny_config(tmp_path / "run", trained.data, *flags, "0"), progress=False)
    export(tmp_path / "run", "hf", tmp_path / "ours")
    a = load_file(str(tmp_path / "ours" / "model.safetensors"))
    b = load_file(str(tmp_path / "theirs" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and our own export comes back into a fresh model exactly
    model = build_model(trained.model.cfg, 257)
    load_init_weights(model, trained.hf)
    for k, v in trained.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def _one_error_line(capsys, argv: list) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


STEP1 = ["--train.max_steps", "1", "--schedule.warmup_steps", "0"]


def test_init_from_llama_of_another_shape_is_one_line(trained, tmp_path, capsys):
    base = [*LLAMA[:-2], "--run.init_from", trained.hf, *STEP1]
    args = ["train", "--run.dir", tmp_path / "r", "--data.dir", trained.data, *base]
    tiny = ["--model.n_layer", "2", "--model.n_head", "2", "--model.block_size", "32"]
    err = _one_error_line(capsys, [*args, *tiny, "--model.n_embd", "64", "--model.n_kv_head", "2"])
    assert "n_kv_head is 1, the model's 2 (set --model.n_kv_head 1)" in err
    err = _one_error_line(capsys, [*args, *tiny, "--model.n_embd", "32", "--model.n_kv_head", "1"])
    assert "n_embd is 64, the model's 32" in err and "intermediate_size" in err
    gpt2 = [*STEP1, "--run.init_from", trained.hf, *tiny, "--model.n_embd", "64"]
    err = _one_error_line(capsys, ["train", "--run.dir", tmp_path / "g", "--data.dir",
                                   trained.data, *gpt2])  # fmt: skip
    assert "is a Llama model: set --model.arch llama" in err
    assert not list((tmp_path / "r").glob("checkpoints/step_*"))  # nothing trained or saved


def test_gpt2_refuses_llama_only_settings(tmp_path, capsys):
    args = ["train", "--run.dir", tmp_path / "r", "--model.n_kv_head", "2"]
    assert "--model.n_kv_head is a llama setting" in _one_error_line(capsys, args)


def test_llama_muon_resume_is_bit_exact(tmp_path, tiny_data):
    full, resumed = crash_and_resume(tmp_path, tiny_data, *LLAMA, "--optim.name", "muon")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.val_loss == resumed.val_loss


@pytest.mark.slow
def test_llama_muon_sigkill_then_resume_is_bit_exact(tmp_path, tiny_data):
    from tests.test_resume import Trainer, assert_same_run, cli_args, wait_for_record

    extra = (*LLAMA, "--optim.name", "muon", "--train.max_steps", "20")
    ref = tmp_path / "ref"
    train(tiny_config(ref, tiny_data, *extra), progress=False)
    run = tmp_path / "run"
    p = Trainer(cli_args(run, tiny_data, *extra))
    wait_for_record(run, 13, p)
    assert p.kill() == -signal.SIGKILL
    train(tiny_config(run, tiny_data, *extra), progress=False)
    assert_same_run(run, ref, 20)
    untied = load_file(str(Path(run) / "checkpoints" / "step_00000020" / "model.safetensors"))
    assert "lm_head.weight" in untied  # an untied head is a weight of its own in a checkpoint
