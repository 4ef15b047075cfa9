"""benchmarks/bench_vae.py's colour figures: the worst-ΔE grid (originals above their reconstructions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdit.colour import reconstruction_delta_e
from script_helpers import load_script


def _load():
    return load_script("benchmarks/bench_vae.py")


def test_worst_delta_e_grid_puts_the_largest_colour_errors_first(tmp_path):
    bench = _load()
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    shift = torch.tensor([0.0, 0.6, 0.1, 0.9, 0.3, 0.0]).view(6, 1, 1, 1)
    recon = (originals + shift * torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)).clamp(-1, 1)
    delta_e = reconstruction_delta_e(originals, recon)
    assert delta_e[0] == delta_e[5] == 0 and np.argsort(-delta_e)[:2].tolist() == [3, 1]
    path = bench.save_worst_delta_e_grid(originals, recon, delta_e, tmp_path / "grid" / "worst.png", count=3)
    grid = Image.open(path)
    # three columns of 16-pixel images (with padding and labels), two rows: originals, reconstructions
    assert grid.size[0] >= 3 * 16 and grid.size[1] >= 2 * 16


def test_latent_noise_reconstructions_start_at_the_plain_one_and_drift_with_sigma(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from latentdit.vae import VAE

    bench = _load()
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.7).save_pretrained(tmp_path)
    vae = VAE.load(tmp_path)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain, small, large = bench.noisy_reconstructions(vae, images, [0.0, 0.1, 1.0], seed=3)
    torch.testing.assert_close(plain, vae.reconstruct(images))
    again = bench.noisy_reconstructions(vae, images, [0.1], seed=3)[0]
    torch.testing.assert_close(again, small)  # one seeded draw, whatever else is decoded beside it
    drift = [float((x - plain).pow(2).mean()) for x in (small, large)]
    assert 0 < drift[0] < drift[1]
