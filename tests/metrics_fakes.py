"""Helpers shared by the metrics tests (no tests here): a cheap stand-in for the Inception network, image writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentdit.metrics.inception import as_uint8_nchw


class FakeDetector:
    """Deterministic 4-d "features" (per-channel means and overall std) instead of Inception's 2048-d pool3."""

    calls = 0  # images seen, summed over instances

    def __init__(self, path=None, device=None, expected_sha256=None) -> None:
        self.path = path

    def __call__(self, images) -> torch.Tensor:
        x = as_uint8_nchw(images).float() / 255.0
        FakeDetector.calls += x.shape[0]
        means = x.mean(dim=(2, 3))
        return torch.cat([means, x.flatten(1).std(dim=1, keepdim=True)], dim=1)


def use_fake_detector(monkeypatch) -> type[FakeDetector]:
    import latentdit.metrics.features as features

    FakeDetector.calls = 0
    monkeypatch.setattr(features, "InceptionDetector", FakeDetector)
    return FakeDetector


def random_images(n: int, size: int = 16, seed: int = 0, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 1, 1, 3))
    noise = rng.integers(0, 56, (n, size, size, 3))
    return np.clip(base + noise + shift, 0, 255).astype(np.uint8)


def write_folder(root: Path, images: np.ndarray, fmt: str = "png") -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / f"{i:04d}.{fmt}")
    return root
