"""The DiT trainer in real processes: SIGKILL + --resume auto, 2 CPU processes (DDP, FSDP2).
All slow."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from latentdit.engine.checkpoint import CheckpointManager
from training_helpers import (GRID, PY, TRAIN_TOOL, assert_same_losses, copy_run_up_to, launch_two, losses, run_tool,
                              subprocess_env, write_yaml_cfg)


# ----------------------------------------------------------------------------------------------
# real processes: SIGKILL + --resume auto, and accelerate launch with 2 CPU processes
# ----------------------------------------------------------------------------------------------


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
    run_tool(["--config", str(cfg), f"train.run_dir={killed}", f"train.max_steps={target}", "--resume", "auto"])
    full = tmp_path / "full"
    run_tool(["--config", str(cfg), f"train.run_dir={full}", f"train.max_steps={target}"])
    assert_same_losses(full, killed, target, rel=1e-6, abs=1e-7)
    a = losses(full)
    # what the killed process had logged before the kill matches as well
    for s, v in logged_before.items():
        if s <= target:
            assert v == pytest.approx(a[s], rel=1e-6, abs=1e-7), f"step {s} (before kill)"




@pytest.mark.slow
def test_two_processes_give_the_same_losses_as_one_with_twice_the_batch(latents, tmp_path):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents, global_batch_size=8, max_steps=4, ckpt_every=2)
    two = tmp_path / "two"
    launch_two(["--config", str(cfg), f"train.run_dir={two}"])
    one = tmp_path / "one"
    run_tool(["--config", str(cfg), f"train.run_dir={one}"])
    assert_same_losses(one, two, 4)
    ck = two / "checkpoints" / "step-0000004"
    assert (ck / "rng-rank0.pt").is_file() and (ck / "rng-rank1.pt").is_file()
    assert json.loads((ck / "state.json").read_text())["num_processes"] == 2




@pytest.mark.slow
def test_fsdp_matches_ddp_and_its_checkpoints_resume_either_way(latents, tmp_path):
    """train.fsdp=true on 2 CPU processes (gloo): the losses and weights of 1 unsharded process, with
    gradient accumulation; its checkpoints resume unsharded and an unsharded checkpoint resumes sharded."""
    from latentdit.io import load_safetensors

    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents, global_batch_size=8, max_steps=4, ckpt_every=2,
                         grad_clip=1.0)
    sharded = tmp_path / "sharded"
    launch_two(["--config", str(cfg), f"train.run_dir={sharded}", "train.fsdp=true", "train.grad_accum=2"])
    plain = tmp_path / "plain"
    run_tool(["--config", str(cfg), f"train.run_dir={plain}"])
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
    copy_run_up_to(sharded, unsharded_resume, 2)
    run_tool(["--config", str(cfg), f"train.run_dir={unsharded_resume}", "--resume", "auto"])
    sharded_resume = tmp_path / "sharded-resume"
    copy_run_up_to(plain, sharded_resume, 2)
    launch_two(["--config", str(cfg), f"train.run_dir={sharded_resume}", "train.fsdp=true", "--resume", "auto"])
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
    launch_two(["--config", str(cfg), f"train.run_dir={sharded}", "train.fsdp=true", *GRID])
    run_tool(["--config", str(cfg), f"train.run_dir={plain}", *GRID])
    a, b = (np.asarray(Image.open(r / "samples" / "step-0000002.png"), dtype=np.float64) for r in (plain, sharded))
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0  # 8-bit pixels, same up to float rounding
