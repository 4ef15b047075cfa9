"""Training: data order, EMA, checkpoints, exact resume (SIGKILL), 2 processes == 1, bad input, NaN stop."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentdit.config import load_config
from latentdit.errors import LatentDiTError
from latentdit.training import EMA, CheckpointManager, train
from latentdit.training.data import BatchLayout, StepBatchSampler, StepRandomness

REPO = Path(__file__).resolve().parents[1]
TRAIN_TOOL = REPO / "tools" / "train.py"
PY = sys.executable


# ----------------------------------------------------------------------------------------------
# fixtures: a tiny latent directory written by the data owner's extractor with a stand-in encoder
# ----------------------------------------------------------------------------------------------

class PoolVAE:
    """Stand-in encoder for extract_latents: 2× average pooling, 4 latent channels, fixed std."""

    downsample_factor = 2
    latent_channels = 4
    scaling_factor = 0.5
    spec = "test-pool-vae"

    def identity(self) -> dict:
        return {"spec": self.spec, "config_sha256": "0" * 64, "weights_sha256": "1" * 64}

    def encode_moments(self, images: torch.Tensor):
        m = F.avg_pool2d(images.float(), 2)
        mean = torch.cat([m, m.mean(1, keepdim=True)], 1)
        return mean, torch.full_like(mean, 0.1)


def write_image_folder(root: Path, n_per_class: int = 16, classes=("ant", "bee", "cat", "dog"), size: int = 16) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = (rng.random((size, size, 3)) * 60 + ci * 60).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    return root


def extract(images: Path, out: Path, vae, size: int = 16) -> Path:
    from latentdit.extraction import ExtractionSettings, extract_latents

    extract_latents(ExtractionSettings(images, out, image_size=size, batch_size=32, shard_size=24, progress=False,
                                       use_accelerate=False, dtype="float32"), vae=vae)
    return out


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """64 latents [4, 8, 8] in 4 classes, 3 shards, with flips."""
    root = tmp_path_factory.mktemp("latents")
    return extract(write_image_folder(root / "images"), root / "lat", PoolVAE())



BASE = ["model.name=DiT-T/2", "train.global_batch_size=8", "train.lr=1e-3", "train.max_steps=4",
        "train.log_every=1", "train.ckpt_every=1000", "train.ema_decay=0.9", "train.tensorboard=false",
        "train.keep_last=10"]


def make_cfg(latents: Path, run_dir: Path, *extra: str):
    return load_config(None, [*BASE, f"data.latents={latents}", f"train.run_dir={run_dir}", *extra])


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def assert_same_losses(expected: Path, got: Path, steps: int, rel: float = 1e-5, abs: float = 0.0) -> None:
    """The metrics of run ``got`` log the losses of run ``expected``, for steps 1..``steps``."""
    a, b = losses(expected), losses(got)
    assert list(a) == list(b) == list(range(1, steps + 1)), (list(a), list(b))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=rel, abs=abs), f"{got.name}: step {s}"


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def write_yaml_cfg(path: Path, latents: Path, sections: dict | None = None, **train_fields) -> Path:
    """A config file for the tools: DiT-T/2 on ``latents``, ``train_fields`` in the train section and
    further ``sections`` (e.g. ``{"diffusion": {"process": "flow"}}``)."""
    fields = dict(global_batch_size=8, lr=1.0e-3, max_steps=4, log_every=1, ckpt_every=1000, ema_decay=0.9,
                  tensorboard=False, keep_last=100)
    fields.update(train_fields)
    lines = ["model:", "  name: DiT-T/2"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in (sections or {}).get("model", {}).items()]
    lines += ["data:", f"  latents: {latents}", "train:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in fields.items()]
    for name, values in (sections or {}).items():
        if name != "model":
            lines += [f"{name}:"] + [f"  {k}: {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# data order and per-step randomness
# ----------------------------------------------------------------------------------------------

def test_two_ranks_slice_the_one_rank_batch_and_cover_each_epoch_once():
    n, G = 40, 8
    one = list(StepBatchSampler(n, BatchLayout(G, 1, 1, 0), seed=3, start_step=0, end_step=10))
    r0 = list(StepBatchSampler(n, BatchLayout(G, 2, 1, 0), seed=3, start_step=0, end_step=10))
    r1 = list(StepBatchSampler(n, BatchLayout(G, 2, 1, 1), seed=3, start_step=0, end_step=10))
    assert [a + b for a, b in zip(r0, r1)] == one
    # grad accumulation over 2 micro-steps lays out the same global batch
    acc = list(StepBatchSampler(n, BatchLayout(G, 1, 2, 0), seed=3, start_step=0, end_step=10))
    assert [acc[2 * i] + acc[2 * i + 1] for i in range(10)] == one
    for epoch in (0, 1):
        items = [k for batch in one[epoch * 5:(epoch + 1) * 5] for k in batch]
        assert sorted(i for _, i in items) == list(range(n)) and {e for e, _ in items} == {epoch}
    assert one[:5] != one[5:10]  # a fresh permutation each epoch
    # resuming at step 7 continues the very same order
    assert list(StepBatchSampler(n, BatchLayout(G, 1, 1, 0), 3, 7, 10)) == one[7:]


def test_step_randomness_depends_on_seed_and_step_only():
    from latentdit.diffusion import DDPMProcess, FlowProcess

    ddpm = DDPMProcess(diffusion_steps=1000)
    a = StepRandomness.draw(0, 5, 8, (4, 2, 2), ddpm, 0.5)
    b = StepRandomness.draw(0, 5, 8, (4, 2, 2), ddpm, 0.5)
    c = StepRandomness.draw(0, 6, 8, (4, 2, 2), ddpm, 0.5)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.t, b.t) and torch.equal(a.drop, b.drop)
    assert not torch.equal(a.noise, c.noise)
    assert a.t.min() >= 0 and a.t.max() < 1000 and set(a.drop.tolist()) <= {0, 1}
    # ddpm draws exactly what the trainer drew before the process object: randint, then noise, then the mask
    from latentdit.seeding import seed_for

    g = torch.Generator().manual_seed(seed_for("latentdit-step", 0, 5))
    assert torch.equal(a.t, torch.randint(0, 1000, (8,), generator=g))
    assert torch.equal(a.noise, torch.randn((8, 4, 2, 2), generator=g))
    # flow: float times in [0, 1], from the same generator
    f = StepRandomness.draw(0, 5, 8, (4, 2, 2), FlowProcess(time_sampling="logit_normal"), 0.5)
    assert f.t.dtype == torch.float32 and 0 < f.t.min() and f.t.max() < 1 and f.noise.shape == a.noise.shape


# ----------------------------------------------------------------------------------------------
# EMA and checkpoint manager
# ----------------------------------------------------------------------------------------------

def test_ema_warmup_decay():
    from latentdit.training.ema import warmup_decay

    assert warmup_decay(0.9999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.9999, 90) == pytest.approx(91 / 100)
    assert warmup_decay(0.99, 10_000) == 0.99  # capped by the configured decay
    assert all(warmup_decay(0.9999, n) <= warmup_decay(0.9999, n + 1) for n in range(0, 5000, 7))


def test_ema_math_and_frozen_params():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.register_parameter("frozen", torch.nn.Parameter(torch.ones(2), requires_grad=False))
    ema = EMA(model, decay=0.75)
    assert ema.names == ["weight", "bias"]
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.frozen.mul_(5)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.75 * w0 + 0.25 * (w0 + 1.0))
    ema.update(model, decay=0.0)
    torch.testing.assert_close(ema.shadow["weight"], w0 + 1.0)
    sd = ema.state_dict(model)
    assert set(sd) == {"weight", "bias", "frozen"}
    torch.testing.assert_close(sd["frozen"], torch.full((2,), 5.0))  # frozen weights come from the model
    other = EMA(model, 0.5)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(LatentDiTError):
        EMA(model, 1.5)


def _fake_checkpoint(mgr: CheckpointManager, step: int) -> None:
    tmp = mgr.begin(step)
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    mgr.commit(step)


def test_checkpoint_keep_last_and_milestones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, milestone_every=4)
    for step in range(1, 10):
        _fake_checkpoint(mgr, step)
    assert [c.step for c in mgr.list()] == [4, 8, 9]
    # an unfinished checkpoint directory (killed mid-write) is never listed nor resumed from
    tmp = mgr.begin(10)
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert mgr.latest().name == "step-0000009"
    mgr.clean_temporaries()
    assert not tmp.exists()
    with pytest.raises(LatentDiTError, match="incomplete"):
        mgr.begin(11)
        mgr.commit(11)


# ----------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ----------------------------------------------------------------------------------------------

def test_batch_not_divisible_fails_before_any_work(latents, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LatentDiTError, match=r"global_batch_size=9 is not divisible.*grad_accum \(2\)"):
        train(make_cfg(latents, run, "train.global_batch_size=9", "train.grad_accum=2"))
    assert not run.exists()


def test_missing_or_empty_latent_dir(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LatentDiTError, match="latent directory not found"):
        train(make_cfg(tmp_path / "nowhere", run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentDiTError, match="no manifest.json and no latent shards"):
        train(make_cfg(tmp_path / "empty", run))
    with pytest.raises(LatentDiTError, match="data.latents is not set"):
        train(load_config(None, [*BASE, f"train.run_dir={run}"]))
    assert not run.exists()


@pytest.mark.parametrize("override, field", [("model.num_classes=10", "num_classes"),
                                             ("model.input_size=32", "input_size"),
                                             ("model.in_channels=3", "in_channels")])
def test_manifest_mismatch(latents, tmp_path, override, field):
    with pytest.raises(LatentDiTError, match=rf"model.{field}=\d+ does not fit the latents.*latent shape \[4, 8, 8\], 4 classes"):
        train(make_cfg(latents, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_fsdp_needs_several_processes(latents, tmp_path):
    with pytest.raises(LatentDiTError, match=r"train\.fsdp=true.*single process.*--num_processes"):
        train(make_cfg(latents, tmp_path / "run", "train.fsdp=true"))
    assert not (tmp_path / "run").exists()


def test_dataset_smaller_than_batch(latents, tmp_path):
    with pytest.raises(LatentDiTError, match="holds 64 latents, fewer than train.global_batch_size=128"):
        train(make_cfg(latents, tmp_path / "run", "train.global_batch_size=128"))


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


# ----------------------------------------------------------------------------------------------
# the flow process and the block options in the loop
# ----------------------------------------------------------------------------------------------

FLOW = ["diffusion.process=flow", "model.learn_sigma=false"]


@pytest.mark.parametrize("overrides, message", [
    (["diffusion.process=fl0w"], "field 'diffusion.process': expected one of ddpm, flow, got 'fl0w'"),
    (["diffusion.process=flow"], "field 'model.learn_sigma': expected false with diffusion.process=flow"),
    ([*FLOW, "diffusion.prediction=eps"], "field 'diffusion.prediction': expected one of v, x, got 'eps'"),
    ([*FLOW, "diffusion.time_sampling=beta"], "field 'diffusion.time_sampling': expected one of uniform, logit_normal"),
    ([*FLOW, "diffusion.time_shift=0"], "field 'diffusion.time_shift': expected a finite number > 0, got 0.0"),
    ([*FLOW, "diffusion.logit_std=-1"], "field 'diffusion.logit_std': expected a finite number > 0, got -1.0"),
    ([*FLOW, "diffusion.loss_weighting=snr"], "field 'diffusion.loss_weighting': expected one of none"),
    (["model.norm=batchnorm"], "field 'model.norm': expected one of layernorm, rmsnorm, got 'batchnorm'"),
    (["model.mlp=relu"], "field 'model.mlp': expected one of gelu, swiglu, got 'relu'"),
    (["model.pos=learned"], "field 'model.pos': expected one of sincos, rope2d, got 'learned'"),
    (["model.qk_norm=maybe"], "field 'model.qk_norm': expected bool, got 'maybe'"),
])
def test_process_and_block_option_fields_are_validated(overrides, message):
    with pytest.raises(LatentDiTError, match=re.escape(message)):
        load_config(None, overrides)


def test_defaults_are_the_papers_process_and_blocks():
    cfg = load_config(None, [])
    assert (cfg.diffusion.process, cfg.model.learn_sigma) == ("ddpm", True)
    assert (cfg.model.norm, cfg.model.mlp, cfg.model.pos, cfg.model.qk_norm) == ("layernorm", "gelu", "sincos", False)


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


def test_time_budget_bar_shows_minutes_and_the_eta_of_the_budget():
    from latentdit.training.progress import ProgressBar

    now = [0.0]
    bar = ProgressBar(0, 400_000, 5.0, clock=lambda: now[0], file=io.StringIO(), mininterval=0)
    for step in range(1, 11):  # 10 steps in 2 minutes: max_steps is hours away, the budget ends in 3 minutes
        now[0] += 12.0
        bar.update(step)
    bar.set_postfix({"loss": "0.5000"})
    assert str(bar.bar).endswith("| 2.0/5.0 min, eta 03:00, step 10, loss=0.5000")
    assert str(bar.bar).startswith("train:  40%")


def test_time_budget_bar_ends_at_max_steps_when_that_comes_first():
    from latentdit.training.progress import ProgressBar

    now = [0.0]
    bar = ProgressBar(20, 120, 60.0, clock=lambda: now[0], file=io.StringIO(), mininterval=0)  # resumed at 20
    for step in range(21, 31):  # 10 steps a minute: the last 90 steps take 9 more minutes, not 59
        now[0] += 6.0
        bar.update(step)
    assert str(bar.bar).endswith("| 1.0/10.0 min, eta 09:00, step 30")


def test_step_bar_without_a_budget():
    from latentdit.training.progress import ProgressBar

    bar = ProgressBar(5, 100, 0.0, file=io.StringIO())
    bar.update(8)
    assert (bar.bar.n, bar.bar.total) == (8, 100)


def test_labeled_grid(tmp_path):
    from PIL import Image

    from latentdit.visualize import save_labeled_grid

    imgs = torch.rand(6, 3, 16, 16) * 2 - 1
    p = save_labeled_grid(imgs, ["T-shirt", "Bag"], tmp_path / "rows.png", nrow=3)
    w, h = Image.open(p).size
    assert h == 2 * 18 + 2 and w > 3 * 18 + 2  # a left margin holds the row labels
    p2 = save_labeled_grid(imgs, [str(i) for i in range(6)], tmp_path / "each.png", nrow=3)
    assert Image.open(p2).size[1] > 2 * 18 + 2  # a caption line under each row
    with pytest.raises(LatentDiTError, match="one label per row or one per image"):
        save_labeled_grid(imgs, ["a", "b", "c", "d"], tmp_path / "bad.png", nrow=3)


@pytest.fixture(scope="module")
def vae_latents(tmp_path_factory) -> Path:
    """16 latents [4, 8, 8] in 4 classes, encoded by a tiny real AutoencoderKL saved next to them (so the
    trainer's sample grids can decode through "the run's VAE")."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from latentdit.autoencoder import VAE

    root = tmp_path_factory.mktemp("vae_latents")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                  scaling_factor=0.7).save_pretrained(root / "vae")
    return extract(write_image_folder(root / "images", n_per_class=4), root / "lat", VAE.load(root / "vae"))


GRID = ["train.sample_every=2", "train.sample_num_classes=2", "train.sample_num_seeds=3",
        "diffusion.sample_steps=5", "train.sample_cfg_scale=2.0"]


@pytest.mark.parametrize("process", [[], FLOW], ids=["ddpm", "flow"])
def test_sample_grid_through_the_runs_vae(vae_latents, tmp_path, process):
    from PIL import Image

    run = tmp_path / "run"
    train(load_config(None, [*BASE, f"data.latents={vae_latents}", f"train.run_dir={run}", "train.max_steps=2",
                             *GRID, *process]))
    grid = run / "samples" / "step-0000002.png"
    w, h = Image.open(grid).size
    assert h == 2 * 18 + 2 and w > 3 * 18 + 2  # 2 classes × 3 seeds of 16×16 images + a label margin


# ----------------------------------------------------------------------------------------------
# real processes: SIGKILL + --resume auto, and accelerate launch with 2 CPU processes
# ----------------------------------------------------------------------------------------------

def _run_tool(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, str(TRAIN_TOOL), *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


FLOW_ALL_OPTIONS = {"model": dict(learn_sigma=False, norm="rmsnorm", mlp="swiglu", pos="rope2d", qk_norm=True),
                    "diffusion": dict(process="flow", prediction="x", time_sampling="logit_normal", time_shift=2.0)}


@pytest.mark.slow
@pytest.mark.parametrize("sections", [None, FLOW_ALL_OPTIONS], ids=["ddpm", "flow-x-all-block-options"])
def test_sigkill_then_resume_auto_repeats_the_uninterrupted_losses(latents, tmp_path, sections):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents, sections, ckpt_every=4, max_steps=100000, keep_last=100)
    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([PY, str(TRAIN_TOOL), "--config", str(cfg), f"train.run_dir={killed}"],
                            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not (killed / "checkpoints" / "step-0000004").is_dir():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    done = CheckpointManager(killed).list()
    last = done[-1].step
    target = last + 6
    logged_before = losses(killed)
    _run_tool(["--config", str(cfg), f"train.run_dir={killed}", f"train.max_steps={target}", "--resume", "auto"])
    full = tmp_path / "full"
    _run_tool(["--config", str(cfg), f"train.run_dir={full}", f"train.max_steps={target}"])
    assert_same_losses(full, killed, target, rel=1e-6, abs=1e-7)
    a = losses(full)
    # what the killed process had logged before the kill matches as well
    for s, v in logged_before.items():
        if s <= target:
            assert v == pytest.approx(a[s], rel=1e-6, abs=1e-7), f"step {s} (before kill)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(args: list[str], timeout: float = 240) -> None:
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(TRAIN_TOOL), *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_give_the_same_losses_as_one_with_twice_the_batch(latents, tmp_path):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents, global_batch_size=8, max_steps=4, ckpt_every=2)
    two = tmp_path / "two"
    _launch_two(["--config", str(cfg), f"train.run_dir={two}"])
    one = tmp_path / "one"
    _run_tool(["--config", str(cfg), f"train.run_dir={one}"])
    assert_same_losses(one, two, 4)
    ck = two / "checkpoints" / "step-0000004"
    assert (ck / "rng-rank0.pt").is_file() and (ck / "rng-rank1.pt").is_file()
    assert json.loads((ck / "state.json").read_text())["num_processes"] == 2


def _copy_run_up_to(src: Path, dst: Path, step: int) -> None:
    """A run directory as it was when the checkpoint of ``step`` was the latest."""
    import shutil

    (dst / "checkpoints").mkdir(parents=True)
    name = f"step-{step:07d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")


@pytest.mark.slow
def test_fsdp_matches_ddp_and_its_checkpoints_resume_either_way(latents, tmp_path):
    """train.fsdp=true on 2 CPU processes (gloo): the losses and weights of 1 unsharded process, with
    gradient accumulation; its checkpoints resume unsharded and an unsharded checkpoint resumes sharded."""
    from latentdit.io import load_safetensors

    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents, global_batch_size=8, max_steps=4, ckpt_every=2,
                         grad_clip=1.0)
    sharded = tmp_path / "sharded"
    _launch_two(["--config", str(cfg), f"train.run_dir={sharded}", "train.fsdp=true", "train.grad_accum=2"])
    plain = tmp_path / "plain"
    _run_tool(["--config", str(cfg), f"train.run_dir={plain}"])
    assert_same_losses(plain, sharded, 4)

    def weights(run: Path, step: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        ck = run / "checkpoints" / f"step-{step:07d}"
        return {f: load_safetensors(ck / f)[0] for f in ("model.safetensors", "ema.safetensors")}

    def assert_same_weights(x: Path, y: Path) -> None:
        wx, wy = weights(x), weights(y)
        for f in wx:
            assert wx[f].keys() == wy[f].keys()
            for k in wx[f]:
                torch.testing.assert_close(wx[f][k], wy[f][k], rtol=1e-4, atol=1e-5, msg=f"{f} {k}")

    assert_same_weights(plain, sharded)
    ck = sharded / "checkpoints" / "step-0000004"
    assert (ck / "rng-rank1.pt").is_file()
    opt_plain = torch.load(plain / "checkpoints" / "step-0000004" / "optimizer.pt", weights_only=True)
    opt_sharded = torch.load(ck / "optimizer.pt", weights_only=True)
    assert opt_sharded["state"].keys() == opt_plain["state"].keys()  # one format: keyed by parameter position

    # a sharded checkpoint resumed by one unsharded process, and an unsharded one resumed sharded
    unsharded_resume = tmp_path / "unsharded-resume"
    _copy_run_up_to(sharded, unsharded_resume, 2)
    _run_tool(["--config", str(cfg), f"train.run_dir={unsharded_resume}", "--resume", "auto"])
    sharded_resume = tmp_path / "sharded-resume"
    _copy_run_up_to(plain, sharded_resume, 2)
    _launch_two(["--config", str(cfg), f"train.run_dir={sharded_resume}", "train.fsdp=true", "--resume", "auto"])
    for run in (unsharded_resume, sharded_resume):
        assert_same_losses(plain, run, 4)
        assert_same_weights(plain, run)


@pytest.mark.slow
def test_fsdp_sample_grid_gathers_the_ema(vae_latents, tmp_path):
    """Periodic sample grids of a sharded run: the EMA is gathered from both processes and decoded
    through the run's VAE, giving the grid of an unsharded run."""
    import numpy as np
    from PIL import Image

    cfg = write_yaml_cfg(tmp_path / "c.yaml", vae_latents, global_batch_size=8, max_steps=2, ckpt_every=2)
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    _launch_two(["--config", str(cfg), f"train.run_dir={sharded}", "train.fsdp=true", *GRID])
    _run_tool(["--config", str(cfg), f"train.run_dir={plain}", *GRID])
    a, b = (np.asarray(Image.open(r / "samples" / "step-0000002.png"), dtype=np.float64) for r in (plain, sharded))
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0  # 8-bit pixels, same up to float rounding


def test_per_channel_latents_are_decoded_with_their_own_statistics(tmp_path):
    """Latents extracted with --latent-norm per-channel: the weights record the normalisation, the sampling
    loader reads it back, and decoding inverts it (not the VAE's scalar scaling factor)."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from latentdit.autoencoder import VAE
    from latentdit.extraction import ExtractionSettings, extract_latents
    from latentdit.sampling import decode_images
    from latentdit.weights import load_model_for_sampling

    torch.manual_seed(0)
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.5, 3.0]
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.7,
                  latents_mean=mean, latents_std=std).save_pretrained(tmp_path / "vae")
    vae = VAE.load(tmp_path / "vae")
    lat = tmp_path / "lat"
    extract_latents(ExtractionSettings(write_image_folder(tmp_path / "images", n_per_class=2), lat, image_size=16,
                                       batch_size=32, shard_size=24, progress=False, use_accelerate=False,
                                       dtype="float32", latent_norm="per-channel"), vae=vae)
    run = tmp_path / "run"
    train(load_config(None, [*BASE, f"data.latents={lat}", f"train.run_dir={run}", "train.max_steps=1"]))
    ckpt = load_model_for_sampling(run / "checkpoints" / "step-0000001" / "ema.safetensors")
    assert ckpt.latent_norm is not None and ckpt.latent_norm.kind == "per-channel"
    assert list(ckpt.latent_norm.mean) == mean and list(ckpt.latent_norm.std) == std
    z = torch.randn(2, 4, 4, 4)
    raw = z * torch.tensor(std).view(1, 4, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = vae.model.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_images(vae, z, norm=ckpt.latent_norm), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(decode_images(vae, z), expected, atol=1e-3)  # the scalar path would be wrong
