"""Settings shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sampling_helpers import make_tiny_dit
from training_helpers import PoolVAE, extract, write_image_folder


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The test models are tiny: one intra-op thread runs them as fast as two, and far faster when
    other processes (the suite's own multi-process launches) compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """64 latents [4, 8, 8] in 4 classes, 3 shards, with flips."""
    root = tmp_path_factory.mktemp("latents")
    return extract(write_image_folder(root / "images"), root / "lat", PoolVAE())


@pytest.fixture(scope="module")
def vae_latents(tmp_path_factory) -> Path:
    """16 latents [4, 8, 8] in 4 classes, encoded by a tiny real AutoencoderKL saved next to them (so the
    trainer's sample grids can decode through "the run's VAE")."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from latentdit.vae import VAE

    root = tmp_path_factory.mktemp("vae_latents")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                  scaling_factor=0.7).save_pretrained(root / "vae")
    return extract(write_image_folder(root / "images", n_per_class=4), root / "lat", VAE.load(root / "vae"))


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_dit()


@pytest.fixture(scope="module")
def tiny_flow_model():
    return make_tiny_dit(seed=2, learn_sigma=False)
