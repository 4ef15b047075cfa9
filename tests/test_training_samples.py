"""Sample grids of a DiT run, decoded through the run's VAE, and per-channel latent normalisation."""

from __future__ import annotations


import pytest
import torch

from latentdit.config import load_config
from latentdit.errors import LatentDiTError
from latentdit.training import train
from training_helpers import BASE, FLOW, GRID, write_image_folder


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





@pytest.mark.parametrize("process", [[], FLOW], ids=["ddpm", "flow"])
def test_sample_grid_through_the_runs_vae(vae_latents, tmp_path, process):
    from PIL import Image

    run = tmp_path / "run"
    train(load_config(None, [*BASE, f"data.latents={vae_latents}", f"train.run_dir={run}", "train.max_steps=2",
                             *GRID, *process]))
    grid = run / "samples" / "step-0000002.png"
    w, h = Image.open(grid).size
    assert h == 2 * 18 + 2 and w > 3 * 18 + 2  # 2 classes × 3 seeds of 16×16 images + a label margin



def test_per_channel_latents_are_decoded_with_their_own_statistics(tmp_path):
    """Latents extracted with --latent-norm per-channel: the weights record the normalisation, the sampling
    loader reads it back, and decoding inverts it (not the VAE's scalar scaling factor)."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from latentdit.vae import VAE
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
