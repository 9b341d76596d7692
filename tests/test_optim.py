import torch

from stalwart.config import OptimConfig
from stalwart.model.gpt import build_model
from stalwart.optim.build import build_optimizer, param_groups
from tests.test_model import tiny


def test_decay_groups_cover_every_parameter_once():
    model = build_model(tiny(), 256)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # nothing twice (the tied head is one tensor)
    assert set(ids) == {id(p) for p in model.parameters()}  # nothing missed
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    # every matrix decayed, every bias and norm weight not
    assert "transformer.wte.weight" in decay["names"]
    assert "transformer.h.0.attn.c_attn.weight" in decay["names"]
    assert "transformer.h.0.attn.c_attn.bias" in no_decay["names"]
    assert "transformer.h.0.ln_1.weight" in no_decay["names"]
    assert "transformer.ln_f.bias" in no_decay["names"]


def test_build_optimizer_variants():
    model = build_model(tiny(), 256)
    for name, cls in [
        ("adamw", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
        ("sgd", torch.optim.SGD),
        ("momentum", torch.optim.SGD),
    ]:
        opt = build_optimizer(OptimConfig(name=name), model)
        assert isinstance(opt, cls)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    adamw = build_optimizer(OptimConfig(), model)
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["fused"] is True
    assert build_optimizer(OptimConfig(name="momentum"), model).defaults["momentum"] == 0.9
