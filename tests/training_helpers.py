"""Shared pieces of the DiT trainer's tests: a tiny latent folder written by the extractor with a stand-in
encoder (and one encoded by a tiny real VAE), configs, loss comparison and the subprocess helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentdit.config import load_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_TOOL = REPO / "tools" / "train.py"
PY = sys.executable


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


GRID = ["train.sample_every=2", "train.sample_num_classes=2", "train.sample_num_seeds=3",
        "diffusion.sample_steps=5", "train.sample_cfg_scale=2.0"]

FLOW = ["diffusion.process=flow", "model.learn_sigma=false"]


def run_tool(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, str(TRAIN_TOOL), *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(args: list[str], timeout: float = 240) -> None:
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(TRAIN_TOOL), *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def copy_run_up_to(src: Path, dst: Path, step: int) -> None:
    """A run directory as it was when the checkpoint of ``step`` was the latest."""
    import shutil

    (dst / "checkpoints").mkdir(parents=True)
    name = f"step-{step:07d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")

