import pytest
import torch

from stalwart.config import ModelConfig
from stalwart.model.gpt import build_model, flops_per_token, num_params


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = build_model(tiny(), 256)
    x, y = torch.randint(0, 256, (2, 3, 32))
    logits, loss = model(x, y)
    assert logits.shape == (3, 32, 256)
    # at init the prediction is near uniform: loss ~ ln(256) = 5.55
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3
    logits, none = model(x[:, :5])
    assert logits.shape == (3, 5, 256) and none is None


def test_weight_tying_and_param_count():
    cfg = tiny()
    model = build_model(cfg, 256)
    assert model.lm_head.weight is model.transformer.wte.weight
    counts = num_params(cfg, 256)
    assert model.num_params() == counts["total"]
    assert model.num_params(exclude_position=True) == counts["total"] - counts["wpe"]
    nobias = tiny(bias=False)
    assert build_model(nobias, 256).num_params() == num_params(nobias, 256)["total"]


def test_gpt2_124m_param_count():
    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    assert num_params(cfg, 50257)["total"] == 124_439_808  # the published GPT-2 small count


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = build_model(tiny(n_layer=8, n_embd=128), 256)
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.1)
    assert std_proj == pytest.approx(0.02 / 4.0, rel=0.1)  # 1 / sqrt(2 * 8)


def test_flops_per_token_formula():
    cfg = tiny()
    C, L, T, V = 64, 2, 32, 256
    assert flops_per_token(cfg, V) == 6 * (12 * L * C * C + V * C) + 12 * L * T * C


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("spec", ["full", "every:2", "selective"])
def test_activation_checkpointing_gives_identical_gradients(spec, arch):
    torch.manual_seed(0)
    ref = build_model(tiny(n_layer=3, arch=arch), 256)
    ckpt = build_model(tiny(n_layer=3, arch=arch, activation_checkpointing=spec), 256)
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randint(0, 256, (4, 32))
    for m in (ref, ckpt):
        _, loss = m(x, x)
        loss.backward()
    assert any(b.checkpointed or b.selective for b in ckpt.blocks)
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        assert torch.equal(a.grad, b.grad), n
