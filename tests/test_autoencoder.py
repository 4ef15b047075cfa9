"""VAE loading and encode/decode semantics, the bundled VAE, and tools/train_vae.py (tiny runs, resume)."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdit.autoencoder import (BUNDLED_VAE, BUNDLED_VAE_CARD_JSON, VAE, bundled_vae_path, psnr,
                                   reconstruction_psnr)
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors, read_json, sha256_file

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
    import latentdit.autoencoder as autoencoder

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


# ------------------------------------------------------------------------------------------ bundled VAE


def bundled_card() -> dict:
    return read_json(bundled_vae_path() / BUNDLED_VAE_CARD_JSON, "bundled VAE model card")


def test_bundled_vae_loads_by_name():
    vae = VAE.load(BUNDLED_VAE)
    card = bundled_card()
    assert vae.spec == BUNDLED_VAE and vae.folder == bundled_vae_path()
    assert vae.latent_shape(64) == (4, 8, 8) and vae.downsample_factor == 8
    assert vae.scaling_factor == pytest.approx(card["scaling_factor"], rel=1e-12)
    assert vae.identity()["weights_sha256"] == card["weights_sha256"]
    assert (bundled_vae_path() / "MODEL_CARD.md").is_file()
    size = (bundled_vae_path() / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size == card["weights_bytes"] and size < 15e6


@pytest.mark.slow
def test_bundled_vae_psnr_at_least_card_value():
    from latentdit.data.fashion_mnist import FashionMNIST

    card = bundled_card()
    n = card["psnr_check_images"]
    try:
        ds = FashionMNIST("test", image_size=64, download=False)
    except LatentDiTError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    x, _ = ds.batch(range(n))
    value = reconstruction_psnr(VAE.load(), x)
    assert value >= card["psnr_check_db"] - 0.01, (value, card["psnr_check_db"])


# ------------------------------------------------------------------------------------------ tools/train_vae.py


def load_tool():
    spec = importlib.util.spec_from_file_location("train_vae_tool", REPO / "tools" / "train_vae.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_fake_fashion_mnist(root: Path, n_train: int = 24, n_test: int = 8) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        ims = np.zeros((n, 28, 28), dtype=np.uint8)
        ims[:, 6:22, 8:20] = rng.integers(60, 256, size=(n, 1, 1))  # flat blobs: learnable in a few steps
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr, magic in (("images-idx3", ims, 0x0803), ("labels-idx1", labels, 0x0801)):
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(struct.pack(">i", magic) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes())


TINY = ["--image-size", "16", "--crop-size", "8", "--block-out-channels", "8,16", "--norm-num-groups", "4",
        "--batch-size", "4", "--warmup-steps", "0", "--min-lr-ratio", "1", "--scale-images", "8",
        "--psnr-images", "8", "--psnr-check-images", "4", "--sample-every", "2", "--checkpoint-every", "2"]


def test_config_file_matches_defaults():
    tool = load_tool()
    cfg = tool.load_config(REPO / "configs" / "vae_fashion_mnist.yaml", {})
    assert dataclasses.asdict(cfg) == dataclasses.asdict(tool.VAETrainConfig())
    with pytest.raises(LatentDiTError, match="'crop_size' = 12: expected 0 or a multiple of 8"):
        tool.load_config(None, {"crop_size": "12"})
    with pytest.raises(LatentDiTError, match="'recon_loss'"):
        tool.load_config(None, {"recon_loss": "l3"})


def test_train_vae_tiny_run_and_exact_resume(tmp_path):
    tool = load_tool()
    data = tmp_path / "data"
    data.mkdir()
    write_fake_fashion_mnist(data)
    common = TINY + ["--data-root", str(data)]

    straight = tmp_path / "straight"
    assert tool.main(common + ["--out", str(straight), "--steps", "4"]) == 0
    split = tmp_path / "split"
    assert tool.main(common + ["--out", str(split), "--steps", "2"]) == 0
    with pytest.raises(LatentDiTError, match="already holds a training run"):
        tool.main(common + ["--out", str(split), "--steps", "4"])
    with pytest.raises(LatentDiTError, match=r"config differs .* \['lr'\]"):
        tool.main(common + ["--out", str(split), "--steps", "4", "--resume", "--lr", "0.5"])
    assert tool.main(common + ["--out", str(split), "--steps", "4", "--resume"]) == 0

    latest = read_json(split / "checkpoints" / "latest.json")
    assert latest["step"] == 4 and sorted(p.name for p in (split / "checkpoints").iterdir()) == [
        "latest.json", "model-0000004.safetensors", "optimizer-0000004.pt"]
    a, _ = load_safetensors(straight / "checkpoints" / "model-0000004.safetensors")
    b, _ = load_safetensors(split / "checkpoints" / "model-0000004.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (split / "samples" / "step-0000004.png").is_file()

    # the exported folder loads through VAE.load, carries the measured scaling factor and its card
    card = read_json(split / "vae" / BUNDLED_VAE_CARD_JSON)
    vae = VAE.load(split / "vae")
    assert card["steps_done"] == 4 and not card["stopped_early"]
    assert vae.scaling_factor == pytest.approx(1 / card["latent_std"], rel=1e-9)
    assert card["psnr_db"] == pytest.approx(read_json(straight / "vae" / BUNDLED_VAE_CARD_JSON)["psnr_db"], abs=1e-3)
    assert "--resume" in card["command"] and (split / "vae" / "MODEL_CARD.md").is_file()


def test_train_vae_resume_needs_checkpoint(tmp_path):
    tool = load_tool()
    with pytest.raises(LatentDiTError, match="--resume: no checkpoint"):
        tool.main(TINY + ["--out", str(tmp_path / "none"), "--resume"])
