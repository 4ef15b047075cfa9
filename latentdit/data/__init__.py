"""Datasets: image sources for extraction and VAE training (Fashion-MNIST, image folders; every image file is
read by :func:`latentdit.data.images.read_rgb`) and stored latents for training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from latentdit.errors import LatentDiTError
from latentdit.io import sha256_json

from latentdit.data.images import (IMAGE_EXTENSIONS, FlatFolderDataset, ImageFolderDataset, class_subfolders,
                                   is_image_file)

FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist")
SPLIT_FOLDERS = {"train", "val", "valid", "validation", "test"}


def is_fashion_mnist(spec: str | os.PathLike) -> bool:
    """True when ``spec`` names the built-in Fashion-MNIST data rather than a folder."""
    return str(spec).lower() in FASHION_MNIST_NAMES


def _resolve_folder(spec: str | os.PathLike, split: str) -> Path:
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise LatentDiTError(
            f"--data {spec!s}: expected 'fashion-mnist' or an existing image folder, but {root} is not a folder")
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    # A dataset root holding only split folders (train/, val/, ...) is entered at the requested split.
    if subdirs and subdirs <= SPLIT_FOLDERS and not any(is_image_file(p) for p in root.iterdir()):
        if split not in subdirs:
            raise LatentDiTError(f"split {split!r} not found in {root}: it has the split folders {sorted(subdirs)}")
        root = root / split
    return root


def build_image_dataset(spec: str | os.PathLike, split: str = "train", image_size: int = 256):
    """The image source named by ``spec``: ``fashion-mnist``, or a folder.

    A folder holding only split subfolders (``train``/``val``/``test``) is entered at ``split``. A folder
    with images directly in it is flat (one class); otherwise its subfolders with images are the classes
    (ImageNet layout, class index by sorted folder name).
    """
    if is_fashion_mnist(spec):
        from latentdit.data.fashion_mnist import FashionMNIST

        return FashionMNIST(split=split, image_size=image_size)
    root = _resolve_folder(spec, split)
    if any(is_image_file(p) and p.is_file() for p in root.iterdir()):
        return FlatFolderDataset(root, image_size)
    if class_subfolders(root):
        return ImageFolderDataset(root, image_size)
    raise LatentDiTError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {root} or its subfolders")


def dataset_class_names(dataset: Any) -> list[str]:
    """Class names of a dataset built by :func:`build_image_dataset`."""
    names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    if names is None:
        from latentdit.data.fashion_mnist import FASHION_MNIST_CLASSES

        names = FASHION_MNIST_CLASSES
    return [str(n) for n in names]


def dataset_identity(dataset: Any, spec: str | os.PathLike, split: str = "train") -> dict[str, Any]:
    """What identifies the source of a latent directory (recorded in the manifest and compared on resume):
    name or absolute path, split, number of files, class names, and for folders a hash of the file list."""
    class_names = dataset_class_names(dataset)
    if is_fashion_mnist(spec):
        return {"kind": "fashion-mnist", "name": "fashion-mnist", "split": split,
                "num_files": len(dataset), "class_names": class_names}
    ident = {"kind": "image-folder" if isinstance(dataset, ImageFolderDataset) else "flat-folder",
             "path": str(Path(dataset.root).resolve()), "split": split, "num_files": len(dataset),
             "class_names": class_names}
    ident["files_sha256"] = sha256_json(dataset.relative_paths())
    return ident
