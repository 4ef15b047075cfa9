"""Fashion-MNIST read straight from its IDX ``.gz`` files (the project's default data set).

The Debian package ``dataset-fashion-mnist`` puts the four files in
``/usr/share/datasets/fashion-mnist``. When they are missing the loader falls back to
torchvision's downloader (and says so), then reads the downloaded files with the same reader.
Items are ``(image, label)``: the 28×28 grey image repeated to RGB, resized to ``image_size`` with
PIL bicubic, as a float32 tensor ``3×S×S`` in ``[-1, 1]``; ``label`` is an ``int`` in ``0..9``.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from latentdit.errors import LatentDiTError

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides :data:`DEFAULT_ROOT`.
ROOT_ENV = "LATENTDIT_FASHION_MNIST"

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def split_files(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The (images, labels) ``.gz`` paths of ``split`` under ``root``."""
    prefix = SPLIT_PREFIX[_check_split(split)]
    root = Path(root)
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def _check_split(split: str) -> str:
    if split not in SPLIT_PREFIX:
        raise LatentDiTError(f"Fashion-MNIST split must be one of {sorted(SPLIT_PREFIX)}, got {split!r}")
    return split


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut-off stream raises EOFError
        raise LatentDiTError(f"Fashion-MNIST file {path} is not a readable gzip file ({e}); "
                             "it may be truncated — reinstall or re-download it.") from e


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes, checking its magic number and its length."""
    path = Path(path)
    data = _read_gz(path)
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LatentDiTError(f"Fashion-MNIST file {path} is too short ({len(data)} bytes) for an IDX header.")
    (magic,) = struct.unpack(">i", data[:4])
    if magic != expected_magic:
        raise LatentDiTError(f"Fashion-MNIST file {path} has IDX magic number {magic:#010x}, "
                             f"expected {expected_magic:#010x}; it is not the file its name says.")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    count = int(np.prod(dims))
    if len(data) - header != count:
        raise LatentDiTError(f"Fashion-MNIST file {path} holds {len(data) - header} data bytes, but its "
                             f"header says {dims} = {count}; the file is truncated or corrupt.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(images uint8 [N, 28, 28], labels uint8 [N])`` of ``split`` from the IDX files in ``root``."""
    image_path, label_path = split_files(root, split)
    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise LatentDiTError(f"Fashion-MNIST {split}: {image_path} holds {images.shape[0]} images but "
                             f"{label_path} holds {labels.shape[0]} labels.")
    if images.shape[1:] != (28, 28):
        raise LatentDiTError(f"Fashion-MNIST file {image_path} holds images of shape {images.shape[1:]}, "
                             "expected (28, 28).")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise LatentDiTError(f"Fashion-MNIST file {label_path} holds label {int(labels.max())}, expected 0..9.")
    return images, labels


def _download_with_torchvision(root: Path, split: str) -> Path:
    """Download the split with torchvision into ``root``; returns the folder holding the ``.gz`` files."""
    print(f"Fashion-MNIST files not found; downloading them with torchvision into {root} "
          "(install the Debian package dataset-fashion-mnist to skip this).", file=sys.stderr)
    try:
        from torchvision.datasets import FashionMNIST as TVFashionMNIST

        TVFashionMNIST(root=str(root), train=(split == "train"), download=True)
    except Exception as e:  # no network, no torchvision, server down...
        raise LatentDiTError(
            f"Fashion-MNIST {split} split not found (looked for {', '.join(str(p) for p in split_files(DEFAULT_ROOT, split))}) "
            f"and the torchvision download into {root} failed: {e}. Install the Debian package "
            f"dataset-fashion-mnist, or pass root= / set {ROOT_ENV} to a folder holding the IDX .gz files."
        ) from e
    return root / "FashionMNIST" / "raw"


def resolve_root(split: str, root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding ``split``'s IDX files: ``root``, ``$LATENTDIT_FASHION_MNIST``, the Debian
    location, a previous torchvision download, or (``download=True``) a fresh torchvision download."""
    _check_split(split)
    if root is not None:
        candidates = [Path(root), Path(root) / "FashionMNIST" / "raw"]
    elif os.environ.get(ROOT_ENV):
        candidates = [Path(os.environ[ROOT_ENV])]
    else:
        candidates = [DEFAULT_ROOT, _cache_dir() / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all(p.is_file() for p in split_files(folder, split)):
            return folder
    if not download:
        raise LatentDiTError(f"Fashion-MNIST {split} files not found in {', '.join(map(str, candidates))}.")
    return _download_with_torchvision(Path(root) if root is not None else _cache_dir(), split)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latentdit" / "fashion-mnist"


class FashionMNIST(Dataset):
    """Fashion-MNIST ``split`` ("train": 60,000 images, "test": 10,000) as ``(image, label)`` items.

    ``image`` is float32 ``3×S×S`` in ``[-1, 1]`` (grey repeated to RGB, PIL bicubic resize to
    ``image_size``); ``label`` is an ``int``. ``images`` / ``labels`` hold the raw uint8 arrays.
    """

    def __init__(self, split: str = "train", image_size: int = 64, root: str | os.PathLike | None = None,
                 download: bool = True) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise LatentDiTError(f"Fashion-MNIST image_size must be a positive integer, got {image_size!r}")
        self.split = _check_split(split)
        self.image_size = image_size
        self.root = resolve_root(split, root, download=download)
        self.images, self.labels = read_split(self.root, split)
        self.class_names: list[str] = list(FASHION_MNIST_CLASSES)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def image_uint8(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 ``S×S`` grey (after the bicubic resize, before the RGB repeat)."""
        grey = self.images[index]
        if self.image_size != grey.shape[0]:
            pil = Image.fromarray(grey).resize((self.image_size, self.image_size), Image.BICUBIC)
            grey = np.asarray(pil)
        return grey

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        grey = torch.from_numpy(self.image_uint8(index).astype(np.float32))
        image = (grey / 127.5 - 1.0).unsqueeze(0).expand(3, -1, -1).contiguous()
        return image, int(self.labels[index])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, S, S]`` and labels ``[B]`` (long) of ``indices``, stacked."""
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)
