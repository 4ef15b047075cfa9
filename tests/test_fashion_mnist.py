"""Fashion-MNIST reader: IDX parsing and validation, items, class names, torchvision fallback."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdit.data import fashion_mnist as fm
from latentdit.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, read_idx, read_split
from latentdit.errors import LatentDiTError

REAL_ROOT = fm.DEFAULT_ROOT
HAVE_REAL = all(p.is_file() for s in ("train", "test") for p in fm.split_files(REAL_ROOT, s))


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def make_split(root: Path, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    image_path, label_path = fm.split_files(root, split)
    write_gz(image_path, idx_bytes(images))
    write_gz(label_path, idx_bytes(labels))
    return images, labels


def test_class_names():
    assert FASHION_MNIST_CLASSES == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@pytest.mark.skipif(not HAVE_REAL, reason="Debian package dataset-fashion-mnist not installed")
def test_real_files_counts_and_labels():
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = read_split(REAL_ROOT, split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10


@pytest.mark.skipif(not HAVE_REAL, reason="Debian package dataset-fashion-mnist not installed")
def test_real_items():
    ds = FashionMNIST("test", image_size=64)
    assert len(ds) == 10_000 and ds.class_names == list(FASHION_MNIST_CLASSES) and ds.num_classes == 10
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert label == 9 and isinstance(label, int)  # the first t10k item is an ankle boot
    assert image.min() >= -1 and image.max() <= 1 and image.min() == -1  # black background
    native = FashionMNIST("test", image_size=28)[0][0]
    raw = torch.from_numpy(read_split(REAL_ROOT, "test")[0][0].astype(np.float32))
    torch.testing.assert_close(native[0], raw / 127.5 - 1, rtol=0, atol=0)
    assert torch.equal(native[0], native[1]) and torch.equal(native[0], native[2])


def test_synthetic_items_bicubic(tmp_path):
    images, labels = make_split(tmp_path, "train", 12)
    ds = FashionMNIST("train", image_size=40, root=tmp_path)
    assert len(ds) == 12 and ds.root == tmp_path
    x, y = ds[5]
    expected = np.asarray(Image.fromarray(images[5]).resize((40, 40), Image.BICUBIC)).astype(np.float32) / 127.5 - 1
    assert y == int(labels[5]) == 5
    torch.testing.assert_close(x, torch.from_numpy(expected).expand(3, -1, -1), rtol=0, atol=0)
    xb, yb = ds.batch([5, 0])
    assert xb.shape == (2, 3, 40, 40) and yb.tolist() == [5, 0] and torch.equal(xb[0], x)


def test_truncated_gzip(tmp_path):
    make_split(tmp_path, "test", 10)
    image_path, _ = fm.split_files(tmp_path, "test")
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LatentDiTError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        FashionMNIST("test", root=tmp_path)


def test_wrong_magic_and_short_payload(tmp_path):
    path = write_gz(tmp_path / "a.gz", idx_bytes(np.zeros((2, 28, 28)), magic=0x0801))
    with pytest.raises(LatentDiTError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(path, fm.IMAGE_MAGIC)
    full = idx_bytes(np.zeros((3, 28, 28)))
    path = write_gz(tmp_path / "b.gz", full[:-28])  # header says 3 images, only 2.96 present
    with pytest.raises(LatentDiTError, match="truncated or corrupt"):
        read_idx(path, fm.IMAGE_MAGIC)
    path = write_gz(tmp_path / "c.gz", b"\x00\x00")
    with pytest.raises(LatentDiTError, match="too short"):
        read_idx(path, fm.IMAGE_MAGIC)


def test_count_mismatch_and_bad_labels(tmp_path):
    make_split(tmp_path, "test", 10)
    _, label_path = fm.split_files(tmp_path, "test")
    write_gz(label_path, idx_bytes(np.zeros(9)))
    with pytest.raises(LatentDiTError, match="10 images but .* 9 labels"):
        read_split(tmp_path, "test")
    write_gz(label_path, idx_bytes(np.full(10, 10)))
    with pytest.raises(LatentDiTError, match="label 10, expected 0..9"):
        read_split(tmp_path, "test")


def test_bad_arguments(tmp_path):
    make_split(tmp_path, "test", 4)
    with pytest.raises(LatentDiTError, match="split must be one of"):
        FashionMNIST("val", root=tmp_path)
    with pytest.raises(LatentDiTError, match="image_size"):
        FashionMNIST("test", image_size=0, root=tmp_path)
    with pytest.raises(LatentDiTError, match="train files not found"):
        FashionMNIST("train", root=tmp_path, download=False)


def test_download_fallback(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    class FakeDownloader:  # writes the files where torchvision puts them
        def __init__(self, root, train, download):
            assert download
            make_split(Path(root) / "FashionMNIST" / "raw", "train" if train else "test", 6)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownloader)
    ds = FashionMNIST("test", image_size=28, root=tmp_path / "dl")
    assert len(ds) == 6 and ds.root == tmp_path / "dl" / "FashionMNIST" / "raw"
    assert "downloading them with torchvision" in capsys.readouterr().err
    # a second call finds the downloaded files without downloading again
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", None)
    assert len(FashionMNIST("test", image_size=28, root=tmp_path / "dl")) == 6


def test_download_failure_is_clear(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(LatentDiTError, match="download .* failed: no network.*dataset-fashion-mnist"):
        FashionMNIST("train", root=tmp_path)
