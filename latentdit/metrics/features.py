"""Inception features of a source, with an on-disk cache, and the settings of their computation.

Features of folders and image ``.npz`` files are cached on disk (``default_cache_dir()``), keyed
by the SHA-256 of the input's bytes (for a folder: every image file's relative path and bytes, in
order), the detector's SHA-256, the way files are read to RGB and the detector's preprocessing;
changing any of them misses the cache. Settings that do not change the features (batch size,
workers, device) are not part of the key.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdit.data.images import RGB_CONVERSION
from latentdit.distributed import rank
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_write, check_output_folder, sha256_json
from latentdit.metrics.inception import (DETECTOR_SHA256, FEATURE_DIM, PREPROCESSING, InceptionDetector,
                                         detector_id)
from latentdit.metrics.sources import ArrayImages, ImageSource, Source
from latentdit.metrics.stats import FeatureStats

CACHE_FORMAT = 2
DEFAULT_BATCH_SIZE = 50


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/latentdit/fid`` (``~/.cache/latentdit/fid`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latentdit" / "fid"


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """How features are computed; none of these settings changes the features themselves.

    ``cache_dir``: where features are cached (default ``default_cache_dir()``); None disables the cache.
    ``detector_path``: the Inception TorchScript file (default: the installed one; its SHA-256 is checked).
    ``device``: None for a GPU when one is visible, else the CPU.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | torch.device | None = None
    num_workers: int = 0
    cache_dir: str | os.PathLike | None = dataclasses.field(default_factory=default_cache_dir)
    detector_path: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LatentDiTError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise LatentDiTError(f"num_workers must be ≥ 0, got {self.num_workers}")
        if self.cache_dir is not None:
            check_output_folder(Path(self.cache_dir).expanduser(), "feature cache folder")


class FeatureExtractor:
    """Computes (and caches) Inception features; the detector is loaded only when something needs it."""

    def __init__(self, settings: FeatureSettings | None = None, *,
                 expected_sha256: str | None = DETECTOR_SHA256) -> None:
        self.settings = settings if settings is not None else FeatureSettings()
        self.expected_sha256 = expected_sha256
        cache_dir = self.settings.cache_dir
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._detector: InceptionDetector | None = None

    @property
    def detector(self) -> InceptionDetector:
        if self._detector is None:
            self._detector = InceptionDetector(self.settings.detector_path, self.settings.device, self.expected_sha256)
        return self._detector

    def cache_key(self, content_sha256: str) -> str:
        """Cache file stem for images with this content hash under this detector and preprocessing."""
        return sha256_json({
            "format": CACHE_FORMAT,
            "content": content_sha256,
            "detector": detector_id(self.settings.detector_path, self.expected_sha256),
            "image_reading": RGB_CONVERSION,
            "preprocessing": PREPROCESSING,
        })

    def _run(self, batches: Iterable[np.ndarray | torch.Tensor], total: int | None, desc: str) -> np.ndarray:
        out: list[torch.Tensor] = []
        with tqdm(total=total, desc=f"Inception features: {desc}", unit="img", leave=False,
                  disable=not (self.settings.progress and rank() == 0)) as bar:
            for batch in batches:
                feats = self.detector(batch)
                out.append(feats)
                bar.update(feats.shape[0])
        if not out:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)
        return torch.cat(out).numpy()

    def features(self, source: ImageSource) -> np.ndarray:
        """float32 features [N, 2048] of an image source, from the cache when possible."""
        content = source.content_sha256() if self.cache_dir is not None else None
        cache_file = self.cache_dir / f"{self.cache_key(content)}.npz" if content is not None else None
        if cache_file is not None and cache_file.is_file():
            feats = _read_cached_features(cache_file, source.num_images)
            if feats is not None:
                return feats
        feats = self._run(source.batches(self.settings.batch_size, self.settings.num_workers), source.num_images,
                          getattr(source, "description", "images"))
        if cache_file is not None:
            with atomic_write(cache_file, "wb") as f:
                np.savez(f, features=feats, source=np.asarray(source.description))
        return feats

    def array_features(self, images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor]) -> np.ndarray:
        """Features of uint8 images in memory: one array/tensor, or an iterable of batches."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            return self.features(ArrayImages(images))
        return self._run(images, None, "image batches")


def _read_cached_features(path: Path, expected_rows: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            feats = npz["features"]
    except Exception as e:
        warnings.warn(f"ignoring unreadable FID cache file {path}: {e}", RuntimeWarning, stacklevel=3)
        return None
    if feats.ndim != 2 or feats.shape[0] != expected_rows:
        warnings.warn(f"ignoring FID cache file {path}: shape {feats.shape}, expected {expected_rows} rows",
                      RuntimeWarning, stacklevel=3)
        return None
    return feats


def source_stats(source: Source, extractor: FeatureExtractor, need_features: bool = False) -> FeatureStats:
    """Statistics of an opened source; with ``need_features`` also its features (if it can give them).

    Stored ``mu``/``sigma`` are returned as they are (ADM reference statistics stay exactly theirs).
    """
    stored = source.stored
    if stored is not None and (stored.has_features or not need_features or source.images is None):
        return stored
    feats = extractor.features(source.images)
    if stored is not None:  # stored statistics for FID, features from the file's images for KID / PR
        return dataclasses.replace(stored, features=feats)
    return FeatureStats.from_features(feats, source.description)


def extract_features(images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
                     settings: FeatureSettings | None = None) -> np.ndarray:
    """Inception pool3 features (float32 [N, 2048]) of uint8 images in memory.

    ``images``: one uint8 array/tensor (N×H×W×3, N×3×H×W, N×H×W grey...) or an iterable of such batches.
    Arrays in memory are never cached.
    """
    return FeatureExtractor(settings).array_features(images)


def compute_stats(images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
                  settings: FeatureSettings | None = None) -> FeatureStats:
    """:class:`FeatureStats` (mu, sigma, features) of uint8 images in memory."""
    return FeatureStats.from_features(extract_features(images, settings), "images in memory")
