"""Internal Guidance: the DiT's internal head against a hand computation, its loss in the trainer (logged,
exact resume, refusals), and its guidance internal + w·(final − internal) with and without classifier-free
guidance, inside its interval, through the sampling tools."""

from __future__ import annotations

import json

import pytest
import torch

from latentdit.diffusion import FlowProcess
from latentdit.errors import LatentDiTError
from latentdit.models import DiT
from latentdit.models.dit import modulate
from latentdit.sampling import SamplerSettings, make_model_fn, sample_latents
from latentdit.sampling.internal import InternallyGuided
from latentdit.training import train
from latentdit.training.data import StepRandomness
from latentdit.training.regularizers import InternalLoss, build_regularizers
from latentdit.training.trainer import micro_batch_terms
from latentdit.weights import load_model_for_sampling, save_weights
from training_helpers import assert_same_losses, make_cfg
from script_helpers import load_tool

try:
    from sampling_helpers import make_tiny_vae_dir, run_sample_tool
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import make_tiny_vae_dir, run_sample_tool

FLOW = FlowProcess()


def _ig_dit(internal_block: int | None = 1, learn_sigma: bool = False, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=3,
                learn_sigma=learn_sigma, internal_block=internal_block)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

def test_the_internal_head_reads_its_block_and_changes_nothing_else():
    model = _ig_dit(internal_block=1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 900.0]), torch.tensor([0, 2])
    with torch.no_grad():
        plain = model(x, t, y)
        final, extras = model(x, t, y, return_internal=True)
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        for block in model.blocks[:2]:  # blocks 0 and 1
            h = block(h, c, None)
        head = model.internal_layer
        shift, scale = head.adaLN_modulation(c).chunk(2, dim=1)
        by_hand = model.unpatchify(head.linear(modulate(head.norm_final(h), shift, scale)))
    assert torch.equal(final, plain) and extras.blocks == {}
    torch.testing.assert_close(extras.internal, by_hand, rtol=0, atol=0)
    assert model.config["internal_block"] == 1 and any(k.startswith("internal_layer.") for k in model.state_dict())
    fresh = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=3,
                learn_sigma=False, internal_block=2)
    assert not fresh(x, t, y, return_internal=True)[1].internal.any()  # zero-initialised like the final layer
    # without the option nothing changes: no head, no config key, and asking for it is refused
    bare = _ig_dit(internal_block=None)
    assert "internal_block" not in bare.config and bare.internal_layer is None
    with pytest.raises(LatentDiTError, match="no internal head"):
        bare(x, t, y, return_internal=True)


@pytest.mark.parametrize("value", [3, -1, True, 1.0])
def test_internal_block_out_of_range_is_refused(value):
    with pytest.raises(LatentDiTError, match=r"model.internal_block: expected a block index in \[0, 2\]"):
        DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=3,
            internal_block=value)


def test_weights_rebuild_the_head_on_load(tmp_path):
    model = _ig_dit(internal_block=1)
    save_weights(model.state_dict(), tmp_path / "ema.safetensors", model.config, class_names=["a", "b", "c"],
                 process=FLOW.metadata())
    loaded = load_model_for_sampling(tmp_path / "ema.safetensors").model
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([0.5]), torch.tensor([1])
    with torch.no_grad():
        a, b = model(x, t, y, return_internal=True), loaded(x, t, y, return_internal=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].internal, b[1].internal)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def test_the_internal_loss_is_the_process_loss_of_the_head_on_the_same_draw():
    model = _ig_dit(internal_block=1).train()
    x0, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 0])
    rand = StepRandomness.draw(0, 3, 4, (4, 8, 8), FLOW, 0.1)
    terms = micro_batch_terms(FLOW, model, x0, y, rand, True, [InternalLoss(0.5)])
    # by hand: the same x_t and target, read off the head's prediction
    t, noise = rand.t, rand.noise
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    final, extras = model(x_t, FLOW.model_time(t), y, force_drop_ids=rand.drop, return_internal=True)
    target = noise - x0
    torch.testing.assert_close(terms["loss"], ((final - target) ** 2).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["internal"], ((extras.internal - target) ** 2).mean(), rtol=1e-5, atol=1e-7)
    assert terms["internal"] != terms["loss"]


def test_build_regularizers_adds_the_internal_loss_only_with_a_head():
    from latentdit.config import TrainConfig

    assert build_regularizers(TrainConfig(), depth=4) == []
    assert build_regularizers(TrainConfig(), depth=4, internal_block=1) == [InternalLoss(0.5)]
    assert build_regularizers(TrainConfig(internal_loss_weight=2.0), depth=4, internal_block=0) == [InternalLoss(2.0)]
    with pytest.raises(LatentDiTError, match=r"'train.internal_loss_weight': expected a number > 0 with"):
        build_regularizers(TrainConfig(internal_loss_weight=0.0), depth=4, internal_block=1)
    with pytest.raises(LatentDiTError, match=r"'train.internal_loss_weight': expected its default unless"):
        build_regularizers(TrainConfig(internal_loss_weight=1.0), depth=4)
    with pytest.raises(LatentDiTError, match=r"'train.internal_loss_weight': expected a finite number >= 0"):
        build_regularizers(TrainConfig(internal_loss_weight=float("nan")), depth=4, internal_block=1)


IG = ["diffusion.process=flow", "model.learn_sigma=false", "model.internal_block=1"]


def test_training_with_the_head_logs_its_loss_trains_it_and_resumes_exactly(latents, tmp_path):
    full = tmp_path / "full"
    train(make_cfg(latents, full, "train.max_steps=4", *IG))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(r["internal"] > 0 for r in rows)
    ema = load_model_for_sampling(full / "checkpoints").model
    assert ema.internal_block == 1 and ema.internal_layer.linear.weight.abs().sum() > 0  # it learned
    part = tmp_path / "part"
    train(make_cfg(latents, part, "train.max_steps=2", "train.ckpt_every=2", *IG))
    train(make_cfg(latents, part, "train.max_steps=4", "train.ckpt_every=2", *IG), resume="auto")
    assert_same_losses(full, part, 4, rel=1e-6, abs=1e-7)
    with pytest.raises(LatentDiTError, match=r"internal_block: expected a block index in \[0, 2\]"):
        train(make_cfg(latents, tmp_path / "bad", *IG[:2], "model.internal_block=3"))
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------

def _outputs(model, x, t, y):
    with torch.no_grad():
        final, extras = model(x, t, y, return_internal=True)
    return final, extras.internal


def test_internally_guided_output_by_hand_with_and_without_cfg():
    model = _ig_dit(internal_block=1, learn_sigma=True)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    t = torch.tensor([400.0, 400.0])
    final, weak = _outputs(model, x, t, y)
    with torch.no_grad():
        guided = InternallyGuided(model, 1.5)(x, t, y)
    torch.testing.assert_close(guided[:, :4], weak[:, :4] + 1.5 * (final[:, :4] - weak[:, :4]))
    assert torch.equal(guided[:, 4:], final[:, 4:])  # the learned σ comes from the final head
    # with cfg: both halves internally guided, then uncond + s·(cond − uncond)
    null = torch.full_like(y, model.null_class_id)
    fu, wu = _outputs(model, x, t, null)
    cond = weak[:, :4] + 1.5 * (final[:, :4] - weak[:, :4])
    uncond = wu[:, :4] + 1.5 * (fu[:, :4] - wu[:, :4])
    with torch.no_grad():
        out = make_model_fn(model, y, cfg_scale=3.0, internal_scale=1.5)(x, torch.tensor(400.0))
    torch.testing.assert_close(out[:, :4], uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-6)
    # w = 1 and times outside the interval are the plain model
    with torch.no_grad():
        plain = model(x, t, y)
        torch.testing.assert_close(make_model_fn(model, y, cfg_scale=1.0, internal_scale=1.0)(x, t), plain)
        outside = make_model_fn(model, y, cfg_scale=1.0, internal_scale=2.0, internal_at=lambda s: float(s[0]) > 500)
        torch.testing.assert_close(outside(x, t), plain)
        torch.testing.assert_close(outside(x, t + 200)[:, :4],
                                   InternallyGuided(model, 2.0)(x, t + 200, y)[:, :4])


def test_one_euler_step_is_the_internally_guided_velocity():
    model = _ig_dit(internal_block=0)
    settings = SamplerSettings(sampler="euler", num_steps=1, internal_scale=1.4).resolved(FLOW, 4, internal_head=True)
    assert settings.describe() == "euler-1, cfg 1, internal guidance 1.4"
    x1 = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 2])
    final, weak = _outputs(model, x1, torch.full((2,), FLOW.model_time(torch.tensor(1.0)).item()), y)
    out = sample_latents(model, [1, 2], settings, x_T=x1)
    torch.testing.assert_close(out, x1 - (weak + 1.4 * (final - weak)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields, head, guide, match", [
    (dict(internal_scale=1.5), False, False, r"needs a model trained with an internal head"),
    (dict(internal_interval=(0.0, 0.5)), True, False, r"--internal-interval applies to internal guidance only"),
    (dict(internal_scale=-1.0), True, False, r"internal guidance scale \(--internal-scale\) must be a finite"),
    (dict(internal_scale=1.5, internal_interval=(0.0, 2.0)), True, False, r"--internal-interval: guidance interval"),
    (dict(internal_scale=1.5, guide_scale=2.0), True, True, r"are exclusive"),
])
def test_settings_refuse_internal_guidance_where_it_does_not_apply(fields, head, guide, match):
    from latentdit.sampling import Guide

    g = Guide(_ig_dit(internal_block=None), FLOW) if guide else None
    with pytest.raises(LatentDiTError, match=match):
        SamplerSettings(sampler="euler", **fields).resolved(FLOW, 4, guide=g, internal_head=head)


def test_sampling_tools_take_the_internal_scale(tmp_path, capsys):
    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    meta = dict(class_names=["a", "b", "c"], vae=str(vae_dir), process=FLOW.metadata())
    ckpt = tmp_path / "ema.safetensors"
    model = _ig_dit(internal_block=1)
    save_weights(model.state_dict(), ckpt, model.config, **meta)
    bare = tmp_path / "bare.safetensors"
    save_weights(_ig_dit(internal_block=None).state_dict(), bare, _ig_dit(internal_block=None).config, **meta)
    common = ["--labels", "0", "--samples-per-label", "1", "--device", "cpu", "--num-steps", "2"]
    code = run_sample_tool(["--ckpt", str(ckpt), *common, "--internal-scale", "1.4", "--internal-interval", "0.2,1",
                            "--cfg-scale", "2", "--out", str(tmp_path / "g.png")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "heun-2, cfg 2, internal guidance 1.4" in out.out and (tmp_path / "g.png").exists()
    code = run_sample_tool(["--ckpt", str(bare), *common, "--internal-scale", "1.4", "--out", str(tmp_path / "h.png")])
    assert code == 2 and "needs a model trained with an internal head" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()

    tool = load_tool("sample_ddp")
    argv = ["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "out"), "--num-samples", "2", "--chunk-size", "2",
            "--batch-size", "2", "--num-steps", "2", "--cfg-scale", "1"]
    assert tool.main(argv + ["--internal-scale", "1.4"]) == 0
    with pytest.raises(LatentDiTError, match=r"other settings.*internal_scale"):
        tool.main(argv)  # chunks of internally guided samples are not taken for plain ones
