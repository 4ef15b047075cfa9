"""The DiT trainer's LR schedules (by steps and by time), the power EMA, the resized named models, and the
settings refused before any latent is read."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

from latentdit.engine.budget import TimeBudget
from latentdit.engine.schedule import lr_at
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors
from latentdit.training import train
from latentdit.training.ema import power_gamma
from test_cli_errors import user_error
from training_helpers import assert_same_losses, make_cfg, write_yaml_cfg


def metric_rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    pass


def stop_at(step: int):
    """A loss hook that ends the run when ``step`` starts (the checkpoint before it is kept)."""
    def hook(s: int, loss: torch.Tensor) -> torch.Tensor:
        if s == step:
            raise Interrupt
        return loss
    return hook


# ----------------------------------------------------------------------------------------------
# LR schedules by steps: the logged rates and exact resume
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [["train.lr_schedule=cosine"],
                                      ["train.lr_schedule=wsd", "train.decay_fraction=0.5"],
                                      ["train.lr_schedule=cosine", "train.optimizer=muon"]])
def test_step_schedules_log_their_rates_and_resume_exactly(latents, tmp_path, schedule):
    extra = [*schedule, "train.max_steps=6", "train.warmup_steps=2", "train.min_lr_ratio=0.1"]
    full = tmp_path / "full"
    train(make_cfg(latents, full, *extra))
    kind = schedule[0].split("=")[1]
    expected = [lr_at(s, 1.0, 2, 6, 0.1, schedule=kind, decay_fraction=0.5) * 1e-3 for s in range(6)]
    assert [r["lr"] for r in metric_rows(full)] == pytest.approx(expected, rel=1e-12)
    assert expected[5] < expected[2]  # the rate did decay

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        train(make_cfg(latents, part, *extra, "train.ckpt_every=3"), loss_hook=stop_at(4))
    result = train(make_cfg(latents, part, *extra, "train.ckpt_every=3"), resume="auto")
    assert result.step == 6
    assert_same_losses(full, part, 6, rel=1e-6, abs=1e-7)
    assert [r["lr"] for r in metric_rows(part)] == [r["lr"] for r in metric_rows(full)]


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_muon_takes_the_attention_and_mlp_matrices_of_the_blocks(mlp):
    from latentdit.config import TrainConfig
    from latentdit.models.dit import DiT
    from latentdit.training.state import build_optimizer

    model = DiT(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=3, learn_sigma=False, mlp=mlp,
                internal_block=0)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"])
    per_block = ["attn.proj.weight", "attn.qkv.weight"] + (
        ["mlp.fc1.weight", "mlp.fc2.weight"] if mlp == "gelu" else
        ["mlp.fc1_g.weight", "mlp.fc1_x.weight", "mlp.fc2.weight"])
    assert muon == [f"blocks.{b}.{n}" for b in range(2) for n in per_block]
    rest = [names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert len(rest) + len(muon) == sum(p.requires_grad for p in model.parameters())
    assert "blocks.0.adaLN_modulation.1.weight" in rest and "internal_layer.linear.weight" in rest


# ----------------------------------------------------------------------------------------------
# LR schedule by time: a faked clock, 10 s per step, a 1-minute budget
# ----------------------------------------------------------------------------------------------

def test_time_schedule_follows_the_budget_and_resumes_its_position(latents, tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("latentdit.training.state.TimeBudget", functools.partial(TimeBudget, clock=lambda: now[0]))

    def tick(step: int, loss: torch.Tensor) -> torch.Tensor:
        now[0] = 10.0 * step  # step s ends 10·s seconds into the run
        return loss

    extra = ["train.lr_schedule=cosine", "train.max_minutes=1", "train.max_steps=100", "train.ckpt_every=3"]
    full = tmp_path / "full"
    result = train(make_cfg(latents, full, *extra), loss_hook=tick)
    assert (result.step, result.stop_reason) == (6, "max_minutes")
    # step s's rate is set when step s−1 ends, from the fraction measured after step s−2: (s − 2) / 6
    fractions = [0.0, 0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6]
    expected = [1e-3 * lr_at(s, 1.0, 0, 100, 0.0, schedule="cosine", run_fraction=f) for s, f in enumerate(fractions)]
    assert [r["lr"] for r in metric_rows(full)] == pytest.approx(expected, rel=1e-12)
    state = json.loads((full / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["elapsed_s"] == 30.0

    # interrupted after the step-3 checkpoint; the resumed run continues the budget where it was
    now[0] = 0.0
    part = tmp_path / "part"

    def tick_then_stop(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 4:
            raise Interrupt
        return tick(step, loss)

    with pytest.raises(Interrupt):
        train(make_cfg(latents, part, *extra), loss_hook=tick_then_stop)
    now[0] = 30.0
    result = train(make_cfg(latents, part, *extra), resume="auto", loss_hook=tick)
    assert (result.step, result.stop_reason) == (6, "max_minutes")
    assert [r["lr"] for r in metric_rows(part)] == [r["lr"] for r in metric_rows(full)]
    assert_same_losses(full, part, 6, rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------------------------
# the power EMA
# ----------------------------------------------------------------------------------------------

def test_power_ema_is_the_power_average_of_the_live_weights_and_resumes(latents, tmp_path):
    sigma_rel, n = 0.1, 4
    run = tmp_path / "run"
    train(make_cfg(latents, run, "train.ema_decay=0.9999", f"train.ema_sigma_rel={sigma_rel}",
                   f"train.max_steps={n}", "train.ckpt_every=1"))
    ckpts = [run / "checkpoints" / f"step-{s:07d}" for s in range(1, n + 1)]
    live = [load_safetensors(c / "model.safetensors")[0] for c in ckpts]
    ema, _ = load_safetensors(ckpts[-1] / "ema.safetensors")
    g1 = power_gamma(sigma_rel) + 1
    weights = [(tau ** g1 - (tau - 1) ** g1) / n ** g1 for tau in range(1, n + 1)]
    assert sum(weights) == pytest.approx(1.0)
    for name in ("blocks.0.attn.qkv.weight", "x_embedder.proj.weight", "final_layer.linear.weight"):
        hand = sum(w * theta[name].double() for w, theta in zip(weights, live))
        torch.testing.assert_close(ema[name].double(), hand, rtol=1e-5, atol=1e-7)

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        train(make_cfg(latents, part, "train.ema_decay=0.9999", f"train.ema_sigma_rel={sigma_rel}",
                       f"train.max_steps={n}", "train.ckpt_every=2"), loss_hook=stop_at(3))
    train(make_cfg(latents, part, "train.ema_decay=0.9999", f"train.ema_sigma_rel={sigma_rel}",
                   f"train.max_steps={n}", "train.ckpt_every=2"), resume="auto")
    resumed, _ = load_safetensors(part / "checkpoints" / f"step-{n:07d}" / "ema.safetensors")
    assert resumed.keys() == ema.keys() and all(torch.equal(resumed[k], ema[k]) for k in ema)


# ----------------------------------------------------------------------------------------------
# a resized named model: its weights record the resolved numbers
# ----------------------------------------------------------------------------------------------

def test_resized_model_is_recorded_and_rebuilt(latents, tmp_path):
    from latentdit.models import load_dit

    result = train(make_cfg(latents, tmp_path / "run", "model.depth=2", "model.hidden_size=64",
                            "model.num_heads=2", "model.patch_size=4", "train.max_steps=1"))
    _, meta = load_safetensors(result.last_checkpoint / "ema.safetensors")
    recorded = json.loads(meta["latentdit_model"])
    assert {k: recorded[k] for k in ("depth", "hidden_size", "num_heads", "patch_size")} == \
        dict(depth=2, hidden_size=64, num_heads=2, patch_size=4)
    model = load_dit(result.last_checkpoint / "ema.safetensors")
    assert (len(model.blocks), model.hidden_size, model.num_heads, model.patch_size) == (2, 64, 2, 4)


# ----------------------------------------------------------------------------------------------
# refused before any latent is read
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("model.norm=batchnorm", "model.norm: expected one of layernorm, rmsnorm, got 'batchnorm'"),
    ("model.depth=-2", "field 'model.depth': expected an integer >= 1, or 0"),
    ("diffusion.diffusion_steps=0", "diffusion.diffusion_steps: expected an integer >= 1, got 0"),
    ("train.lr_schedule=linear", "train.lr_schedule: expected one of constant, cosine, wsd"),
    ("train.ema_sigma_rel=0.5", "train.ema_sigma_rel: expected 0 (off) or a number in (0, 0.2887), got 0.5"),
    ("train.ema_decay=1.5", "train.ema_decay: expected a number in [0, 1], got 1.5"),
    ("train.optimizer=sgd", "field 'train.optimizer': expected one of adamw, muon, got 'sgd'"),
    ("train.muon_momentum=1", "field 'train.muon_momentum': expected a number in [0, 1), got 1"),
])
def test_train_tool_refuses_a_bad_field_before_reading_latents(tmp_path, capsys, override, message):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", tmp_path / "no-latents-here", ema_decay=0.9999)
    line = user_error("train", ["--config", str(cfg), override, f"train.run_dir={tmp_path / 'run'}"], capsys)
    assert message in line and "latent directory not found" not in line
    assert not (tmp_path / "run").exists()
    with pytest.raises(LatentDiTError, match=re.escape(message)):
        train(make_cfg(tmp_path / "no-latents-here", tmp_path / "run", "train.ema_decay=0.9999", override))
