"""The DiT training loop in-process: checkpoints, metrics, exact resume and its refusals, the NaN stop, the
flow process and the block options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from latentdit.config import load_config
from latentdit.data.latents import LatentDataset
from latentdit.errors import LatentDiTError
from latentdit.training import train
from training_helpers import FLOW, assert_same_losses, losses, make_cfg, tree_bytes


# ----------------------------------------------------------------------------------------------
# the loop in-process: checkpoints, export, resume checks, NaN stop
# ----------------------------------------------------------------------------------------------

def test_train_writes_checkpoints_metrics_and_loadable_ema(latents, tmp_path):
    from latentdit.io import load_safetensors
    from latentdit.models import DiT, load_dit

    run = tmp_path / "run"
    cfg = make_cfg(latents, run, "train.ckpt_every=2", "train.keep_last=1", "train.milestone_every=2",
                   "train.tensorboard=true", "train.warmup_steps=2")
    result = train(cfg)
    assert result.step == 4 and result.last_checkpoint == run / "checkpoints" / "step-0000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    ck = result.last_checkpoint
    assert sorted(p.name for p in ck.iterdir()) == ["ema.safetensors", "model.safetensors", "optimizer.pt",
                                                    "rng-rank0.pt", "scheduler.pt", "state.json"]
    state = json.loads((ck / "state.json").read_text())
    assert (state["step"], state["epoch"], state["position"], state["steps_per_epoch"]) == (4, 0, 4, 8)
    assert state["config"]["train"]["lr"] == cfg.train.lr and "torch" in state["versions"]
    assert load_config(run / "config.yaml") == cfg
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])  # linear warmup over 2 steps
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["img_per_sec"] > 0 for r in rows)
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))

    # the exported EMA loads straight into load_dit, with its class names, and gives the same outputs
    ema_path = ck / "ema.safetensors"
    tensors, meta = load_safetensors(ema_path)
    assert json.loads(meta["latentdit_class_names"]) == ["ant", "bee", "cat", "dog"]
    labels = LatentDataset(latents).labels
    assert json.loads(meta["latentdit_class_counts"]) == torch.bincount(labels, minlength=4).tolist()
    # ... and names the VAE of its latents and its noise schedule, so sampling needs nothing else
    assert json.loads(meta["latentdit_vae"]) == json.loads((latents / "manifest.json").read_text())["vae"]["spec"]
    assert json.loads(meta["latentdit_diffusion"]) == {"noise_schedule": "linear", "diffusion_steps": 1000}
    loaded = load_dit(ema_path).eval()
    manual = DiT(**json.loads(meta["latentdit_model"])).eval()
    manual.load_state_dict(tensors)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), manual(x, t, y), rtol=0, atol=0)
        live = load_dit(ck / "model.safetensors").eval()
        assert not torch.allclose(live(x, t, y), loaded(x, t, y))  # EMA (decay 0.9) lags the live weights
    assert torch.equal(tensors["pos_embed"], load_safetensors(ck / "model.safetensors")[0]["pos_embed"])


def test_ema_decay_zero_equals_live_weights(latents, tmp_path):
    from latentdit.io import load_safetensors

    result = train(make_cfg(latents, tmp_path / "run", "train.ema_decay=0.0", "train.max_steps=2"))
    ema, _ = load_safetensors(result.last_checkpoint / "ema.safetensors")
    live, _ = load_safetensors(result.last_checkpoint / "model.safetensors")
    assert ema.keys() == live.keys() and all(torch.equal(ema[k], live[k]) for k in ema)


def test_in_process_resume_is_exact_and_grad_accum_matches(latents, tmp_path):
    full = tmp_path / "full"
    train(make_cfg(latents, full, "train.max_steps=6"))
    part = tmp_path / "part"
    train(make_cfg(latents, part, "train.max_steps=3", "train.ckpt_every=3"))
    result = train(make_cfg(latents, part, "train.max_steps=6", "train.ckpt_every=3"), resume="auto")
    assert result.step == 6
    assert_same_losses(full, part, 6, rel=1e-6, abs=1e-7)
    accum = tmp_path / "accum"
    train(make_cfg(latents, accum, "train.max_steps=6", "train.grad_accum=2"))
    assert_same_losses(full, accum, 6)


def test_existing_run_needs_resume_flag(latents, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(latents, run, "train.max_steps=2"))
    before = tree_bytes(run)
    with pytest.raises(LatentDiTError, match="already holds checkpoints.*--resume auto"):
        train(make_cfg(latents, run, "train.max_steps=2"))
    with pytest.raises(LatentDiTError, match="no such checkpoint"):
        train(make_cfg(latents, run, "train.max_steps=2"), resume=str(tmp_path / "missing"))
    assert tree_bytes(run) == before


def test_resume_from_a_different_model_is_refused(latents, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(latents, run, "train.max_steps=2"))
    before = tree_bytes(run)
    with pytest.raises(LatentDiTError, match=r"different model \(.*patch_size: checkpoint 2, config 4"):
        train(make_cfg(latents, run, "train.max_steps=4", "model.name=DiT-T/4"), resume="auto")
    with pytest.raises(LatentDiTError, match=r"different model \(.*learn_sigma"):
        train(make_cfg(latents, tmp_path / "other", "train.max_steps=4", "model.learn_sigma=false"),
              resume=str(run / "checkpoints" / "step-0000002"))
    with pytest.raises(LatentDiTError, match=r"different model \(null class row"):
        train(make_cfg(latents, run, "train.max_steps=4", "model.class_dropout_prob=0"), resume="auto")
    assert tree_bytes(run) == before
    assert not (tmp_path / "other").exists()
    # another label-dropout rate keeps the architecture: resuming is fine
    assert train(make_cfg(latents, run, "train.max_steps=3", "model.class_dropout_prob=0.2"), resume="auto").step == 3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(latents, tmp_path):
    from latentdit.io import load_safetensors

    run = tmp_path / "run"

    def poison(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == 5 else loss

    with pytest.raises(LatentDiTError, match="NaN or inf at step 5.*step-0000004"):
        train(make_cfg(latents, run, "train.max_steps=8", "train.ckpt_every=2", "train.log_every=100"),
              loss_hook=poison)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000002", "step-0000004"]
    for name in ("model.safetensors", "ema.safetensors"):
        tensors, _ = load_safetensors(run / "checkpoints" / "step-0000004" / name)
        assert all(torch.isfinite(v).all() for v in tensors.values())
    # the run resumes from the last good checkpoint
    result = train(make_cfg(latents, run, "train.max_steps=6", "train.ckpt_every=2"), resume="auto")
    assert result.step == 6 and set(losses(run)) == {5, 6}  # nothing was logged before the NaN (log_every=100)




@pytest.mark.parametrize("extra", [["diffusion.prediction=v"], ["diffusion.prediction=x"],
                                   ["diffusion.time_sampling=logit_normal", "diffusion.time_shift=2.0"]],
                         ids=["v", "x", "v-logit-normal-shift2"])
def test_a_flow_run_overfits_a_tiny_dataset(latents, tmp_path, extra):
    run = tmp_path / "run"
    train(make_cfg(latents, run, *FLOW, *extra, "train.max_steps=40", "train.lr=2e-3"))
    curve = list(losses(run).values())
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve)
    assert np.mean(curve[-8:]) < 0.5 * np.mean(curve[:8]), curve


def test_flow_weights_carry_their_process_and_sample_without_settings(latents, tmp_path):
    from latentdit.diffusion import FlowProcess
    from latentdit.io import load_safetensors
    from latentdit.sampling import SamplerSettings, sample_latents
    from latentdit.weights import load_model_for_sampling

    run = tmp_path / "run"
    extra = ["diffusion.prediction=x", "diffusion.time_sampling=logit_normal", "diffusion.time_shift=2.0",
             "model.pos=rope2d", "model.qk_norm=true"]
    result = train(make_cfg(latents, run, *FLOW, *extra, "train.max_steps=2"))
    expected = FlowProcess(prediction="x", time_sampling="logit_normal", time_shift=2.0).metadata()
    for name in ("ema.safetensors", "model.safetensors"):
        _, meta = load_safetensors(result.last_checkpoint / name)
        assert json.loads(meta["process"]) == expected
        assert "latentdit_diffusion" not in meta  # the ddpm-only key would describe a ddpm model
        assert json.loads(meta["latentdit_model"])["pos"] == "rope2d"
    assert json.loads((result.last_checkpoint / "state.json").read_text())["process"] == expected
    ckpt = load_model_for_sampling(run)
    assert ckpt.process.metadata() == expected and ckpt.model.block_options == {"pos": "rope2d", "qk_norm": True}
    out = sample_latents(ckpt.model, [0, 3], SamplerSettings(num_steps=2), process=ckpt.process,
                         noise=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_ddpm_weights_carry_their_process_too(latents, tmp_path):
    from latentdit.io import load_safetensors

    result = train(make_cfg(latents, tmp_path / "run", "train.max_steps=1"))
    _, meta = load_safetensors(result.last_checkpoint / "ema.safetensors")
    assert json.loads(meta["process"]) == {"process": "ddpm", "noise_schedule": "linear", "diffusion_steps": 1000}


def test_resume_with_another_process_is_refused(latents, tmp_path):
    ddpm = tmp_path / "ddpm"
    train(make_cfg(latents, ddpm, "model.learn_sigma=false", "train.max_steps=2"))
    flow = tmp_path / "flow"
    train(make_cfg(latents, flow, *FLOW, "train.max_steps=2"))
    before = tree_bytes(tmp_path)
    with pytest.raises(LatentDiTError, match=r"another diffusion process \(.*process: checkpoint 'ddpm', config 'flow'"):
        train(make_cfg(latents, ddpm, *FLOW, "train.max_steps=4"), resume="auto")
    with pytest.raises(LatentDiTError, match=r"another diffusion process \(prediction: checkpoint 'v', config 'x'\)"):
        train(make_cfg(latents, flow, *FLOW, "diffusion.prediction=x", "train.max_steps=4"), resume="auto")
    with pytest.raises(LatentDiTError, match=r"different model \(pos: checkpoint 'sincos', config 'rope2d'\)"):
        train(make_cfg(latents, flow, *FLOW, "model.pos=rope2d", "train.max_steps=4"), resume="auto")
    assert tree_bytes(tmp_path) == before
    # a checkpoint written before the process was recorded is a ddpm one with its config's schedule
    state_path = ddpm / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_path.read_text())
    del state["process"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(LatentDiTError, match=r"noise_schedule: checkpoint 'linear', config 'cosine'"):
        train(make_cfg(latents, ddpm, "model.learn_sigma=false", "diffusion.noise_schedule=cosine",
                       "train.max_steps=4"), resume="auto")
    assert train(make_cfg(latents, ddpm, "model.learn_sigma=false", "train.max_steps=3"), resume="auto").step == 3


def test_old_model_configs_without_block_options_resume(latents, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(latents, run, "train.max_steps=2"))
    state_path = run / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_path.read_text())
    state["model_config"] = {k: v for k, v in state["model_config"].items() if k not in ("norm", "mlp", "pos", "qk_norm")}
    state_path.write_text(json.dumps(state))
    assert train(make_cfg(latents, run, "train.max_steps=3"), resume="auto").step == 3
    with pytest.raises(LatentDiTError, match=r"different model \(mlp: checkpoint 'gelu', config 'swiglu'\)"):
        train(make_cfg(latents, run, "train.max_steps=4", "model.mlp=swiglu"), resume="auto")
