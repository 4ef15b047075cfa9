"""Shared by the sampling tests: a tiny DiT, its weights as the trainer writes them, a tiny VAE,
a forward-call counter, and tools/sample.py run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentdit.diffusion import META_PROCESS
from latentdit.io import save_safetensors
from latentdit.models.checkpoint import META_CLASS_COUNTS, META_CLASS_NAMES, META_VAE, METADATA_KEY
from script_helpers import load_script

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress"]


def make_tiny_dit(seed: int = 0, num_classes: int = len(CLASS_NAMES), learn_sigma: bool = True):
    """DiT-T/2 on 8×8×4 latents with every parameter perturbed, so outputs are non-trivial."""
    from latentdit.models.registry import create_dit

    torch.manual_seed(seed)
    model = create_dit("DiT-T/2", input_size=8, num_classes=num_classes, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()



def save_our_checkpoint(model, path: Path, class_names=CLASS_NAMES, vae: str | None = None,
                        process=None, class_counts=None) -> Path:
    """Weights as the trainer writes them: safetensors + model config + class names (+ VAE, + process,
    + training items per class) metadata."""
    meta = {METADATA_KEY: json.dumps(model.config), META_CLASS_NAMES: json.dumps(list(class_names))}
    if class_counts is not None:
        meta[META_CLASS_COUNTS] = json.dumps(class_counts)
    if vae is not None:
        meta[META_VAE] = json.dumps(vae)
    if process is not None:
        meta[META_PROCESS] = json.dumps(process.metadata())
    save_safetensors(model.state_dict(), path, meta)
    return path



def make_tiny_vae_dir(path: Path) -> Path:
    """A random 2-level AutoencoderKL (latent 4 ch, ×2 downsampling) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(path)
    return path


def counting_hook(model):
    """Record (batch size, labels) of every forward of ``model``; returns (calls, handle)."""
    calls = []

    def hook(module, args, output):
        calls.append((args[0].shape[0], args[2].tolist()))

    return calls, model.register_forward_hook(hook)



def sample_tool():
    """tools/sample.py as a module."""
    return load_script("tools/sample.py")


def run_sample_tool(argv) -> int:
    """Exit status of tools/sample.py with ``argv`` (its messages go to the captured stderr)."""
    from latentdit.cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(sample_tool().main, argv)
    return e.value.code
