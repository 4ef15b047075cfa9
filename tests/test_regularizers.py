"""The representation regularisers (LayerSync, dispersive loss): hand-computed values, the DiT's block
tokens they read, their config checks, their metrics and exact resume with them on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentdit.config import TrainConfig
from latentdit.errors import LatentDiTError
from latentdit.models import DiT
from latentdit.training import train
from latentdit.training.regularizers import Dispersive, LayerSync, build_regularizers
from training_helpers import assert_same_losses, make_cfg

# ----------------------------------------------------------------------------------------------
# the losses against hand-computed values
# ----------------------------------------------------------------------------------------------


def test_layersync_is_minus_the_mean_token_cosine_and_pulls_only_the_source():
    # sample 0: token 0 parallel (cos 1), token 1 orthogonal (cos 0); sample 1: anti-parallel (−1), cos 1/√2
    src = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 0.0]]], requires_grad=True)
    tgt = torch.tensor([[[3.0, 0.0], [5.0, 0.0]], [[-2.0, -2.0], [1.0, 1.0]]], requires_grad=True)
    loss = LayerSync(weight=0.5, source=1, target=3)({1: src, 3: tgt})
    expected = -(1.0 + 0.0 - 1.0 + 1 / math.sqrt(2)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    loss.backward()
    assert tgt.grad is None and src.grad is not None and src.grad.abs().sum() > 0


def test_dispersive_l2_is_the_log_mean_of_the_full_pair_matrix():
    # two samples of 2 tokens × 1 channel: flattened z = (0, 0) and (1, 1); D = ‖Δ‖² / dim = 2 / 2 = 1
    z = torch.tensor([[[0.0], [0.0]], [[1.0], [1.0]]])
    for tau in (1.0, 0.5):
        got = Dispersive(weight=1.0, block=0, tau=tau)({0: z}).item()
        assert got == pytest.approx(math.log((2 + 2 * math.exp(-1 / tau)) / 4), abs=1e-7)
    # three samples: D(a, b) = 4/2, D(a, c) = 1/2, D(b, c) = 5/2 with a = (0, 0), b = (2, 0), c = (0, 1)
    z3 = torch.tensor([[[0.0], [0.0]], [[2.0], [0.0]], [[0.0], [1.0]]])
    pairs = [2.0, 0.5, 2.5]
    expected = math.log((3 + 2 * sum(math.exp(-d) for d in pairs)) / 9)
    assert Dispersive(1.0, 0)({0: z3}).item() == pytest.approx(expected, abs=1e-6)


def test_dispersive_cosine_and_its_gradient_pushes_samples_apart():
    z = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]], requires_grad=True)
    loss = Dispersive(1.0, 0, tau=0.5, distance="cosine")({0: z})
    c = 1 / math.sqrt(2)  # cos between the two samples; each sample's cos with itself is 1
    assert loss.item() == pytest.approx(math.log((2 * math.exp(1 / 0.5) + 2 * math.exp(c / 0.5)) / 4), abs=1e-6)
    loss.backward()
    with torch.no_grad():  # one gradient step lowers the similarity between the two samples
        moved = z - 0.1 * z.grad
        before = torch.nn.functional.cosine_similarity(z[0, 0], z[1, 0], dim=0)
        after = torch.nn.functional.cosine_similarity(moved[0, 0], moved[1, 0], dim=0)
    assert after < before


# ----------------------------------------------------------------------------------------------
# the DiT's block tokens
# ----------------------------------------------------------------------------------------------


def _tiny_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=3)
    for p in model.parameters():  # the zero init would make every block the identity
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_return_blocks_gives_the_block_outputs_and_the_same_prediction():
    model = _tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        plain = model(x, t, y)
        out, (blocks, internal) = model(x, t, y, return_blocks=(1, 3))
        # by hand: the same embedding and blocks, read after blocks 1 and 3
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        seen = []
        for block in model.blocks:
            h = block(h, c, None)
            seen.append(h)
    assert torch.equal(out, plain) and sorted(blocks) == [1, 3] and internal is None
    assert torch.equal(blocks[1], seen[1]) and torch.equal(blocks[3], seen[3])
    assert blocks[1].shape == (2, 16, 32)
    with pytest.raises(LatentDiTError, match=r"return_blocks must be block indices in \[0, 3\]"):
        model(x, t, y, return_blocks=(4,))


# ----------------------------------------------------------------------------------------------
# the config fields
# ----------------------------------------------------------------------------------------------


def test_build_regularizers_defaults_off_and_refuses_what_does_not_apply():
    assert build_regularizers(TrainConfig(), depth=4) == []
    regs = build_regularizers(TrainConfig(layersync_weight=0.2, layersync_blocks=[0, 2], dispersive_weight=0.5,
                                          dispersive_block=1, dispersive_tau=0.5), depth=4)
    assert regs == [LayerSync(0.2, 0, 2), Dispersive(0.5, 1, 0.5, "l2")]
    bad = [
        (dict(layersync_weight=0.1), r"'train.layersync_blocks': expected two block indices"),
        (dict(layersync_weight=0.1, layersync_blocks=[2, 1]), r"'train.layersync_blocks'.*source < target"),
        (dict(layersync_weight=0.1, layersync_blocks=[1, 4]), r"'train.layersync_blocks'.*\[0, 3\].*4 blocks"),
        (dict(layersync_weight=-1.0), r"'train.layersync_weight': expected a finite number >= 0"),
        (dict(dispersive_weight=0.5), r"'train.dispersive_block': expected a block index"),
        (dict(dispersive_weight=0.5, dispersive_block=0, dispersive_tau=0.0), r"'train.dispersive_tau'"),
        (dict(dispersive_weight=0.5, dispersive_block=0, dispersive_distance="l1"),
         r"'train.dispersive_distance': expected one of l2, cosine"),
    ]
    for fields, message in bad:
        with pytest.raises(LatentDiTError, match=message):
            build_regularizers(TrainConfig(**fields), depth=4)


# ----------------------------------------------------------------------------------------------
# training with them: metrics, the default unchanged, exact resume
# ----------------------------------------------------------------------------------------------

REGS = ["train.layersync_weight=0.5", "train.layersync_blocks=[0,2]", "train.dispersive_weight=0.25",
        "train.dispersive_block=1", "train.dispersive_tau=0.5"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_the_terms_and_resumes_exactly(latents, tmp_path):
    full = tmp_path / "full"
    train(make_cfg(latents, full, "train.max_steps=4", *REGS))
    rows = _rows(full)
    assert all(-1.0 <= r["layersync"] <= 1.0 and r["dispersive"] <= 0.0 for r in rows)
    part = tmp_path / "part"
    train(make_cfg(latents, part, "train.max_steps=2", "train.ckpt_every=2", *REGS))
    train(make_cfg(latents, part, "train.max_steps=4", "train.ckpt_every=2", *REGS), resume="auto")
    assert_same_losses(full, part, 4, rel=1e-6, abs=1e-7)
    for a, b in zip(rows, _rows(part)):
        assert b["layersync"] == pytest.approx(a["layersync"], rel=1e-6, abs=1e-7)
        assert b["dispersive"] == pytest.approx(a["dispersive"], rel=1e-6, abs=1e-7)
    # the regularisers change the training; with their weights at 0 the run is the default one
    plain = tmp_path / "plain"
    train(make_cfg(latents, plain, "train.max_steps=4"))
    zero = tmp_path / "zero"
    train(make_cfg(latents, zero, "train.max_steps=4", "train.layersync_weight=0", "train.dispersive_weight=0",
                   "train.layersync_blocks=[0,2]", "train.dispersive_block=1"))
    assert [r["loss"] for r in _rows(zero)] == [r["loss"] for r in _rows(plain)]
    assert "layersync" not in _rows(plain)[0] and [r["loss"] for r in rows] != [r["loss"] for r in _rows(plain)]


def test_bad_regularizer_fields_are_refused_before_anything_is_written(latents, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LatentDiTError, match=r"'train.dispersive_block'.*\[0, 3\]"):
        train(make_cfg(latents, run, "train.dispersive_weight=0.5", "train.dispersive_block=7"))
    assert not run.exists()
