"""Many samples on disk, for FID: chunk files, resume bookkeeping and the ADM-style ``.npz``.

A run of ``tools/sample_ddp.py`` cuts its N samples into chunks of ``chunk_size`` consecutive global
indices. Each chunk is written atomically as ``OUT/.chunks/chunk-KKKKKK.npz`` (so a present file is
complete), next to ``settings.json`` recording the settings the chunks were made with; a rerun samples
only the missing chunks and refuses other settings. :func:`gather_chunks` streams the chunks into
``samples.npz`` (``arr_0``: uint8 N×H×W×3 images, ``arr_1``: int64 labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from latentdit.errors import LatentDiTError

CHUNK_DIR = ".chunks"
CHUNK_SETTINGS = "settings.json"


LABEL_MODES = ("balanced", "training")


def balanced_labels(indices: Sequence[int] | range, num_classes: int) -> list[int]:
    """Label of global sample i is ``i % num_classes``: every class equally often (±1)."""
    return [int(i) % num_classes for i in indices]


def proportional_labels(num_samples: int, counts: Sequence[int]) -> list[int]:
    """Labels of global samples ``0 .. num_samples - 1`` in the proportions of ``counts`` (images per class).

    Smooth weighted round robin: every class adds its count to its credit, the class with the most credit
    (the lowest id on a tie) is drawn and pays the total. Every prefix of the sequence holds each class
    within one of its proportional share, so chunks are mixed and the first ``n`` samples of a longer run
    are the same as those of a run of ``n``; equal counts give :func:`balanced_labels`; a class with
    count 0 is never drawn.
    """
    weights = np.asarray(counts, dtype=np.int64)
    if weights.ndim != 1 or len(weights) == 0 or (weights < 0).any() or weights.sum() == 0:
        raise LatentDiTError(f"class counts must be non-negative with a positive sum, got {list(counts)}")
    total = int(weights.sum())
    credit = np.zeros_like(weights)
    labels = []
    for _ in range(num_samples):
        credit += weights
        c = int(np.argmax(credit))  # the first maximum: ties go to the lowest class id
        credit[c] -= total
        labels.append(c)
    return labels


def num_chunks(num_samples: int, chunk_size: int) -> int:
    return (num_samples + chunk_size - 1) // chunk_size


def chunk_range(k: int, num_samples: int, chunk_size: int) -> range:
    """Global sample indices of chunk ``k``."""
    return range(k * chunk_size, min((k + 1) * chunk_size, num_samples))


def samples_in_chunks(chunks: Sequence[int], num_samples: int, chunk_size: int) -> int:
    """How many samples the chunks ``chunks`` hold (the last chunk may be short)."""
    return sum(len(chunk_range(k, num_samples, chunk_size)) for k in chunks)


def chunk_path(chunk_dir: str | Path, k: int) -> Path:
    return Path(chunk_dir) / f"chunk-{k:06d}.npz"


def missing_chunks(chunk_dir: str | Path, total_chunks: int) -> list[int]:
    """Chunks whose file is absent (files are written atomically, so a present file is complete)."""
    return [k for k in range(total_chunks) if not chunk_path(chunk_dir, k).is_file()]


def write_chunk(path: str | Path, images: np.ndarray, labels: Sequence[int]) -> None:
    """Write one chunk (uint8 N×H×W×3 images + int64 labels) atomically."""
    from latentdit.io import atomic_write

    with atomic_write(path, "wb") as f:
        np.savez(f, images=np.ascontiguousarray(images, dtype=np.uint8),
                 labels=np.asarray(labels, dtype=np.int64))


def read_chunk(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            return z["images"], z["labels"]
    except Exception as e:
        raise LatentDiTError(f"chunk file {path} is unreadable ({e}); delete it to have it sampled again") from e


def prepare_chunk_dir(chunk_dir: str | Path, settings: dict, create: bool = True) -> None:
    """Create the chunk folder with its settings, or check that a resumed run uses the same settings.

    With ``create=False`` (non-main processes, after the main one created it) only the check is done.
    """
    from latentdit.io import read_json, write_json

    chunk_dir = Path(chunk_dir)
    path = chunk_dir / CHUNK_SETTINGS
    if create:
        chunk_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file() or not create:
        old = read_json(path, "chunk settings")
        diffs = [f"{k}: {old.get(k)!r} (earlier run) vs {settings.get(k)!r} (now)"  # a key on either side only
                 for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]  # differs as well
        if diffs:
            raise LatentDiTError(
                f"{chunk_dir} holds chunks from a run with other settings ({'; '.join(diffs)}); "
                "use another output folder or delete that one to start over"
            )
    else:
        write_json(path, settings)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def gather_chunks(chunk_dir: str | Path, num_samples: int, chunk_size: int, out_path: str | Path) -> Path:
    """Write the ADM-style ``.npz`` (``arr_0``: uint8 N×H×W×3 images, ``arr_1``: int64 labels), atomically.

    Chunks are streamed into the archive one at a time, so memory stays at one chunk.
    """
    import zipfile

    from latentdit.io import atomic_path

    total = num_chunks(num_samples, chunk_size)
    missing = missing_chunks(chunk_dir, total)
    if missing:
        raise LatentDiTError(f"cannot gather: {len(missing)} chunk(s) missing in {chunk_dir} (first: {missing[0]})")
    first, _ = read_chunk(chunk_path(chunk_dir, 0))
    image_shape = tuple(first.shape[1:])
    with atomic_path(out_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                f.write(_npy_header((num_samples, *image_shape), np.uint8))
                chunk_labels = []
                for k in range(total):
                    images, labels = read_chunk(chunk_path(chunk_dir, k))
                    expect = len(chunk_range(k, num_samples, chunk_size))
                    if images.shape != (expect, *image_shape) or images.dtype != np.uint8:
                        raise LatentDiTError(f"chunk {chunk_path(chunk_dir, k)} holds {images.shape} {images.dtype}, "
                                             f"expected {(expect, *image_shape)} uint8")
                    f.write(np.ascontiguousarray(images).tobytes())
                    chunk_labels.append(labels)
            all_labels = np.concatenate(chunk_labels)
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                f.write(_npy_header(all_labels.shape, np.int64))
                f.write(all_labels.astype(np.int64).tobytes())
    return Path(out_path)
