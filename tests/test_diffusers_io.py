"""Export to / import from diffusers' DiTTransformer2DModel: same outputs both directions (fp32)."""

from __future__ import annotations

import pytest
import torch

from latentdit.errors import LatentDiTError
from latentdit.models import create_dit, from_diffusers, to_diffusers
from dit_helpers import randomize

diffusers = pytest.importorskip("diffusers")



def small(**kw):
    args = dict(input_size=8, num_classes=10, depth=2)
    args.update(kw)
    return randomize(create_dit("DiT-T/2", **args))


def batch(model, n: int = 4):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, model.in_channels if hasattr(model, "in_channels") else 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999][:n])
    y = torch.tensor([0, 3, 9, 10][:n])  # 10 = the null class
    return x, t, y


def run_ours(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y)


def run_theirs(dit2d, x, t, y):
    with torch.no_grad():
        return dit2d(x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("learn_sigma, internal_block", [(True, None), (False, None), (True, 0)])
def test_export_gives_the_same_outputs(learn_sigma, internal_block):
    model = small(learn_sigma=learn_sigma, internal_block=internal_block)  # an internal head is left out
    dit2d = to_diffusers(model)
    assert isinstance(dit2d, diffusers.DiTTransformer2DModel)
    assert dit2d.config.out_channels == model.out_channels and dit2d.config.num_embeds_ada_norm == 10
    x, t, y = batch(model)
    ours = run_ours(model, x, t, y)
    assert ours.abs().max() > 0.1 and ours.std(dim=0).mean() > 1e-3  # non-trivial, input-dependent outputs
    torch.testing.assert_close(run_theirs(dit2d, x, t, y), ours, atol=1e-5, rtol=1e-5)
    # fractional timesteps too
    tf = t.float() + 0.5
    torch.testing.assert_close(run_theirs(dit2d, x, tf, y), run_ours(model, x, tf, y), atol=1e-5, rtol=1e-5)


def test_import_gives_the_same_outputs():
    torch.manual_seed(0)
    dit2d = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10, norm_eps=1e-6)
    randomize(dit2d)
    # share block 0's embedders across blocks and use the DiT timestep features: exactly a DiT
    emb0 = dit2d.transformer_blocks[0].norm1.emb
    for block in dit2d.transformer_blocks:
        block.norm1.emb.load_state_dict(emb0.state_dict())
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    model = from_diffusers(dit2d)
    assert model.config["hidden_size"] == 64 and model.learn_sigma and model.null_class_id == 10
    x, t, y = batch(model)
    theirs = run_theirs(dit2d, x, t, y)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(run_ours(model, x, t, y), theirs, atol=1e-5, rtol=1e-5)


def test_round_trip_keeps_every_weight():
    model = small()
    back = from_diffusers(to_diffusers(model))
    assert back.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not back.pos_embed.requires_grad


def test_stock_diffusers_model_needs_allow_inexact():
    torch.manual_seed(0)
    dit2d = randomize(diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                                      out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                                      num_embeds_ada_norm=10))
    with pytest.raises(LatentDiTError, match=r"downscale_freq_shift \[1\.0\].*norm_eps is 1e-05.*allow_inexact=True"):
        from_diffusers(dit2d)
    model = from_diffusers(dit2d, allow_inexact=True)
    assert torch.equal(model.blocks[0].attn.qkv.weight[:64],
                       dit2d.transformer_blocks[0].attn1.to_q.weight)
    # the documented difference is real: stock diffusers features use frequency shift 1
    x, t, y = batch(model)
    assert (run_ours(model, x, t, y) - run_theirs(dit2d, x, t, y)).abs().max() > 1e-4


def test_unrepresentable_models_are_refused():
    with pytest.raises(LatentDiTError, match="class_dropout_prob=0 .*cannot be represented"):
        to_diffusers(small(class_dropout_prob=0.0))
    with pytest.raises(LatentDiTError, match="MLP ratio 4"):
        to_diffusers(small(mlp_ratio=2.0))
    model = small()
    with torch.no_grad():
        model.pos_embed.add_(0.1)
    with pytest.raises(LatentDiTError, match="pos_embed differs from the fixed 2D sin-cos table"):
        to_diffusers(model)

    dit2d = to_diffusers(small())
    with torch.no_grad():
        dit2d.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(0.01)
    with pytest.raises(LatentDiTError, match="block 1 has its own timestep/label embedder weights"):
        from_diffusers(dit2d)
    odd = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                          activation_fn="gelu", norm_eps=1e-6)
    with pytest.raises(LatentDiTError, match="activation_fn is 'gelu', expected 'gelu-approximate'"):
        from_diffusers(odd)


@pytest.mark.parametrize("option, shown", [(dict(norm="rmsnorm"), "norm='rmsnorm'"), (dict(mlp="swiglu"), "mlp='swiglu'"),
                                           (dict(pos="rope2d"), "pos='rope2d'"), (dict(qk_norm=True), "qk_norm=True")])
def test_models_with_block_options_are_refused(option, shown):
    with pytest.raises(LatentDiTError, match=rf"only the DiT paper's blocks; this model uses {shown}"):
        to_diffusers(small(**option))
