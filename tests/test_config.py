import dataclasses

import pytest

from stalwart.config import (
    LOGGERS,
    Config,
    TrainConfig,
    freeze,
    from_dict,
    load_config,
    parse_loggers,
    to_dict,
    to_toml,
    validate,
    with_overrides,
)
from stalwart.errors import UserError


def test_overrides_convert_types():
    cfg = load_config(
        None,
        [
            "--model.n_layer",
            "3",
            "--optim.lr=1e-3",
            "--train.compile",
            "true",
            "--train.max_steps",
            "1e3",
            "--run.dir",
            "x",
        ],
    )
    assert cfg.model.n_layer == 3 and isinstance(cfg.model.n_layer, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.train.compile is True
    assert cfg.train.max_steps == 1000
    assert cfg.run.dir == "x"


def test_micro_batch_int_or_auto():
    assert load_config(None, ["--train.micro_batch", "4"]).train.micro_batch == 4
    assert load_config(None, ["--train.micro_batch", "auto"]).train.micro_batch == "auto"
    with pytest.raises(UserError, match="micro_batch"):
        load_config(None, ["--train.micro_batch", "lots"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model.n_layers", "3"], "unknown option --model.n_layers"),
        (["--nosuch.field", "3"], "unknown option --nosuch.field"),
        (["--model.n_layer", "three"], "--model.n_layer expects int"),
        (["--optim.lr", "-1"], "--optim.lr must be positive"),
        (["--train.micro_batch", "0"], "--train.micro_batch must be positive"),
        (["--schedule.warmup_steps", "500", "--train.max_steps", "100"], "warmup_steps"),
        (["--model.n_embd", "100", "--model.n_head", "3"], "divisible"),
        (["--optim.name", "lion"], "--optim.name must be one of"),
        (["--model.dropout", "1.5"], "--model.dropout"),
        (["--model.activation_checkpointing", "every:0"], "activation_checkpointing"),
        (["--train.compile", "maybe"], "--train.compile expects bool"),
        (["--optim.lr"], "needs a value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_values_name_the_flag(argv, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        load_config(None, argv)


def test_toml_file_and_unknown_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layer = 3\n[optim]\nlr = 1e-3\n")
    cfg = load_config(str(f), ["--model.n_layer", "5"])  # the command line wins
    assert cfg.model.n_layer == 5 and cfg.optim.lr == 1e-3
    f.write_text("[model]\nn_layerz = 3\n")
    with pytest.raises(UserError, match="n_layerz"):
        load_config(str(f))
    f.write_text("[model\nn_layer = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(str(f))
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--optim.lr", "0.00123", "--run.dir", 'we"ird\\dir'])
    f = tmp_path / "config.toml"
    f.write_text(to_toml(cfg))
    again = load_config(str(f))
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    assert to_dict(Config()) == to_dict(load_config(None, []))


def test_presets_load():
    for name in ("configs/tiny-cpu.toml", "configs/gpt2-124m.toml"):
        cfg = load_config(name)
        assert cfg.model.n_layer > 0
    g = load_config("configs/gpt2-124m.toml")
    assert (g.model.n_layer, g.model.n_embd, g.model.block_size) == (12, 768, 1024)
    assert g.optim.lr == 6e-4 and g.optim.final_lr == pytest.approx(6e-5)
    assert g.schedule.warmup_steps == 715
    tokens_per_step = g.train.micro_batch * g.train.grad_accum * g.model.block_size
    assert tokens_per_step == 524288


def test_each_section_validates_itself():
    cfg = Config()
    cfg.model.n_head = 3  # 256 is not divisible by 3
    with pytest.raises(UserError, match="divisible by --model.n_head"):
        cfg.model.validate()
    cfg.optim.validate()  # the other sections know nothing of it
    cfg.health.lr_backoff = 0.0
    with pytest.raises(UserError, match=r"--health.lr_backoff must be in \(0, 1\], got 0.0"):
        cfg.health.validate()
    # warmup vs max_steps spans two sections: the root checks it
    ok = Config()
    ok.schedule.warmup_steps, ok.train.max_steps = 10, 10
    ok.schedule.validate()
    ok.train.validate()
    with pytest.raises(UserError, match="must be shorter than --train.max_steps"):
        validate(ok)


def test_logger_names_live_in_config():
    assert LOGGERS == ("tensorboard", "wandb")
    assert parse_loggers("none") == [] and parse_loggers("wandb, tensorboard") == [
        "wandb",
        "tensorboard",
    ]
    assert load_config(None, ["--train.loggers", "tensorboard"]).train.logger_list() == [
        "tensorboard"
    ]
    with pytest.raises(UserError, match="unknown logger 'mlflow'; choose from none, tensorboard"):
        parse_loggers("mlflow")


def test_frozen_config_refuses_assignment_and_derives_copies(tmp_path):
    cfg = load_config(None, ["--train.max_steps", "500"])  # frozen once validated
    before = to_dict(cfg)
    assert freeze(cfg) is cfg
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot set model.vocab_size"):
        cfg.model.vocab_size = 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = TrainConfig()
    new = with_overrides(
        cfg, {"train.max_steps": 5, "schedule.warmup_steps": 1, "run.dir": tmp_path}
    )
    assert (new.train.max_steps, new.schedule.warmup_steps, new.run.dir) == (5, 1, str(tmp_path))
    assert to_dict(cfg) == before  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.train.max_steps = 6  # a frozen config gives a frozen copy
    with pytest.raises(UserError, match="must be shorter than --train.max_steps"):
        with_overrides(cfg, {"train.max_steps": 5})  # validated again: warmup 100 >= 5
    with pytest.raises(UserError, match="unknown option --train.max_step"):
        with_overrides(cfg, {"train.max_step": 5})
    with pytest.raises(UserError, match="--optim.name must be one of"):
        with_overrides(cfg, {"optim.name": "lion"})
    # one section: dataclasses.replace gives a changed copy of the slice
    health = dataclasses.replace(cfg.health, enabled=False)
    assert health.enabled is False and cfg.health.enabled is True
    thawed = with_overrides(Config(), {"optim.lr": 1e-3})
    thawed.optim.lr = 2e-3  # a config being built (not frozen) gives a writable copy
    assert thawed.optim.lr == 2e-3
