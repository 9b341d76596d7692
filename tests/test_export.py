"""Export and import: the checkpoint as an artifact that transformers (offline) and stalwart load.

One tiny model is trained once per module on a small, very regular corpus: after 40 steps its
greedy continuations are varied text (not a run of spaces), so "same tokens" is a real check.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from stalwart import cli
from stalwart.data.prepare import prepare
from stalwart.data.tokenizer import ByteTokenizer, load_tokenizer
from stalwart.errors import UserError
from stalwart.eval.sample import generate, load_any, sample_text
from stalwart.export import export, load_init_weights
from stalwart.model.gpt import build_model
from stalwart.train import train
from tests.conftest import TINY, run_cli, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is first imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS = "the quick brown fox jumps over the lazy dog; ça coûte 5 €.\n" * 600
TEXT = "def f(x):\n    return x  # ça coûte 5 € — 日本語 🎉\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    (d / "text").mkdir()
    (d / "text" / "fox.txt").write_text(CORPUS)
    prepare([str(d / "text")], "byte", d / "data")
    result = train(tiny_config(d / "run", d / "data", "--train.max_steps", "40"), progress=False)
    model = result.model.eval()
    export(d / "run", "hf", d / "hf")
    return SimpleNamespace(dir=d, run=d / "run", data=d / "data", model=model, hf=d / "hf")


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


def _user_error(capsys, argv: list[str], needle: str) -> str:
    """The real CLI entry point, in process: exit 2 and one `error:` line naming the problem."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    return err[0]


# ----------------------------------------------------------------------------------------------
# Hugging Face export


def test_hf_directory_layout(trained):
    files = {p.name for p in trained.hf.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    cfg = json.loads((trained.hf / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["activation_function"] == "gelu_new"
    assert (cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]) == (
        32,
        64,
        2,
        257,  # the byte vocabulary: 256 bytes + end-of-text
    )
    hf = load_file(str(trained.hf / "model.safetensors"))
    ours = trained.model.state_dict()
    assert "lm_head.weight" not in hf  # tied: stored once, as HF itself saves GPT-2
    w = "transformer.h.1.mlp.c_fc.weight"
    assert hf[w].shape == (64, 256) and torch.equal(hf[w], ours[w].t())  # Conv1D: (in, out)
    assert torch.equal(hf["transformer.wte.weight"], ours["lm_head.weight"])


def test_transformers_loads_it_offline_same_logits_and_tokens(trained, tf):
    model = tf.AutoModelForCausalLM.from_pretrained(trained.hf)
    tok = tf.AutoTokenizer.from_pretrained(trained.hf)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.dtype == torch.float32
    ids = tok(TEXT)["input_ids"]
    assert ids == ByteTokenizer().encode(TEXT) and tok.decode(ids) == TEXT  # byte-exact, UTF-8
    x = torch.tensor([ids[:32], ids[-32:]])
    assert trained.model.cpu_kernels  # the run's own model, on stalwart's CPU kernels (default)
    with torch.no_grad():
        theirs = model(x).logits
        ours, _ = trained.model(x)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    prompt = torch.tensor([ByteTokenizer().encode("the ")])
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, generate(trained.model, prompt, 24, temperature=0))


@pytest.mark.slow
def test_hf_generate_equals_stalwart_sample_greedy_cli(trained, tf):
    model = tf.AutoModelForCausalLM.from_pretrained(trained.hf)
    prompt = "the "
    x = torch.tensor([ByteTokenizer().encode(prompt)])
    new = model.generate(x, max_new_tokens=24, do_sample=False)[0, x.shape[1] :].tolist()
    assert len(set(new)) >= 5, bytes(new)  # varied text, not a run of one token
    expected = prompt + ByteTokenizer().decode(new) + "\n"
    args = ["--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0"]
    env = {"PYTHONIOENCODING": "utf-8"}
    for source in (trained.run, trained.hf):  # the run, and the exported directory itself
        res = run_cli("sample", source, *args, env=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout == expected


def test_bpe_tokenizer_same_ids_in_transformers(tmp_path, tiny_text_dir, tf):
    prepare([str(tiny_text_dir)], "bpe:512", tmp_path / "data")
    steps = ["--train.max_steps", "2", "--schedule.warmup_steps", "1", "--train.eval_interval", "0"]
    result = train(tiny_config(tmp_path / "run", tmp_path / "data", *steps), progress=False)
    export(tmp_path / "run", "hf", tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "data", "bpe:512")
    theirs = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [TEXT, "import json\n\nclass A(B):\n    pass<|endoftext|>x", "  spaces   and\ttabs\n"]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text) and theirs.decode(ids) == text
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eot_id
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == ours.eot_id and config["vocab_size"] == 512
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.tensor([ours.encode(TEXT)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, result.model.eval()(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "dtype, torch_dtype, atol", [("bf16", torch.bfloat16, 0.1), ("fp16", torch.float16, 0.02)]
)
def test_half_precision_exports_load_in_transformers(
    trained, tf, tmp_path, dtype, torch_dtype, atol
):
    export(trained.run, "hf", tmp_path / dtype, dtype=dtype)
    assert all(
        t.dtype == torch_dtype
        for t in load_file(str(tmp_path / dtype / "model.safetensors")).values()
    )
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / dtype)
    assert model.dtype == torch_dtype
    x = torch.tensor([ByteTokenizer().encode(TEXT)[:32]])
    with torch.no_grad():
        theirs = model(x).logits.float()
        ours, _ = trained.model(x)
    assert (theirs - ours).abs().max() < atol
    assert (theirs - ours).abs().max() > 0  # really computed in half precision


# ----------------------------------------------------------------------------------------------
# The plain safetensors format


def test_safetensors_format_via_cli_and_sample_from_it(trained, tmp_path, capsys):
    out = tmp_path / "st"
    argv = ["export", trained.run, "--format", "safetensors", "--out", out, "--dtype", "fp32"]
    assert cli.main([str(a) for a in argv]) == 0
    assert "safetensors export of" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["linear_layout"] == "out_in" and cfg["n_head"] == 2
    weights = load_file(str(out / "model.safetensors"))
    ours = {k: v for k, v in trained.model.state_dict().items() if k != "lm_head.weight"}
    assert weights.keys() == ours.keys() and all(torch.equal(weights[k], ours[k]) for k in ours)
    model, tok = load_any(out)
    want = sample_text(trained.model, ByteTokenizer(), "the ", 16, temperature=0)
    assert sample_text(model, tok, "the ", 16, temperature=0) == want
    assert (
        cli.main(
            ["sample", str(out), "--prompt", "the ", "--max-new-tokens", "16", "--temperature", "0"]
        )
        == 0
    )
    assert capsys.readouterr().out == want + "\n"


# ----------------------------------------------------------------------------------------------
# Import: run.init_from


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_hf_dir_init_from_train_export_is_bit_identical(trained, tf, tmp_path):
    # a directory written by transformers itself, not by us
    config = tf.GPT2Config(
        vocab_size=257, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = tf.GPT2LMHeadModel(config)
    with torch.no_grad():  # no exact zeros (fresh biases are 0), as in any trained model
        for p in theirs.parameters():
            p.add_(0.01 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    # the whole training path, init_from to checkpoint: one optimizer step whose updates lie
    # far below half an ulp of every weight, so the weights leave train() as they went in
    flags = ["--run.init_from", tmp_path / "theirs", "--optim.lr", "1e-30"]
    flags += ["--train.max_steps", "1", "--schedule.warmup_steps", "0"]
    flags += ["--train.eval_interval", "0"]
    train(tiny_config(tmp_path / "run", trained.data, *flags), progress=False)
    export(tmp_path / "run", "hf", tmp_path / "ours")
    _assert_same_weights(
        load_file(str(tmp_path / "ours" / "model.safetensors")),
        load_file(str(tmp_path / "theirs" / "model.safetensors")),
    )
    # and our own export goes round the same way
    model = build_model(trained.model.cfg, 257)
    load_init_weights(model, trained.hf)
    _assert_same_weights(model.state_dict(), trained.model.state_dict())


def _nanogpt_ckpt(model, path: Path, **overrides) -> Path:
    """What nanoGPT's train.py saves (compiled model: `_orig_mod.` prefixes, tied head twice)."""
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    args = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, bias=True, vocab_size=257)
    opt = torch.optim.AdamW(model.parameters())
    torch.save(
        {
            "model": {**sd, **overrides},
            "model_args": {**args, "dropout": 0.0},
            "optimizer": opt.state_dict(),
            "iter_num": 40,
            "best_val_loss": 1.5,
            "config": {"dataset": "fox", "learning_rate": 3e-3},
        },
        path,
    )
    return path


def test_nanogpt_ckpt_imports(trained, tmp_path):
    ckpt = _nanogpt_ckpt(trained.model, tmp_path / "ckpt.pt")
    model = build_model(trained.model.cfg, 257)
    src = load_init_weights(model, ckpt)
    assert src["n_head"] == 2 and src["vocab_size"] == 257
    _assert_same_weights(model.state_dict(), trained.model.state_dict())


# ----------------------------------------------------------------------------------------------
# Bad inputs: one clear line, exit 2, nothing executed, nothing damaged


class _Touch:
    """A pickle payload: unpickling it creates a file (stands for any code a stranger ships)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.slow
def test_pickle_that_runs_code_is_refused_and_runs_nothing(trained, tmp_path):
    control, marker = tmp_path / "control-ran", tmp_path / "marker-ran"
    pickle.loads(pickle.dumps({"model": _Touch(control)}))  # the payload works when unpickled
    assert control.exists()
    evil = tmp_path / "ckpt.pt"
    torch.save({"model": {"x": _Touch(marker)}, "model_args": {}}, evil)
    res = run_cli("train", *_tiny_args(tmp_path / "run", trained.data), "--run.init_from", evil)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "not a plain state dict" in lines[0]
    )
    assert "so it was refused" in lines[0] and not marker.exists()
    with pytest.raises(UserError, match="not a plain state dict"):
        load_init_weights(trained.model, evil)
    assert not marker.exists()


def _tiny_args(run: Path, data: Path) -> list[str]:
    return [*TINY, "--run.dir", str(run), "--data.dir", str(data)]


def test_mismatched_vocabulary_names_the_difference(trained, tmp_path, capsys):
    wte = torch.zeros(300, 64)
    ckpt = _nanogpt_ckpt(
        trained.model,
        tmp_path / "ckpt.pt",
        **{"_orig_mod.transformer.wte.weight": wte, "_orig_mod.lm_head.weight": wte},
    )
    with pytest.raises(UserError, match=r"vocab_size is 300, the model's 257"):
        load_init_weights(build_model(trained.model.cfg, 257), ckpt)
    flags = ["--run.init_from", ckpt, "--model.n_layer", "3"]
    line = _user_error(
        capsys,
        ["train", *_tiny_args(tmp_path / "run", trained.data), *flags],
        "does not fit the model",
    )
    assert "vocab_size is 300" in line and "n_layer is 2, the model's 3" in line


def test_not_a_model_directory(trained, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="is not a model"):
        load_init_weights(trained.model, junk)
    (junk / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="only GPT-2"):
        load_init_weights(trained.model, junk)
    _user_error(capsys, ["sample", junk], "only GPT-2")
    (junk / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="is a Llama model: set --model.arch llama"):
        load_init_weights(trained.model, junk)  # a gpt2 model: say which arch fits
    _user_error(capsys, ["sample", junk], "Llama config.json but no model.safetensors")
    _user_error(capsys, ["export", junk, "--out", tmp_path / "out"], "no valid checkpoint")
    _user_error(capsys, ["export", trained.run, "--out", junk], "already exists")
    assert sorted(p.name for p in junk.iterdir()) == ["config.json", "notes.txt"]  # untouched


def test_bias_free_model_exports_zero_biases_and_comes_back(trained, tf, tmp_path):
    flags = ["--model.bias", "false", "--train.max_steps", "3", "--schedule.warmup_steps", "1"]
    result = train(tiny_config(tmp_path / "run", trained.data, *flags), progress=False)
    info = export(tmp_path / "run", "hf", tmp_path / "hf")
    assert any("zeros were written" in n for n in info["notes"])
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not hf["transformer.h.0.mlp.c_fc.bias"].any() and not hf["transformer.ln_f.bias"].any()
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.tensor([ByteTokenizer().encode(TEXT)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, result.model.eval()(x)[0], atol=1e-5, rtol=0)
    back = build_model(result.model.cfg, 257)  # bias=False: the zeros are dropped on the way in
    load_init_weights(back, tmp_path / "hf")
    _assert_same_weights(back.state_dict(), result.model.state_dict())
    with pytest.raises(UserError, match=r"set --model.bias false"):
        load_init_weights(build_model(trained.model.cfg, 257), tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# Tokenizer files


def test_byte_level_tokenizer_is_exactly_utf8_bytes():
    from stalwart.data.hf_tokenizer import byte_level_tokenizer, bytes_to_unicode

    tok = byte_level_tokenizer()
    assert tok.get_vocab_size() == 256
    all_bytes = bytes(range(256)).decode("latin-1")  # every code point 0..255, 2 bytes above 127
    texts = [TEXT, all_bytes, "\x00\r\n\t  x", "".join(chr(c) for c in range(0x2000, 0x2100))]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    b2u = bytes_to_unicode()  # id b is GPT-2's printable stand-in for byte b, 256 distinct
    assert [tok.id_to_token(b) for b in range(256)] == [b2u[b] for b in range(256)]
    assert len(set(b2u.values())) == 256


def test_tiktoken_conversion_gives_the_same_ids():
    tiktoken = pytest.importorskip("tiktoken")
    from stalwart.data.hf_tokenizer import tiktoken_to_tokenizers

    # a small tiktoken BPE with GPT-2's split pattern: 256 bytes, then merges in rank order
    ranks = {bytes([b]): b for b in range(256)}
    for piece in [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" a", b"an", b"and"]:
        ranks[piece] = len(ranks)
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    eot = len(ranks)
    enc = tiktoken.Encoding("tiny", pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": eot})  # fmt: skip
    tok = tiktoken_to_tokenizers(enc)
    for text in [TEXT, "the thing and another thing, then a band singing in the rain"]:
        assert tok.encode(text).ids == enc.encode_ordinary(text)
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<|endoftext|>") == eot
