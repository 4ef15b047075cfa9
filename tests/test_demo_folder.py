"""tools/demo.py --data FOLDER: the seeded held-out split and its record, flat vs class folders, bad input,
the image modes the one reader handles, and the stage commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdit.data import build_image_dataset
from latentdit.data.split import parse_held_out, split_held_out
from latentdit.errors import LatentDiTError
from test_pipeline import REPO_ROOT, Demo, DemoSettings, demo_tool

TOOL = REPO_ROOT / "tools" / "demo.py"
demo_folder = sys.modules["demo_folder"]


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_classes(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            _image(100 * c + i).save(root / name / f"{i:03d}.png")
    return root


def make_flat(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        _image(i).save(root / f"{i:03d}.png")
    return root


def folder_demo(tmp_path: Path, data: Path, **kw) -> Demo:
    return Demo(DemoSettings(out=tmp_path / "out", data=data, **kw), log=lambda s: None)


def test_held_out_setting_is_a_fraction_or_a_count():
    assert parse_held_out("0.25") == 0.25 and parse_held_out("3") == 3 and isinstance(parse_held_out("3"), int)
    for bad in ("0", "1.5", "-2", "ten"):
        with pytest.raises(LatentDiTError, match="--held-out"):
            parse_held_out(bad)


def test_split_is_seeded_per_class_and_covers_every_file_once(tmp_path):
    data = make_classes(tmp_path / "imgs", {"a": 10, "b": 7})
    ds = build_image_dataset(data, "train", 16)
    one, again = split_held_out(ds, 0.2, seed=0), split_held_out(ds, 0.2, seed=0)
    assert one == again
    assert sorted(one.train + one.held_out) == sorted(ds.relative_paths())
    assert not set(one.train) & set(one.held_out)
    assert sum(n.startswith("a/") for n in one.held_out) == 2 and sum(n.startswith("b/") for n in one.held_out) == 1
    assert split_held_out(ds, 0.2, seed=1).held_out != one.held_out
    counted = split_held_out(ds, 3, seed=0)
    assert sum(n.startswith("b/") for n in counted.held_out) == 3
    # adding a class leaves the split of the others as it was
    make_classes(tmp_path / "more", {"c": 5})
    (data / "c").symlink_to(tmp_path / "more" / "c")
    wider = split_held_out(build_image_dataset(data, "train", 16), 0.2, seed=0)
    assert [n for n in wider.held_out if not n.startswith("c/")] == one.held_out


def test_split_stage_records_lists_links_and_refuses_another_split(tmp_path):
    data = make_classes(tmp_path / "imgs", {"cats": 6, "dogs": 5})
    demo = folder_demo(tmp_path, data, held_out=2)
    demo.stage_split()
    held = (demo.split_dir / "held-out.txt").read_text().split()
    train = (demo.split_dir / "train.txt").read_text().split()
    assert len(held) == 4 and len(train) == 7
    record = json.loads((demo.split_dir / "split.json").read_text())
    assert record["per_class"] == [{"class": "cats", "train": 4, "held_out": 2},
                                   {"class": "dogs", "train": 3, "held_out": 2}]
    assert record["seed"] == 0 and record["layout"] == "classes"
    links = demo_folder.training_folder(demo.split_dir, demo.dataset())
    assert sorted(p.relative_to(links).as_posix() for p in links.rglob("*.png")) == sorted(train)
    assert build_image_dataset(links, "train", 16).class_names == ["cats", "dogs"]
    demo.stage_split()  # the same split again: nothing changes
    assert (demo.split_dir / "held-out.txt").read_text().split() == held
    other = folder_demo(tmp_path, data, held_out=1)
    with pytest.raises(LatentDiTError, match="records another split"):
        other.stage_split()
    assert (demo.split_dir / "held-out.txt").read_text().split() == held  # nothing lost


def test_class_and_flat_folders_train_and_sample_differently(tmp_path):
    classes = folder_demo(tmp_path, make_classes(tmp_path / "c", {"a": 4, "b": 4}), held_out=1)
    flat = folder_demo(tmp_path, make_flat(tmp_path / "flat", 6), held_out=1, cfg_scales=(1.0,), grid_cfg_scale=1.0)
    assert not classes.flat and flat.flat
    assert "model.class_dropout_prob=0" in flat.train_overrides()
    assert "model.class_dropout_prob=0" not in classes.train_overrides()
    assert classes.config_file.name == flat.config_file.name == "clipart.yaml"
    assert flat.stages()[0] == "split" and "split" not in Demo(DemoSettings(out=tmp_path / "f")).stages()
    seen = []
    monkey = lambda name, cmd: seen.append(cmd)  # noqa: E731
    for demo in (classes, flat):
        demo._run = monkey
        demo.checkpoint = lambda: tmp_path / "ema.safetensors"
        demo.stage_grid()
    assert "--labels" not in seen[0] and seen[1][seen[1].index("--labels") + 1] == "0,0,0,0"
    classes.stage_samples()  # FID samples of a class folder take the training part's class proportions
    assert seen[2][seen[2].index("--labels") + 1] == "training"
    assert "--labels" not in Demo(DemoSettings(out=tmp_path / "fm")).train_overrides()
    flat.stage_split()
    assert demo_folder.training_folder(flat.split_dir, flat.dataset()).name == "flat"  # the class name
    guided = folder_demo(tmp_path, tmp_path / "flat", held_out=1, cfg_scales=(1.0, 3.0), grid_cfg_scale=1.0,
                         train_overrides=["train.global_batch_size=2"])
    with pytest.raises(LatentDiTError, match="flat folder .* --cfg-scales 1"):
        guided.check(["samples"])


def test_extract_and_fid_stages_use_the_split_and_score_both_floors(tmp_path):
    demo = folder_demo(tmp_path, make_classes(tmp_path / "imgs", {"a": 4, "b": 4}), held_out=1,
                       cfg_scales=(1.0, 1.5), detector=tmp_path / "inception.pt")
    seen = []
    demo._run = lambda name, cmd: seen.append((name, cmd))
    demo.stage_extract()
    demo.stage_fid()
    (_, extract), *fids = seen
    assert extract[extract.index("--data") + 1] == str(demo.split_dir / "imgs")
    assert "--limit" not in extract and extract[extract.index("--latent-norm") + 1] == "per-channel"
    assert [name for name, _ in fids] == ["fid cfg 1", "fid cfg 1.5", "fid floor real training images",
                                         "fid floor VAE reconstructions"]
    assert all(cmd[2] == str(demo.reference_npz) and cmd[-1] == str(tmp_path / "inception.pt") for _, cmd in fids)
    assert fids[3][1][3] == str(demo.out / "floors" / "reconstructions" / "samples.npz")


def test_bad_folders_end_in_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    make_classes(tmp_path / "small", {"big": 5, "tiny": 1})
    flat = make_flat(tmp_path / "flat", 3)
    out = ["--out", str(tmp_path / "out")]
    for args, message in [(["--data", str(tmp_path / "empty")], "no images"),
                          (["--data", str(tmp_path / "small")], "class 'tiny' .* has 1 image")]:
        proc = subprocess.run([sys.executable, str(TOOL), *out, *args], capture_output=True, text=True, cwd=REPO_ROOT)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert re.search(message, proc.stderr), (message, proc.stderr)
    for args, message in [(["--data", str(tmp_path / "nowhere")], "not a folder"),
                          (["--data", str(flat), "--held-out", "1"], "fewer than train.global_batch_size=64"),
                          (["--data", str(flat), "--held-out", "ten"], "--held-out"),
                          (["--data", str(flat), "--cfg-scales", "1", "2", "train.global_batch_size=2"], "flat folder"),
                          (["--data", str(flat), "--out", str(flat / "demo")], "must not contain one another")]:
        with pytest.raises(LatentDiTError, match=message):
            demo_tool.main([*out, *args])
    assert not (tmp_path / "out").exists() and not (flat / "demo").exists()  # refused before the first stage


def test_image_modes_truncated_files_bombs_and_large_images(tmp_path, monkeypatch):
    """The held-out reference goes through the one reader: grey, palette, 16-bit, CMYK and alpha images
    become RGB; truncated and over-limit files are skipped and counted; a large image is just resized."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rgb = _image(0)
    rgb.convert("L").save(root / "a" / "grey.png")
    rgb.convert("P").save(root / "a" / "palette.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(root / "a" / "sixteen.png")
    rgb.convert("CMYK").save(root / "a" / "cmyk.jpg")
    rgb.convert("RGBA").save(root / "a" / "alpha.png")
    _image(1, size=(3000, 2000)).save(root / "a" / "large.png")
    _image(2, size=(1000, 1000)).save(root / "a" / "bomb.png")
    good = root / "a" / "truncated.png"
    rgb.save(good)
    good.write_bytes(good.read_bytes()[:60])
    split_dir = tmp_path / "split"
    names = sorted(p.relative_to(root).as_posix() for p in (root / "a").iterdir())
    (split_dir).mkdir()
    (split_dir / "held-out.txt").write_text("\n".join(names) + "\n")
    # Pillow refuses images over twice MAX_IMAGE_PIXELS: lower it so that bomb.png (10^6 pixels) is one
    # and large.png (6 * 10^6) is not, by reading them with different limits
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)
    ref = tmp_path / "reference" / "test.npz"
    skipped_names = {"bomb.png", "large.png", "truncated.png"}
    record = demo_folder.write_reference(root, split_dir, ref, 16)
    assert {Path(s["path"]).name for s in record["skipped"]} == skipped_names
    assert any("decompression-bomb" in s["reason"] for s in record["skipped"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)  # large.png (6 M < 8 M) is read, bomb.png too
    record = demo_folder.write_reference(root, split_dir, ref, 16)
    assert [Path(s["path"]).name for s in record["skipped"]] == ["truncated.png"]
    images = np.load(ref)["arr_0"]
    assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8
    saved = json.loads((ref.parent / "skipped.json").read_text())
    assert saved["num_files"] == 8 and saved["num_images"] == 7


def test_report_rows_show_missing_figures_as_dashes():
    demo_report = sys.modules["demo_report"]
    row = demo_report._metrics_row("floor: x", {"fid": 12.5, "kid_mean": 0.002, "kid_std": 0.0005,
                                                "precision": None, "recall": None})
    assert row == "| floor: x | 12.50 | 2.00 ± 0.50 | — | — |"
    assert demo_report._metrics_row("1", {"fid": 3.0}) == "| 1 | 3.00 | — | — | — |"
