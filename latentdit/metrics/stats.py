"""Feature statistics and their files: :class:`FeatureStats` (mean, covariance and maybe the features of a
set), :func:`save_stats` / :func:`load_stats` for ``.npz`` statistics files (ours and ADM-style reference
batches), and the header reader that lets image arrays in an ``.npz`` be read in chunks."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdit.errors import LatentDiTError
from latentdit.io import atomic_write
from latentdit.metrics.scores import mean_and_covariance


@dataclasses.dataclass
class FeatureStats:
    """Gaussian statistics of a set (float64 ``mu`` [D], ``sigma`` [D, D]) and, if known, its features."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    num_samples: int | None = None
    source: str = "features"

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor, source: str = "features") -> "FeatureStats":
        """Statistics of a feature matrix [N, D] (N ≥ 2); keeps the features (float32) for KID / PR."""
        feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        mu, sigma = mean_and_covariance(feats, f"{source}")
        return cls(mu, sigma, feats.astype(np.float32, copy=False), int(feats.shape[0]), source)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def has_features(self) -> bool:
        return self.features is not None


def save_stats(stats: FeatureStats, path: str | os.PathLike, include_features: bool = False,
               metadata: dict[str, Any] | None = None) -> Path:
    """Write ``mu``, ``sigma`` (float64), ``num_samples`` and optionally ``features`` to an ``.npz``, atomically.

    The file is readable by :func:`load_stats` and by tools that read ADM-style statistics (``mu``, ``sigma``).
    """
    path = Path(path)
    if include_features and stats.features is None:
        raise LatentDiTError(f"cannot save features to {path}: {stats.source} has statistics only")
    arrays: dict[str, np.ndarray] = {
        "mu": np.asarray(stats.mu, dtype=np.float64),
        "sigma": np.asarray(stats.sigma, dtype=np.float64),
        "num_samples": np.asarray(-1 if stats.num_samples is None else stats.num_samples, dtype=np.int64),
        "latentdit_meta": np.asarray(json.dumps({"source": stats.source, **(metadata or {})}, sort_keys=True)),
    }
    if include_features:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip, truncated, ...
        raise LatentDiTError(f"could not read {path} as an .npz file: {e}") from e


def read_npz_key(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:  # object arrays would need pickle
        raise LatentDiTError(f"{path}: array {key!r} cannot be read without unpickling ({e})") from e
    except Exception as e:
        raise LatentDiTError(f"{path}: could not read array {key!r}: {e}") from e


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Read a statistics ``.npz`` (``mu``, ``sigma``; optional ``features``, ``num_samples``, ``arr_0``)."""
    path = Path(path)
    with open_npz(path) as npz:
        keys = set(npz.files)
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise LatentDiTError(
                f"{path} is not a statistics file: it lacks {' and '.join(repr(k) for k in missing)} "
                f"(found {sorted(keys) or 'no arrays'}); expected both 'mu' and 'sigma'"
            )
        mu = read_npz_key(npz, "mu", path).astype(np.float64)
        sigma = read_npz_key(npz, "sigma", path).astype(np.float64)
        features = read_npz_key(npz, "features", path) if "features" in keys else None
        num = int(read_npz_key(npz, "num_samples", path)) if "num_samples" in keys else -1
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise LatentDiTError(
            f"{path}: expected 'mu' of shape [D] and 'sigma' of shape [D, D], got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise LatentDiTError(f"{path}: 'mu' or 'sigma' contains NaN or infinity")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise LatentDiTError(f"{path}: 'features' must have shape [N, {mu.shape[0]}], got {features.shape}")
    if num < 0:
        if features is not None:
            num = features.shape[0]
        elif "arr_0" in keys:
            shape = read_npy_header(path, "arr_0").shape
            num = int(shape[0]) if shape else 0
    return FeatureStats(mu, sigma, features, num if num >= 0 else None, str(path))




@dataclasses.dataclass(frozen=True)
class NpyHeader:
    """Where an array lies inside an ``.npz`` member, read from its ``.npy`` header."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # bytes from the start of the member to the first element


def read_npy_header(path: Path, key: str) -> NpyHeader:
    """The header of array ``key`` in the ``.npz`` file ``path`` (no array data is read)."""
    member = f"{key}.npy"
    try:
        with zipfile.ZipFile(path) as zf:
            if member not in zf.namelist():
                raise LatentDiTError(f"{path} has no array {key!r}")
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise LatentDiTError(f"{path}: {key!r} uses .npy format {version}, expected 1.0 or 2.0")
                return NpyHeader(tuple(shape), bool(fortran), np.dtype(dtype), f.tell())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise LatentDiTError(f"could not read {path} as an .npz file: {e}") from e
