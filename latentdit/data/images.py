"""Reading image files, image folders and the ADM/DiT preprocessing (box-then-bicubic resize, center crop).

Every part of the project that reads an image file (extraction, VAE training, the metrics) reads it
through :func:`read_rgb`: one list of extensions (:data:`IMAGE_EXTENSIONS`), one listing of a folder
(:func:`list_images`), one conversion to RGB (:func:`to_rgb`: transparency composited on white) and
one treatment of Pillow's decompression-bomb limits. So a model is trained on, and scored on, the
same pixels.

Two folder layouts are supported: ImageNet layout (one subfolder per class; class index = position of
the folder name in sorted order) and a flat folder (every image is class 0). A file that cannot be
decoded is not an exception for the datasets: they return ``None`` in place of the image, so the
extraction counts and lists it and goes on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latentdit.errors import LatentDiTError

#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

#: One-line description of the conversion of a file to RGB (part of the metrics' feature-cache key).
RGB_CONVERSION = "to_rgb (alpha and palette transparency composited on white; L/P/CMYK/16-bit -> RGB)"

#: One-line description of the preprocessing, recorded in the latent manifest.
PREPROCESSING = (f"{RGB_CONVERSION}, box downsample by 2 while the short side >= 2x image_size, bicubic resize "
                 "of the short side to image_size, center crop to image_size x image_size, scale to [-1, 1]")

_WHITE = (255, 255, 255)


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (case-insensitive) and is not hidden."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _integer_to_l(pil: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey images -> 8-bit grey, scaling the full range instead of clipping."""
    arr = np.asarray(pil)
    if pil.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(arr) * scale, 0, 255)
    else:
        arr = arr.astype(np.int64)
        # 16-bit modes (and "I" images whose values exceed 8 bits) span 0..65535.
        sixteen = pil.mode.startswith("I;16") or (arr.size and arr.max() > 255)
        out = np.clip(arr / 257.0 if sixteen else arr, 0, 255)
    return Image.fromarray(np.round(out).astype(np.uint8), mode="L")


def to_rgb(pil: Image.Image) -> Image.Image:
    """Convert any PIL image to RGB.

    Transparency (RGBA, LA, PA, palette or grey/RGB with a transparent colour) is composited on white;
    CMYK, YCbCr, grey, 1-bit and palette images are converted; 16-bit and float grey images are scaled
    to 8 bits rather than clipped.
    """
    mode = pil.mode
    if mode == "RGB" and "transparency" not in pil.info:
        return pil
    if mode in ("I", "F") or mode.startswith("I;16"):
        pil = _integer_to_l(pil)
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in pil.info:
        return _composite_on_white(pil.convert("RGBA"))
    return pil.convert("RGB")


def center_crop_arr(pil: Image.Image, image_size: int) -> np.ndarray:
    """ADM/DiT preprocessing: RGB, halve with a box filter while the short side is at least twice
    ``image_size``, bicubic-resize the short side to ``image_size``, center crop. Returns uint8 HxWx3."""
    if image_size < 1:
        raise LatentDiTError(f"image_size must be a positive integer, got {image_size}")
    pil = to_rgb(pil)
    while min(pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(side // 2 for side in pil.size), resample=Image.BOX)
    scale = image_size / min(pil.size)
    # max(.., image_size) guards the short side against rounding below the target.
    new_size = tuple(max(round(side * scale), image_size) for side in pil.size)
    pil = pil.resize(new_size, resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class LoadedImage(NamedTuple):
    """One item read for extraction; ``image`` is None (and ``error`` says why) for an unreadable file."""

    image: torch.Tensor | None
    label: int
    index: int
    path: str
    error: str | None


def _open(path: str | os.PathLike, decode: bool) -> tuple[Image.Image | None, tuple[int, int] | None, str | None]:
    """``(RGB image or None, (W, H), None)`` or ``(None, None, reason)``; never raises for a bad file."""
    try:
        if os.path.getsize(path) == 0:
            return None, None, "empty file (0 bytes)"
        with warnings.catch_warnings():
            # Large drawings (clip art at poster size) pass Pillow's warning threshold on every read; the
            # image is resized right away, and files past its hard limit are still refused below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as pil:
                if not decode:
                    return None, pil.size, None
                pil.load()  # decode now: truncated files fail here, not later
                return to_rgb(pil), pil.size, None
    except UnidentifiedImageError:
        return None, None, "not a recognised image format"
    except Image.DecompressionBombError as e:
        return None, None, f"refused by Pillow's decompression-bomb check ({e})"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return None, None, f"could not decode: {type(e).__name__}: {e}"


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode one image file to RGB (:func:`to_rgb`); raises :class:`LatentDiTError` naming the file and why."""
    image, _, reason = _open(path, decode=True)
    if image is None:
        raise LatentDiTError(f"could not read image {path}: {reason}")
    return image


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (no pixels decoded); raises like :func:`read_rgb`."""
    _, size, reason = _open(path, decode=False)
    if size is None:
        raise LatentDiTError(f"could not read image {path}: {reason}")
    return size


def load_image_file(path: str | os.PathLike, image_size: int) -> tuple[torch.Tensor | None, str | None]:
    """Read and preprocess one file: ``(tensor in [-1, 1], None)`` or ``(None, reason)``; never raises
    for a bad file (zero bytes, truncated, not an image, unreadable)."""
    image, _, reason = _open(path, decode=True)
    if image is None:
        return None, reason
    return array_to_tensor(center_crop_arr(image, image_size)), None


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files below ``folder`` (recursive, symbolic links followed, hidden entries skipped): the
    files of each folder in sorted order, then its subfolders in sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(filenames) if is_image_file(name))
    return found


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LatentDiTError(f"image folder not found (or not a folder): {root}")
    return root


def class_subfolders(root: str | os.PathLike) -> list[str]:
    """Names of the non-hidden subfolders of ``root`` that hold at least one image, sorted."""
    root = _check_root(root)
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and list_images(d))


class _FolderBase(torch.utils.data.Dataset):
    root: Path
    image_size: int
    files: list[Path]
    targets: list[int]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def relative_paths(self) -> list[str]:
        """File paths relative to the root (POSIX form), in item order."""
        return [p.relative_to(self.root).as_posix() for p in self.files]

    def load(self, index: int) -> LoadedImage:
        """Read item ``index`` with the reason when it is unreadable."""
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        path = self.files[index]
        image, error = load_image_file(path, self.image_size)
        return LoadedImage(image, self.targets[index], index, str(path), error)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int, str]:
        """``(image in [-1, 1] or None for a bad file, label, index, path)``."""
        item = self.load(index)
        return item.image, item.label, item.index, item.path


class ImageFolderDataset(_FolderBase):
    """ImageNet layout: ``root/<class name>/**/<image>``; label = index of the class in sorted order."""

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.root = _check_root(root)
        self.image_size = int(image_size)
        self.class_names = class_subfolders(self.root)
        if not self.class_names:
            raise LatentDiTError(f"no class subfolders with images ({', '.join(IMAGE_EXTENSIONS)}) in {self.root}")
        self.files, self.targets = [], []
        for label, name in enumerate(self.class_names):
            files = list_images(self.root / name)
            self.files.extend(files)
            self.targets.extend([label] * len(files))


class FlatFolderDataset(_FolderBase):
    """Every image below ``root`` (recursively), all of class 0 (unconditional)."""

    def __init__(self, root: str | os.PathLike, image_size: int, class_name: str | None = None):
        self.root = _check_root(root)
        self.image_size = int(image_size)
        self.files = list_images(self.root)
        if not self.files:
            raise LatentDiTError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {self.root}")
        self.targets = [0] * len(self.files)
        self.class_names = [class_name or self.root.name]
