"""LatentDataset: posterior sampling statistics, flips, determinism per (seed, epoch, index), clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdit.extraction import ExtractionSettings, extract_latents
from latentdit.data.latents import MANIFEST_NAME, LatentDataset, read_manifest
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors

IMAGE_SIZE = 16



@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory) -> Path:
    """12 images in two classes, encoded with a tiny random f2 VAE (scaling factor 0.5) into 3 shards."""
    from diffusers import AutoencoderKL

    from latentdit.vae import VAE

    base = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE,
                  scaling_factor=0.5).save_pretrained(base / "vae")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (base / "images" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(base / "images" / c / f"{i}.png")
    extract_latents(ExtractionSettings(base / "images", base / "out", image_size=IMAGE_SIZE, batch_size=4,
                                       shard_size=5, dtype="float32", use_accelerate=False, progress=False),
                    vae=VAE.load(base / "vae"))
    return base / "out"


def test_attributes_and_round_trip(latent_dir):
    ds = LatentDataset(latent_dir)
    m = read_manifest(latent_dir)
    assert len(ds) == 12 and ds.num_classes == 2 and ds.class_names == ["a", "b"]
    assert ds.latent_shape == (4, 8, 8) and ds.scaling_factor == 0.5 and ds.image_size == IMAGE_SIZE
    assert ds.vae == m["vae"]["spec"] and ds.flip is True
    assert ds.labels.tolist() == [0] * 6 + [1] * 6
    shard1, _ = load_safetensors(latent_dir / "shard-00001.safetensors")
    item = ds.moments(7)  # second item of shard 1
    assert torch.equal(item["mean"], shard1["mean"][2]) and torch.equal(item["std"], shard1["std"][2])
    assert int(item["source_index"]) == 7 and int(item["label"]) == 1
    x, y = ds[7]
    assert x.shape == (4, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long and int(y) == 1


def test_samples_follow_the_stored_posterior(latent_dir):
    ds = LatentDataset(latent_dir, flip=False, seed=3)
    draws = []
    for epoch in range(2000):
        ds.set_epoch(epoch)
        draws.append(ds[4][0])
    draws = torch.stack(draws)
    m = ds.moments(4)
    mean, std = m["mean"][0] * ds.scaling_factor, m["std"][0] * ds.scaling_factor
    # Per element: sample mean within 5 standard errors, sample std within 10 %.
    assert ((draws.mean(0) - mean).abs() <= 5 * std / 2000 ** 0.5 + 1e-6).all()
    torch.testing.assert_close(draws.std(0), std, rtol=0.1, atol=1e-6)
    z = (draws - mean) / std
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_flip_chooses_the_stored_flipped_moments(latent_dir):
    ds = LatentDataset(latent_dir, flip=True)
    m = ds.moments(0)
    flipped = 0
    for epoch in range(200):
        ds.set_epoch(epoch)
        x = ds[0][0] / ds.scaling_factor
        d0 = ((x - m["mean"][0]) / m["std"][0]).abs().max()
        d1 = ((x - m["mean"][1]) / m["std"][1]).abs().max()
        flipped += int(d1 < d0)
    assert 70 < flipped < 130  # about half
    no_flip = LatentDataset(latent_dir, flip=False)
    for epoch in range(20):
        no_flip.set_epoch(epoch)
        x = no_flip[0][0] / ds.scaling_factor
        assert ((x - m["mean"][0]) / m["std"][0]).abs().max() < 7


def test_items_are_a_pure_function_of_seed_epoch_index(latent_dir):
    a, b = LatentDataset(latent_dir, seed=5), LatentDataset(latent_dir, seed=5)
    a.set_epoch(2)
    b[3]  # reading other items first changes nothing
    b.set_epoch(2)
    assert torch.equal(a[3][0], b[3][0]) and torch.equal(a[-1][0], b[11][0])
    first = a[3][0]
    a.set_epoch(3)
    assert not torch.allclose(a[3][0], first)
    assert not torch.allclose(LatentDataset(latent_dir, seed=6)[3][0], LatentDataset(latent_dir, seed=5)[3][0])
    # Worker processes (and pickling) give the same items as the main process.
    c = pickle.loads(pickle.dumps(a))
    loader = torch.utils.data.DataLoader(a, batch_size=4, num_workers=2)
    batched = torch.cat([x for x, _ in loader])
    assert torch.equal(batched, torch.stack([c[i][0] for i in range(len(c))]))


def test_clear_errors(latent_dir, tmp_path):
    with pytest.raises(LatentDiTError, match="not found"):
        LatentDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentDiTError, match="no manifest.json and no latent shards"):
        LatentDataset(tmp_path / "empty")
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in latent_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / MANIFEST_NAME).rename(copy / "saved.json")
    with pytest.raises(LatentDiTError, match="did not finish"):
        LatentDataset(copy)
    (copy / "saved.json").rename(copy / MANIFEST_NAME)
    (copy / "shard-00001.safetensors").write_bytes(b"\x00" * 30)
    with pytest.raises(LatentDiTError, match="shard-00001.safetensors is corrupt"):
        LatentDataset(copy)
    (copy / "shard-00001.safetensors").unlink()
    with pytest.raises(LatentDiTError, match="shard-00001.safetensors.*missing"):
        LatentDataset(copy)
    m = json.loads((latent_dir / MANIFEST_NAME).read_text())
    m["format_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(LatentDiTError, match="format_version 99"):
        LatentDataset(copy)
