"""Where images and statistics come from: image folders, ADM-style ``.npz`` files, statistics files, arrays.

A *source* is one of

* an image folder — every image file below it (:func:`latentdit.data.images.list_images`: the project's
  one list of extensions), sorted by relative path, read by :func:`latentdit.data.images.read_rgb` (the
  reader extraction and VAE training use: transparency composited on white, grey, palette, CMYK and
  16-bit converted to RGB); all images must have the same size;
* an ``.npz`` with ``arr_0``: uint8 N×H×W×3 (the ADM layout; N×H×W and N×H×W×1 are read as grey),
  read in chunks so a 50k-image file is never fully in memory;
* an ``.npz`` of statistics with ``mu`` and ``sigma`` (our ``--save-stats`` files, and the ADM
  reference batches such as ``VIRTUAL_imagenet256_labeled.npz``): ``mu``/``sigma`` are used as
  they are for FID; features come from a ``features`` array (``--save-features``) or, when the
  file also holds ``arr_0`` images, from those;
* a uint8 array or tensor in memory.

:func:`open_source` opens any of them cheaply (listings, headers, small arrays; never pixels), so both
inputs of a comparison are checked before any feature is computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from latentdit.data.images import IMAGE_EXTENSIONS, list_images, read_rgb, read_size
from latentdit.errors import LatentDiTError
from latentdit.io import sha256_file
from latentdit.metrics.inception import as_uint8_nchw
from latentdit.metrics.stats import FeatureStats, load_stats, open_npz, read_npy_header, read_npz_key


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


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: tuple[int, int]) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        arr = np.array(read_rgb(self.files[i]), dtype=np.uint8)  # a writable copy
        if arr.shape[:2] != self.size:
            raise LatentDiTError(f"image {self.files[i]} changed size while reading ({arr.shape[:2]} vs {self.size})")
        return arr


class FolderImages(ImageSource):
    """Images under a folder (recursive), sorted by relative path; all must have one size."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise LatentDiTError(f"image folder not found: {self.root}")
        self.files = sorted(list_images(self.root), key=lambda p: p.relative_to(self.root).as_posix())
        if not self.files:
            raise LatentDiTError(
                f"no images found in folder {self.root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        if len(self.files) < 2:
            raise LatentDiTError(f"folder {self.root} has only 1 image ({self.files[0]}); statistics need at least 2")
        first_size = None
        for p in self.files:  # header reads only: fail before any feature is computed
            size = read_size(p)  # (W, H)
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

    def __init__(self, path: str | os.PathLike, key: str = "arr_0") -> None:
        self.path, self.key = Path(path), key
        self.member = f"{key}.npy"
        header = read_npy_header(self.path, key)
        self._offset = header.offset
        self.shape, self.fortran, self.dtype = header.shape, header.fortran_order, header.dtype
        self.num_images = int(self.shape[0]) if self.shape else 0
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
            with open_npz(self.path) as npz:
                arr = np.ascontiguousarray(read_npz_key(npz, self.key, self.path))
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
    with open_npz(path) as npz:
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
