"""Image preprocessing (RGB conversion, ADM center crop) and the folder datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdit.data import build_image_dataset, dataset_identity
from latentdit.data.images import (
    FlatFolderDataset,
    ImageFolderDataset,
    array_to_tensor,
    center_crop_arr,
    load_image_file,
    read_rgb,
    read_size,
    to_rgb,
)
from latentdit.errors import LatentDiTError


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgba_and_la_are_composited_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)      # transparent red -> white
    rgba[0, 1] = (255, 0, 0, 255)    # opaque red
    rgba[0, 2] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    out = pixels(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert pixels(to_rgb(la)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_grey_cmyk_and_16bit():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    assert pixels(to_rgb(pal)).tolist() == [[[0, 0, 255], [0, 255, 0]]]
    pal.info["transparency"] = 0  # palette entry 0 transparent -> white
    assert pixels(to_rgb(pal)).tolist() == [[[255, 255, 255], [0, 255, 0]]]
    grey = Image.fromarray(np.array([[7, 200]], np.uint8), "L")
    assert pixels(to_rgb(grey)).tolist() == [[[7, 7, 7], [200, 200, 200]]]
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    assert pixels(to_rgb(cmyk)).tolist() == [[[255, 255, 255], [255, 0, 0]]]
    i16 = Image.fromarray(np.array([[0, 65535, 32896]], np.uint16)).convert("I;16")
    assert i16.mode == "I;16"
    assert pixels(to_rgb(i16))[0, :, 0].tolist() == [0, 255, 128]  # scaled, not clipped
    assert pixels(to_rgb(Image.new("1", (1, 1), 1))).tolist() == [[[255, 255, 255]]]


def test_center_crop_box_then_bicubic_path():
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = center_crop_arr(src, 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    # 300x200: box-halve to 150x100 (still >= 96: halve again to 75x50), bicubic to 72x48, center crop.
    ref = src.resize((150, 100), Image.BOX).resize((75, 50), Image.BOX).resize((72, 48), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(ref)[:, 12:60])
    bicubic_only = np.asarray(src.resize((72, 48), Image.BICUBIC))[:, 12:60]
    assert not np.array_equal(out, bicubic_only)
    # Upscaling (no box step) and a tall image: crop taken from the vertical center.
    tall = np.zeros((40, 10, 3), np.uint8)
    tall[18:22] = 255
    up = center_crop_arr(Image.fromarray(tall), 20)
    assert up.shape == (20, 20, 3)
    assert np.array_equal(up, np.asarray(Image.fromarray(tall).resize((20, 80), Image.BICUBIC))[30:50])
    assert up[10, 10].tolist() == [255, 255, 255] and up[0, 0].tolist() == [0, 0, 0]
    # Greyscale input comes out RGB; the tensor is in [-1, 1].
    g = center_crop_arr(Image.new("L", (33, 31), 255), 16)
    assert g.shape == (16, 16, 3) and (g == 255).all()
    t = array_to_tensor(g)
    assert t.shape == (3, 16, 16) and torch.all(t == 1.0)
    assert array_to_tensor(np.zeros((2, 2, 3), np.uint8)).eq(-1).all()


def _save(path: Path, size=(12, 10), color=(10, 20, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def test_image_folder_layout_labels_and_bad_files(tmp_path):
    root = tmp_path / "data"
    _save(root / "zebra" / "a.PNG")
    _save(root / "zebra" / "sub" / "b.JpEg", fmt="JPEG")
    _save(root / "apple" / "c.png")
    _save(root / "apple" / ".hidden.png")
    (root / "apple" / "notes.txt").write_text("ignored: not an image extension")
    (root / "apple" / "zero.jpg").write_bytes(b"")
    (root / "empty-class").mkdir()
    ds = build_image_dataset(root, image_size=8)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.class_names == ["apple", "zebra"] and ds.num_classes == 2
    assert ds.relative_paths() == ["apple/c.png", "apple/zero.jpg", "zebra/a.PNG", "zebra/sub/b.JpEg"]
    assert ds.targets == [0, 0, 1, 1]
    image, label, index, path = ds[2]
    assert image.shape == (3, 8, 8) and label == 1 and index == 2 and path.endswith("a.PNG")
    bad = ds[1]
    assert bad[0] is None and bad[1] == 0
    assert "0 bytes" in ds.load(1).error
    ident = dataset_identity(ds, root, "train")
    assert ident["kind"] == "image-folder" and ident["num_files"] == 4 and ident["class_names"] == ["apple", "zebra"]
    assert ident["path"] == str(root.resolve())


def test_bad_file_reasons(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    assert load_image_file(good, 8)[1] is None
    assert "decode" in load_image_file(tmp_path / "trunc.png", 8)[1]
    assert "not a recognised image" in load_image_file(tmp_path / "text.jpg", 8)[1]


def test_large_drawings_load_without_warnings_and_bombs_are_refused(tmp_path, monkeypatch):
    import warnings

    path = tmp_path / "poster.png"
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: past the warning, below 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the read
        image, reason = load_image_file(path, 8)
    assert reason is None and image.shape == (3, 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,600 pixels: past Pillow's hard limit (2x)
    image, reason = load_image_file(path, 8)
    assert image is None and "decompression-bomb" in reason


def test_flat_folder_split_folders_and_empty_folder(tmp_path):
    flat = tmp_path / "flat"
    _save(flat / "x.png")
    _save(flat / "more" / "y.bmp")
    ds = build_image_dataset(flat, image_size=8)
    assert isinstance(ds, FlatFolderDataset) and len(ds) == 2 and ds.targets == [0, 0] and ds.num_classes == 1
    assert dataset_identity(ds, flat)["kind"] == "flat-folder"
    splits = tmp_path / "splits"
    _save(splits / "train" / "dog" / "1.png")
    _save(splits / "val" / "dog" / "2.png")
    _save(splits / "val" / "cat" / "3.png")
    assert build_image_dataset(splits, split="val", image_size=8).class_names == ["cat", "dog"]
    with pytest.raises(LatentDiTError, match="split 'test' not found"):
        build_image_dataset(splits, split="test", image_size=8)
    empty = tmp_path / "nothing-here"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(LatentDiTError, match="nothing-here"):
        build_image_dataset(empty, image_size=8)
    with pytest.raises(LatentDiTError, match="nothing-here"):
        FlatFolderDataset(empty, 8)
    with pytest.raises(LatentDiTError, match="missing-dir"):
        build_image_dataset(tmp_path / "missing-dir", image_size=8)


def test_read_rgb_and_read_size_name_the_file_and_the_reason(tmp_path):
    path = tmp_path / "drawing.png"
    rgba = np.zeros((3, 5, 4), np.uint8)
    rgba[..., 0] = 255  # red stored under fully transparent pixels
    Image.fromarray(rgba, "RGBA").save(path)
    assert read_size(path) == (5, 3)
    assert pixels(read_rgb(path)).tolist() == [[[255, 255, 255]] * 5] * 3  # white, not the stored red
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(LatentDiTError, match=r"could not read image .*empty\.png: empty file"):
        read_rgb(tmp_path / "empty.png")
    with pytest.raises(LatentDiTError, match=r"could not read image .*text\.png: not a recognised image format"):
        read_size(tmp_path / "text.png")
