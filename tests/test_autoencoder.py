"""VAE loading and encode/decode semantics, latent normalisation, the bundled VAEs.
(VAE training, tools/train_vae.py: tests/test_vae_training.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdit.data.latent_norm import LATENT_NORMS, LatentNorm
from latentdit.vae import (BUNDLED_CLIPART_VAE, BUNDLED_RGB_VAE, BUNDLED_VAE, BUNDLED_VAE_CARD_JSON, BUNDLED_VAES, VAE,
                           bundled_vae_path, default_vae_for, psnr, reconstruction_psnr)
from latentdit.errors import LatentDiTError
from latentdit.io import read_json, sha256_file

REPO = Path(__file__).resolve().parents[1]


def tiny_autoencoder(scaling_factor: float = 0.5):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor)


@pytest.fixture()
def tiny_dir(tmp_path) -> Path:
    folder = tmp_path / "tiny-vae"
    tiny_autoencoder().save_pretrained(str(folder))
    return folder


def images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ loading


def test_load_local_folder_facts(tiny_dir):
    vae = VAE.load(tiny_dir)
    assert vae.spec == str(tiny_dir) and vae.folder == tiny_dir
    assert vae.scaling_factor == 0.5 and vae.latent_channels == 4 and vae.downsample_factor == 2
    assert vae.latent_shape(16) == (4, 8, 8)
    with pytest.raises(LatentDiTError, match="multiple of the VAE's downsampling factor 2"):
        vae.latent_shape(15)
    ident = vae.identity()
    assert ident["spec"] == str(tiny_dir)
    assert ident["weights_sha256"] == sha256_file(tiny_dir / "diffusion_pytorch_model.safetensors")


def test_moments_and_decode_match_autoencoderkl(tiny_dir):
    vae = VAE.load(tiny_dir)
    ref = tiny_autoencoder().eval()
    x = images()
    mean, std = vae.encode_moments(x)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        expected = ref.decode(dist.mean).sample.clamp(-1, 1)
    assert mean.shape == std.shape == (3, 4, 8, 8) and mean.dtype == std.dtype == torch.float32
    # VAE runs channels-last (faster convolutions), so sums come in another order: float32 tolerance
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, dist.std, rtol=1e-5, atol=1e-5)
    decoded = vae.decode(mean * vae.scaling_factor)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-5)
    # batched helpers give the same numbers in chunks
    mb, sb = vae.encode_moments_batched(x, batch_size=2)
    torch.testing.assert_close(mb, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sb, std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode_batched(mean * vae.scaling_factor, batch_size=2), decoded,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.reconstruct(x, batch_size=2), expected, rtol=1e-5, atol=1e-5)


def test_cpu_calls_split_by_pixels_keep_order(tiny_dir, monkeypatch):
    import latentdit.vae.autoencoder as autoencoder

    vae = VAE.load(tiny_dir)
    x = images(n=5)
    whole_mean, whole_std = vae.encode_moments(x)
    whole_images = vae.decode(whole_mean)
    calls = []
    encode, decode = vae.model.encode, vae.model.decode
    monkeypatch.setattr(vae.model, "encode", lambda t: calls.append(("enc", len(t))) or encode(t))
    monkeypatch.setattr(vae.model, "decode", lambda t: calls.append(("dec", len(t))) or decode(t))
    monkeypatch.setattr(autoencoder, "CPU_PIXELS_PER_CALL", 2 * 16 * 16)  # two 16x16 images per call
    mean, std = vae.encode_moments(x)
    decoded = vae.decode(whole_mean)
    assert calls == [("enc", 2), ("enc", 2), ("enc", 1), ("dec", 2), ("dec", 2), ("dec", 1)]
    torch.testing.assert_close(mean, whole_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, whole_std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded, whole_images, rtol=1e-5, atol=1e-6)


def test_scaling_factor_comes_from_config(tiny_dir):
    x = images()
    before = VAE.load(tiny_dir)
    mean, _ = before.encode_moments(x)
    expected = before.decode(mean * 0.5)
    config_path = tiny_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 0.125
    config_path.write_text(json.dumps(config))
    after = VAE.load(tiny_dir)
    assert after.scaling_factor == 0.125
    assert after.identity()["config_sha256"] != before.identity()["config_sha256"]
    assert after.identity()["weights_sha256"] == before.identity()["weights_sha256"]
    torch.testing.assert_close(after.decode(mean * 0.125), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after.decode(mean * 0.5), expected, atol=1e-3)


def test_bad_specs(tmp_path, tiny_dir):
    with pytest.raises(LatentDiTError, match="does not exist"):
        VAE.load(tmp_path / "missing")
    with pytest.raises(LatentDiTError, match="does not exist"):
        VAE.load("./no/such/vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentDiTError, match="no config.json"):
        VAE.load(tmp_path / "empty")
    with pytest.raises(LatentDiTError, match="is a file"):
        VAE.load(tiny_dir / "config.json")
    (tiny_dir / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LatentDiTError, match="no weights file"):
        VAE.load(tiny_dir)
    with pytest.raises(LatentDiTError, match="non-empty"):
        VAE.load("")


def test_hub_failure_offline_is_clear(monkeypatch):
    from diffusers import AutoencoderKL

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(LatentDiTError, match=r"stabilityai/sd-vae-ft-ema.*local folder.*save_pretrained.*"
                                             r"latentdit/kl-f8-fashion-mnist"):
        VAE.load("stabilityai/sd-vae-ft-ema")


def test_bad_inputs(tiny_dir):
    vae = VAE.load(tiny_dir)
    with pytest.raises(LatentDiTError, match=r"images must be shaped \[N, 3, H, W\]"):
        vae.encode_moments(torch.zeros(3, 16, 16))
    with pytest.raises(LatentDiTError, match="multiple of the VAE's downsampling factor"):
        vae.encode_moments(torch.zeros(1, 3, 15, 16))
    with pytest.raises(LatentDiTError, match=r"latents must be shaped \[N, 4, h, w\]"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_psnr_exact():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 10 * np.log10(4 / 0.01), dtype=torch.float32))
    with pytest.raises(LatentDiTError, match="equal shapes"):
        psnr(a, b[:1])


# ------------------------------------------------------------------------------------------ per-channel latents


def test_latent_norm_round_trip_decodes_like_the_raw_latent(tmp_path):
    model = tiny_autoencoder()
    model.register_to_config(latents_mean=[0.5, -1.0, 0.25, 2.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    model.save_pretrained(str(tmp_path / "vae"))
    vae = VAE.load(tmp_path / "vae")
    x = images()
    mean, _ = vae.encode_moments(x)
    with torch.no_grad():
        expected = vae.model.decode(mean).sample.clamp(-1, 1)  # decode of the raw latent
    for kind in LATENT_NORMS:
        norm = vae.latent_norm(kind)
        z = norm.normalize(mean)
        torch.testing.assert_close(norm.denormalize(z), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vae.decode(z, norm), expected, rtol=1e-5, atol=1e-5)
        assert LatentNorm.from_dict(norm.to_dict()) == norm
    per_channel = vae.latent_norm("per-channel").normalize(mean)
    torch.testing.assert_close(per_channel[:, 1], (mean[:, 1] + 1.0) / 0.5)  # (z - mean_c) / std_c
    torch.testing.assert_close(vae.latent_norm().normalize(mean), mean * 0.5)  # scalar: z * scaling_factor
    with pytest.raises(LatentDiTError, match="no latents_mean / latents_std"):
        VAE(tiny_autoencoder()).latent_norm("per-channel")
    with pytest.raises(LatentDiTError, match="must be one of scalar, per-channel"):
        LatentNorm("per-pixel", 1.0)


# ------------------------------------------------------------------------------------------ bundled VAEs


def bundled_card(name: str = BUNDLED_VAE) -> dict:
    return read_json(bundled_vae_path(name) / BUNDLED_VAE_CARD_JSON, "bundled VAE model card")


@pytest.mark.parametrize("name", sorted(BUNDLED_VAES))
def test_bundled_vae_loads_by_name(name):
    vae = VAE.load(name)
    card = bundled_card(name)
    assert vae.spec == name and vae.folder == bundled_vae_path(name)
    assert vae.latent_shape(64) == (4, 8, 8) and vae.downsample_factor == 8
    assert vae.scaling_factor == pytest.approx(card["scaling_factor"], rel=1e-12)
    assert vae.identity()["weights_sha256"] == card["weights_sha256"]
    assert vae.latent_norm("per-channel").std == pytest.approx(tuple(card["latents_std"]))
    assert (bundled_vae_path(name) / "MODEL_CARD.md").is_file()
    size = (bundled_vae_path(name) / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size == card["weights_bytes"] and size < 16e6


def test_default_vae_follows_the_data():
    assert default_vae_for("fashion-mnist") == BUNDLED_VAE
    assert default_vae_for("/data/my-images") == BUNDLED_RGB_VAE


@pytest.mark.slow
def test_fashion_mnist_vae_psnr_at_least_card_value():
    from latentdit.data.fashion_mnist import FashionMNIST

    card = bundled_card()
    n = card["psnr_check_images"]
    try:
        ds = FashionMNIST("test", image_size=64, download=False)
    except LatentDiTError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    x, _ = ds.batch(range(n))  # held out: the first images of the test split
    value = reconstruction_psnr(VAE.load(), x)
    assert value >= card["psnr_check_db"] - 0.01, (value, card["psnr_check_db"])


CLIPART_SAMPLE = REPO / "tests" / "data" / "clipart-heldout"


def test_clipart_vae_psnr_on_its_held_out_sample_at_least_card_value():
    from latentdit.data import build_image_dataset

    card = bundled_card(BUNDLED_CLIPART_VAE)
    ds = build_image_dataset(CLIPART_SAMPLE, image_size=card["config"]["data"]["image_size"])
    names = {Path(p).name for p in ds.relative_paths()}
    assert names <= {Path(n).name for n in card["held_out_names"]}  # never trained on
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    value = reconstruction_psnr(VAE.load(BUNDLED_CLIPART_VAE), x)
    assert value >= card["tests_sample_psnr_db"] - 0.01, (value, card["tests_sample_psnr_db"])


RGB_SAMPLE = REPO / "tests" / "data" / "rgb-heldout"


def test_rgb_vae_psnr_on_its_held_out_sample_at_least_card_value():
    from latentdit.data import build_image_dataset

    card = bundled_card(BUNDLED_RGB_VAE)
    ds = build_image_dataset(RGB_SAMPLE, image_size=card["config"]["data"]["image_size"])
    names = {f"clipart/{Path(p).name}" for p in ds.relative_paths()}
    assert len(names) == 24 and names <= set(card["held_out_names"])  # never trained on
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    value = reconstruction_psnr(VAE.load(BUNDLED_RGB_VAE), x)
    assert value >= card["tests_sample_psnr_db"] - 0.01, (value, card["tests_sample_psnr_db"])
