"""tools/extract.py and latentdit.extraction: shards, flips, resume, bad files, refusals, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdit.data.images import center_crop_arr, array_to_tensor
from latentdit.data.latents import MANIFEST_NAME, list_shards, read_manifest, read_shard_metadata
from latentdit.errors import LatentDiTError
from latentdit.extraction import ExtractionSettings, extract_latents
from latentdit.io import load_safetensors
from script_helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16


def make_vae_dir(path: Path, seed: int = 0) -> Path:
    """A tiny random diffusers AutoencoderKL (f2, 4 latent channels) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                          latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.5)
    model.save_pretrained(path)
    return path


def make_image_folder(root: Path, per_class: int = 5, classes=("cat", "ant", "bee"), seed: int = 0) -> Path:
    """ImageNet layout with random RGB PNG/JPEG images of assorted sizes."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(root / c / (f"img{i:02d}.png" if i % 2 == 0 else f"img{i:02d}.JPG"))
    return root



@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_vae_dir(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="module")
def vae(vae_dir):
    from latentdit.vae import VAE

    return VAE.load(vae_dir)


@pytest.fixture
def images(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def run(data, out, vae, on_shard_written=None, **kw):
    kw.setdefault("image_size", IMAGE_SIZE)
    kw.setdefault("batch_size", 4)
    kw.setdefault("shard_size", 6)
    return extract_latents(ExtractionSettings(data, out, use_accelerate=False, progress=False, **kw), vae=vae,
                           on_shard_written=on_shard_written)


def load_all(out: Path) -> dict[str, torch.Tensor]:
    """All shard tensors of a directory concatenated in shard order."""
    parts = [load_safetensors(p)[0] for p in list_shards(out).values()]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_shards_manifest_and_flips(images, vae, tmp_path):
    out = tmp_path / "lat"
    report = run(images, out, vae, dtype="float32")
    m = read_manifest(out)
    assert report.num_items == m["num_items"] == 15 and report.num_bad == 0
    assert [s["count"] for s in m["shards"]] == [6, 6, 3] and report.num_shards == 3
    assert m["class_names"] == ["ant", "bee", "cat"] and m["num_classes"] == 3
    assert m["latent_shape"] == [4, IMAGE_SIZE // 2, IMAGE_SIZE // 2] and m["flip"] is True
    assert m["scaling_factor"] == 0.5 and m["dtype"] == "float32" and m["image_size"] == IMAGE_SIZE
    assert m["vae"] == vae.identity() | {"spec": m["vae"]["spec"]}
    t = load_all(out)
    assert t["indices"].tolist() == list(range(15))
    assert t["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # Stored moments equal encoding the image and its horizontal flip directly.
    files = sorted((images / c / f) for c in ("ant", "bee", "cat") for f in sorted(os.listdir(images / c)))
    x = torch.stack([array_to_tensor(center_crop_arr(Image.open(f), IMAGE_SIZE)) for f in files])
    with torch.no_grad():
        mean, std = vae.encode_moments(x)
        mean_f, std_f = vae.encode_moments(x.flip(-1))
    torch.testing.assert_close(t["mean"][:, 0], mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t["std"][:, 0], std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t["mean"][:, 1], mean_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t["std"][:, 1], std_f, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t["mean"][:, 1], t["mean"][:, 0])  # the flip is not a no-op
    # Shard metadata records the settings; the manifest is complete without reading tensors.
    settings, record = read_shard_metadata(out / "shard-00001.safetensors")
    assert settings["image_size"] == IMAGE_SIZE and record == {"shard": 1, "start": 6, "stop": 12, "count": 6,
                                                               "bad": [], "process": 0}


def test_float16_storage_is_close_and_no_flip(images, vae, tmp_path):
    run(images, tmp_path / "f32", vae, dtype="float32")
    run(images, tmp_path / "f16", vae, dtype="float16", flip=False)
    a, b = load_all(tmp_path / "f32"), load_all(tmp_path / "f16")
    assert b["mean"].dtype == torch.float16 and b["mean"].shape[1] == 1
    torch.testing.assert_close(b["mean"][:, 0].float(), a["mean"][:, 0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b["std"][:, 0].float(), a["std"][:, 0], rtol=1e-3, atol=1e-6)
    assert read_manifest(tmp_path / "f16")["flip"] is False


def test_interrupted_extraction_resumes_to_identical_result(images, vae, tmp_path):
    run(images, tmp_path / "full", vae)
    out = tmp_path / "partial"

    def kill_after_first(k, path):
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(images, out, vae, on_shard_written=kill_after_first)
    assert sorted(list_shards(out)) == [0] and not (out / MANIFEST_NAME).exists()
    (out / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"half-written")  # a killed writer's temp file
    with pytest.raises(LatentDiTError, match="did not finish"):
        read_manifest(out)
    written = []
    report = run(images, out, vae, on_shard_written=lambda k, p: written.append(k))
    assert written == [1, 2] and report.shards_skipped == 1 and report.items_encoded == 9
    assert not list(out.glob("*.tmp"))
    full, resumed = load_all(tmp_path / "full"), load_all(out)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    # A deleted shard is re-encoded; a complete directory is left alone.
    (out / "shard-00002.safetensors").unlink()
    (out / MANIFEST_NAME).unlink()
    assert run(images, out, vae).shards_written == 1
    again = run(images, out, vae)
    assert again.shards_written == 0 and again.items_encoded == 0 and again.num_items == 15


def test_bad_files_are_skipped_and_reported(images, vae, tmp_path):
    (images / "ant" / "empty.png").write_bytes(b"")
    (images / "bee" / "notes.jpg").write_text("this is not an image")
    good = images / "cat" / "img00.png"
    data = good.read_bytes()
    (images / "cat" / "truncated.PNG").write_bytes(data[: len(data) // 2])
    out = tmp_path / "lat"
    report = run(images, out, vae, num_workers=2)
    m = read_manifest(out)
    assert report.num_items == m["num_items"] == 15 and report.num_bad == m["num_bad"] == 3
    bad = {Path(b["path"]).name: b["reason"] for b in m["bad_files"]}
    assert set(bad) == {"empty.png", "notes.jpg", "truncated.PNG"}
    assert "0 bytes" in bad["empty.png"] and "not a recognised image" in bad["notes.jpg"]
    assert "decode" in bad["truncated.PNG"]
    t = load_all(out)
    assert len(set(t["indices"].tolist())) == 15 and sum(s["count"] for s in m["shards"]) == 15
    assert "truncated.PNG" in report.format()


def test_mismatched_directory_is_refused(images, vae, vae_dir, tmp_path):
    out = tmp_path / "lat"
    run(images, out, vae)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(LatentDiTError, match=r"image_size: 16 \(now 32\)"):
        run(images, out, vae, image_size=32)
    from latentdit.vae import VAE

    other = VAE.load(make_vae_dir(tmp_path / "other-vae", seed=1))
    with pytest.raises(LatentDiTError, match=r"vae\.(config|weights)_sha256"):
        run(images, out, other)
    other_images = make_image_folder(tmp_path / "other-images", per_class=5)
    with pytest.raises(LatentDiTError, match="dataset.path"):
        run(other_images, out, vae)
    # Shards alone (no manifest yet) are checked too.
    (out / MANIFEST_NAME).unlink()
    before.pop(MANIFEST_NAME)
    with pytest.raises(LatentDiTError, match="shard_size: 6 \\(now 4\\)"):
        run(images, out, vae, shard_size=4)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST IDX files not installed")
def test_fashion_mnist_source(vae, tmp_path):
    from latentdit.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

    out = tmp_path / "fm"
    report = run("fashion-mnist", out, vae, split="test", limit=10, flip=False, dtype="float32")
    m = read_manifest(out)
    assert report.num_items == 10 and m["class_names"] == list(FASHION_MNIST_CLASSES)
    assert m["dataset"]["kind"] == "fashion-mnist" and m["dataset"]["split"] == "test"
    assert m["dataset"]["num_files"] == 10_000 and m["settings"]["limit"] == 10
    src = FashionMNIST("test", image_size=IMAGE_SIZE)
    t = load_all(out)
    assert t["labels"].tolist() == [src[i][1] for i in range(10)]
    with torch.no_grad():
        mean, _ = vae.encode_moments(torch.stack([src[i][0] for i in range(10)]))
    torch.testing.assert_close(t["mean"][:, 0], mean, atol=1e-5, rtol=1e-5)


def test_tool_end_to_end_and_user_errors(images, vae_dir, tmp_path, capsys):
    tool = load_tool("extract")
    out = tmp_path / "lat"
    args = ["--data", str(images), "--out", str(out), "--vae", str(vae_dir), "--image-size", str(IMAGE_SIZE),
            "--shard-size", "4", "--limit", "7", "--num-workers", "0", "--no-progress", "--batch-size", "3"]
    assert tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "7 items in 2 shards" in printed and "bad files skipped: 0" in printed
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["num_items"] == 7 and m["settings"]["limit"] == 7
    with pytest.raises(SystemExit) as e:
        from latentdit.cli import run_main

        run_main(tool.main, args[:-2] + ["--image-size", "32"])
    assert e.value.code == 2 and "image_size" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_extraction_matches_one_process(images, vae_dir, vae, tmp_path):
    (images / "bee" / "zz-bad.png").write_bytes(b"")  # reported by whichever process meets it
    one, two = tmp_path / "one", tmp_path / "two"
    run(images, one, vae, shard_size=4)

    def kill_after_first(k, path):
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):  # one process starts, two processes finish the job
        run(images, two, vae, shard_size=4, on_shard_written=kill_after_first)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(29500 + os.getpid() % 1000), str(REPO / "tools" / "extract.py"), "--data", str(images),
           "--out", str(two), "--vae", str(vae_dir), "--image-size", str(IMAGE_SIZE), "--shard-size", "4",
           "--batch-size", "4", "--num-workers", "0", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("15 items in 4 shards (3 written now, 1 already complete)") == 1, proc.stdout
    m = read_manifest(two)
    assert m["num_items"] == 15 and m["num_bad"] == 1 and Path(m["bad_files"][0]["path"]).name == "zz-bad.png"
    assert m["shards"] == read_manifest(one)["shards"]
    writers = [read_shard_metadata(two / s["file"])[1]["process"] for s in m["shards"]]
    assert writers == [0, 1, 0, 1]  # shard k is written by process k % 2 only
    # Every image exactly once, with the same moments as one process.
    a, b = load_all(one), load_all(two)
    assert b["indices"].tolist() == [i for i in range(16) if i != 10]
    assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["mean"].float(), b["mean"].float(), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(a["std"].float(), b["std"].float(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "bfloat16", "--dtype must be one of"),
    ("latent_norm", "per-pixel", "--latent-norm must be one of scalar, per-channel"),
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("shard_size", 0, "shard_size must be a positive integer"),
    ("image_size", 0, "image_size must be a positive integer"),
    ("num_workers", -1, "num_workers must be >= 0"),
    ("limit", 0, "--limit must be a positive integer"),
])
def test_settings_are_checked_when_made(tmp_path, field, value, message):
    with pytest.raises(LatentDiTError, match=message):
        ExtractionSettings("fashion-mnist", tmp_path / "out", **{field: value})
    assert not (tmp_path / "out").exists()


def test_rgba_images_are_encoded_as_the_same_images_on_white(vae, tmp_path):
    """Extraction reads files with the project's one image reader: transparency composited on white."""
    rng = np.random.default_rng(3)
    for name in ("rgba", "white"):
        (tmp_path / name).mkdir()
    for i in range(3):
        rgba = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rng.random((IMAGE_SIZE, IMAGE_SIZE)) < 0.5, 0, rgba[..., 3])
        image = Image.fromarray(rgba, "RGBA")
        image.save(tmp_path / "rgba" / f"{i}.png")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        white.save(tmp_path / "white" / f"{i}.png")
    run(tmp_path / "rgba", tmp_path / "lat-rgba", vae, dtype="float32")
    run(tmp_path / "white", tmp_path / "lat-white", vae, dtype="float32")
    a, b = load_all(tmp_path / "lat-rgba"), load_all(tmp_path / "lat-white")
    assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"])
