"""Where features come from: image folders, ADM-style ``.npz`` files, statistics files, arrays in memory.

A *source* is one of

* an image folder — searched recursively for ``IMAGE_SUFFIXES``, sorted by relative path; all images
  must have the same size; greyscale, palette and RGBA images are converted to RGB (alpha dropped);
* an ``.npz`` with ``arr_0``: uint8 N×H×W×3 (the ADM layout; N×H×W and N×H×W×1 are read as grey),
  read in chunks so a 50k-image file is never fully in memory;
* an ``.npz`` of statistics with ``mu`` and ``sigma`` (our ``--save-stats`` files, and the ADM
  reference batches such as ``VIRTUAL_imagenet256_labeled.npz``): ``mu``/``sigma`` are used as
  they are for FID; features come from a ``features`` array (``--save-features``) or, when the
  file also holds ``arr_0`` images, from those;
* a uint8 array or tensor in memory (:func:`extract_features`, :func:`compute_stats`).

Features of folders and image ``.npz`` files are cached on disk (``default_cache_dir()``), keyed
by the SHA-256 of the input's bytes (for a folder: every image file's relative path and bytes, in
order), the detector's SHA-256 and the preprocessing; changing any of them misses the cache.
Settings that do not change the features (batch size, workers, device) are not part of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdit.cli import is_main_process
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_write, sha256_file, sha256_json
from latentdit.metrics.inception import (DETECTOR_SHA256, FEATURE_DIM, PREPROCESSING, InceptionDetector,
                                         as_uint8_nchw, detector_id)
from latentdit.metrics.scores import mean_and_covariance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
CACHE_FORMAT = 1
DEFAULT_BATCH_SIZE = 50


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/latentdit/fid`` (``~/.cache/latentdit/fid`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latentdit" / "fid"


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

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


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip, truncated, ...
        raise LatentDiTError(f"could not read {path} as an .npz file: {e}") from e


def _read_npz_key(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:  # object arrays would need pickle
        raise LatentDiTError(f"{path}: array {key!r} cannot be read without unpickling ({e})") from e
    except Exception as e:
        raise LatentDiTError(f"{path}: could not read array {key!r}: {e}") from e


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Read a statistics ``.npz`` (``mu``, ``sigma``; optional ``features``, ``num_samples``, ``arr_0``)."""
    path = Path(path)
    with _open_npz(path) as npz:
        keys = set(npz.files)
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise LatentDiTError(
                f"{path} is not a statistics file: it lacks {' and '.join(repr(k) for k in missing)} "
                f"(found {sorted(keys) or 'no arrays'}); expected both 'mu' and 'sigma'"
            )
        mu = _read_npz_key(npz, "mu", path).astype(np.float64)
        sigma = _read_npz_key(npz, "sigma", path).astype(np.float64)
        features = _read_npz_key(npz, "features", path) if "features" in keys else None
        num = int(_read_npz_key(npz, "num_samples", path)) if "num_samples" in keys else -1
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
            num = NpzImages(path, check=False).num_images
    return FeatureStats(mu, sigma, features, num if num >= 0 else None, str(path))


# ----------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------

class ImageSource:
    """A set of same-sized uint8 RGB images that can be read in batches."""

    description: str
    num_images: int
    image_size: tuple[int, int]

    def content_sha256(self) -> str | None:
        """A hash of the images' bytes, or None when the source cannot be cached."""
        return None

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray | torch.Tensor]:
        raise NotImplementedError


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy
    except Exception as e:
        raise LatentDiTError(f"could not read image {path}: {e}") from e


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: tuple[int, int]) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        arr = _read_rgb(self.files[i])
        if arr.shape[:2] != self.size:
            raise LatentDiTError(f"image {self.files[i]} changed size while reading ({arr.shape[:2]} vs {self.size})")
        return arr


class FolderImages(ImageSource):
    """Images under a folder (recursive), sorted by relative path; all must have one size."""

    def __init__(self, root: str | os.PathLike) -> None:
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise LatentDiTError(f"image folder not found: {self.root}")
        self.files = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=lambda p: p.relative_to(self.root).as_posix())
        if not self.files:
            raise LatentDiTError(
                f"no images found in folder {self.root} (searched recursively for {', '.join(IMAGE_SUFFIXES)})"
            )
        if len(self.files) < 2:
            raise LatentDiTError(f"folder {self.root} has only 1 image ({self.files[0]}); statistics need at least 2")
        first_size = None
        for p in self.files:  # header reads only: fail before any feature is computed
            try:
                with Image.open(p) as im:
                    size = im.size  # (W, H)
            except Exception as e:
                raise LatentDiTError(f"could not read image {p}: {e}") from e
            if first_size is None:
                first_size = size
            elif size != first_size:
                raise LatentDiTError(
                    f"images in {self.root} have different sizes: {self.files[0]} is "
                    f"{first_size[0]}×{first_size[1]} but {p} is {size[0]}×{size[1]} (W×H); "
                    "all images of one set must have the same size"
                )
        self.image_size = (first_size[1], first_size[0])
        self.num_images = len(self.files)
        self.description = f"{self.root} ({self.num_images} images, {self.image_size[0]}×{self.image_size[1]})"

    def content_sha256(self) -> str:
        h = hashlib.sha256(b"latentdit-folder-v1\0")
        for p in self.files:
            h.update(p.relative_to(self.root).as_posix().encode() + b"\0")
            h.update(bytes.fromhex(sha256_file(p)))
        return h.hexdigest()

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(_FolderDataset(self.files, self.image_size), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers)
        yield from loader


class NpzImages(ImageSource):
    """uint8 images in an ``.npz`` array (``arr_0``, N×H×W×3 / N×H×W×1 / N×H×W), read in chunks."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0", check: bool = True) -> None:
        self.path, self.key = Path(path), key
        self.member = f"{key}.npy"
        try:
            with zipfile.ZipFile(self.path) as zf:
                if self.member not in zf.namelist():
                    raise LatentDiTError(f"{self.path} has no array {key!r}")
                with zf.open(self.member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise LatentDiTError(f"{self.path}: {key!r} uses .npy format {version}, expected 1.0 or 2.0")
                    self._offset = f.tell()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise LatentDiTError(f"could not read {self.path} as an .npz file: {e}") from e
        self.shape, self.fortran, self.dtype = tuple(shape), fortran, np.dtype(dtype)
        self.num_images = int(self.shape[0]) if self.shape else 0
        if not check:
            return
        ok_layout = (len(self.shape) == 3) or (len(self.shape) == 4 and self.shape[-1] in (1, 3))
        if not ok_layout:
            hint = " (that looks like N×C×H×W; ADM files are N×H×W×C)" if len(self.shape) == 4 and self.shape[1] in (1, 3) else ""
            raise LatentDiTError(
                f"{self.path}: {key!r} has shape {self.shape}; expected uint8 images N×H×W×3 (or N×H×W grey){hint}"
            )
        if self.dtype != np.uint8:
            raise LatentDiTError(f"{self.path}: {key!r} has dtype {self.dtype}; expected uint8 pixel values 0..255")
        if self.num_images < 2:
            raise LatentDiTError(f"{self.path}: {key!r} holds {self.num_images} image(s); statistics need at least 2")
        self.image_size = (int(self.shape[1]), int(self.shape[2]))
        self.description = f"{self.path} ({self.num_images} images, {self.image_size[0]}×{self.image_size[1]})"

    def content_sha256(self) -> str:
        return sha256_file(self.path)

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
        per_image = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self.fortran:  # rare (np.savez of a Fortran-ordered array): read it whole
            with _open_npz(self.path) as npz:
                arr = np.ascontiguousarray(_read_npz_key(npz, self.key, self.path))
            for start in range(0, self.num_images, batch_size):
                yield arr[start:start + batch_size]
            return
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            f.read(self._offset)
            for start in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - start)
                buf = f.read(n * per_image)
                if len(buf) != n * per_image:
                    raise LatentDiTError(f"{self.path}: {self.key!r} is truncated (image {start + len(buf) // per_image})")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((n,) + self.shape[1:])


class ArrayImages(ImageSource):
    """uint8 images already in memory (any layout :func:`as_uint8_nchw` accepts); never cached."""

    def __init__(self, images: np.ndarray | torch.Tensor, description: str = "images in memory") -> None:
        self.images = as_uint8_nchw(images, description)
        self.num_images = int(self.images.shape[0])
        self.image_size = (int(self.images.shape[2]), int(self.images.shape[3]))
        self.description = f"{description} ({self.num_images} images, {self.image_size[0]}×{self.image_size[1]})"

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        for start in range(0, self.num_images, batch_size):
            yield self.images[start:start + batch_size]


# ----------------------------------------------------------------------------------------------
# Feature extraction (with the on-disk cache)
# ----------------------------------------------------------------------------------------------

class FeatureExtractor:
    """Computes (and caches) Inception features; the detector is loaded only when something needs it."""

    def __init__(self, *, detector_path: str | os.PathLike | None = None,
                 expected_sha256: str | None = DETECTOR_SHA256, device: str | torch.device | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, num_workers: int = 0,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True) -> None:
        if batch_size < 1:
            raise LatentDiTError(f"batch_size must be ≥ 1, got {batch_size}")
        if num_workers < 0:
            raise LatentDiTError(f"num_workers must be ≥ 0, got {num_workers}")
        self.detector_path = detector_path
        self.expected_sha256 = expected_sha256
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.progress = progress
        self._detector: InceptionDetector | None = None

    @property
    def detector(self) -> InceptionDetector:
        if self._detector is None:
            self._detector = InceptionDetector(self.detector_path, self.device, self.expected_sha256)
        return self._detector

    def cache_key(self, content_sha256: str) -> str:
        """Cache file stem for images with this content hash under this detector and preprocessing."""
        return sha256_json({
            "format": CACHE_FORMAT,
            "content": content_sha256,
            "detector": detector_id(self.detector_path, self.expected_sha256),
            "preprocessing": PREPROCESSING,
        })

    def _run(self, batches: Iterable[np.ndarray | torch.Tensor], total: int | None, desc: str) -> np.ndarray:
        out: list[torch.Tensor] = []
        with tqdm(total=total, desc=f"Inception features: {desc}", unit="img", leave=False,
                  disable=not (self.progress and is_main_process())) as bar:
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
        feats = self._run(source.batches(self.batch_size, self.num_workers), source.num_images,
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


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """An opened input: images to compute features from, and/or statistics read from a file."""

    description: str
    images: ImageSource | None = None
    stored: FeatureStats | None = None
    label: str = ""  # short name: the path, or what was passed in memory

    @property
    def can_give_features(self) -> bool:
        return self.images is not None or (self.stored is not None and self.stored.has_features)

    @property
    def num_samples(self) -> int | None:
        if self.images is not None:
            return self.images.num_images
        return self.stored.num_samples if self.stored is not None else None


def _starts_like_zip(path: Path) -> bool:
    """Whether the file begins with a zip member header (an .npz under another name, perhaps cut short)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def open_source(source: str | os.PathLike | np.ndarray | torch.Tensor | FeatureStats) -> Source:
    """Open a folder, an ``.npz`` (images or statistics), a uint8 array/tensor, or wrap :class:`FeatureStats`.

    Cheap: reads file listings, image headers and small arrays, never pixels.
    """
    if isinstance(source, FeatureStats):
        return Source(source.source, stored=source, label=source.source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        images = ArrayImages(source)
        return Source(images.description, images=images, label="images in memory")
    path = Path(source).expanduser()
    if path.is_dir():
        images = FolderImages(path)
        return Source(images.description, images=images, label=str(path))
    if not path.exists():
        raise LatentDiTError(f"no such file or folder: {path} (expected an image folder or an .npz file)")
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".npz" or _starts_like_zip(path):
            raise LatentDiTError(
                f"{path} is a damaged .npz file: it is not a complete zip archive ({path.stat().st_size} bytes; "
                "truncated or only partly written?); write or copy it again"
            )
        raise LatentDiTError(
            f"{path} is neither a folder nor an .npz file; expected an image folder, an .npz with 'arr_0' "
            "(uint8 N×H×W×3 images) or an .npz with 'mu' and 'sigma' statistics"
        )
    with _open_npz(path) as npz:
        keys = set(npz.files)
    if "mu" in keys or "sigma" in keys:
        stored = load_stats(path)  # raises if one of the two is missing
        images = None
        if stored.features is None and "arr_0" in keys:
            images = NpzImages(path)  # e.g. an ADM reference batch: features for KID / PR come from these
        n = f"{stored.num_samples} samples" if stored.num_samples is not None else "sample count unknown"
        return Source(f"{path} (statistics, {n})", images=images, stored=stored, label=str(path))
    if "arr_0" in keys:
        images = NpzImages(path)
        return Source(images.description, images=images, label=str(path))
    raise LatentDiTError(
        f"{path} has neither 'arr_0' (uint8 N×H×W×3 images) nor 'mu' and 'sigma' (statistics); "
        f"found {sorted(keys) or 'no arrays'}"
    )


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


# ----------------------------------------------------------------------------------------------
# One-call helpers
# ----------------------------------------------------------------------------------------------

def extract_features(images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor], *,
                     batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
                     detector_path: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
    """Inception pool3 features (float32 [N, 2048]) of uint8 images in memory.

    ``images``: one uint8 array/tensor (N×H×W×3, N×3×H×W, N×H×W grey...) or an iterable of such batches.
    """
    extractor = FeatureExtractor(detector_path=detector_path, device=device, batch_size=batch_size, progress=progress)
    return extractor.array_features(images)


def compute_stats(images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor], **kwargs: Any) -> FeatureStats:
    """:class:`FeatureStats` (mu, sigma, features) of uint8 images in memory; kwargs as :func:`extract_features`."""
    return FeatureStats.from_features(extract_features(images, **kwargs), "images in memory")

