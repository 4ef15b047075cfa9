"""tools/fid.py: end to end on tiny inputs, statistics files, and its exit status on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latentdit.cli import run_main
from latentdit.errors import LatentDiTError
from latentdit.metrics import FeatureStats, MetricSettings, frechet_distance, load_stats, save_stats
from metrics_fakes import random_images, use_fake_detector, write_folder
from script_helpers import load_tool

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fid.py"
fid_tool = load_tool("fid")


def _run(argv, capsys):
    """Run the tool in-process like the real entry point; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(fid_tool.main, argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_two_stats_files_fid_only_with_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = FeatureStats.from_features(rng.standard_normal((40, 6)), "a")
    b = FeatureStats.from_features(rng.standard_normal((40, 6)) + 0.5, "b")
    save_stats(a, tmp_path / "a.npz")
    save_stats(b, tmp_path / "b.npz")
    code, out, _ = _run([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json", str(tmp_path / "r.json"),
                         "--no-cache"], capsys)
    assert code == 0
    expected = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert f"FID        {expected:.4f}" in out
    assert not any(line.startswith("KID") for line in out.splitlines())
    assert "note: KID and precision/recall need features of both sets" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["fid"] == pytest.approx(expected, rel=1e-12)
    assert result["num_a"] == result["num_b"] == 40 and result["kid_mean"] is None


def test_folders_end_to_end_with_save_stats_and_cache(tmp_path, capsys, monkeypatch):
    fake = use_fake_detector(monkeypatch)
    ref = write_folder(tmp_path / "ref", random_images(8, seed=1))
    gen = write_folder(tmp_path / "gen", random_images(8, seed=2, shift=30))
    cache = tmp_path / "cache"
    argv = [str(ref), str(gen), "--no-pr", "--kid-subsets", "5", "--cache-dir", str(cache), "--quiet",
            "--save-stats", str(tmp_path / "ref_stats.npz"), "--save-features", "--json", str(tmp_path / "r.json")]
    code, out, _ = _run(argv, capsys)
    assert code == 0 and fake.calls == 16  # A's features computed once, reused for the comparison
    assert "FID" in out and "KID" in out and "precision" not in out
    r = json.loads((tmp_path / "r.json").read_text())
    saved = load_stats(tmp_path / "ref_stats.npz")
    assert saved.num_samples == 8 and saved.features.shape == (8, 4)
    # The same comparison from the saved statistics (with features): same numbers, no network run.
    code, out, _ = _run([str(tmp_path / "ref_stats.npz"), str(gen), "--no-pr", "--kid-subsets", "5",
                         "--cache-dir", str(cache), "--quiet", "--json", str(tmp_path / "r2.json")], capsys)
    assert code == 0 and fake.calls == 16
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["fid"] == pytest.approx(r["fid"], rel=1e-7)
    assert r2["kid_mean"] == pytest.approx(r["kid_mean"], rel=1e-7, abs=1e-12)


def test_save_stats_alone(tmp_path, capsys, monkeypatch):
    use_fake_detector(monkeypatch)
    ref = write_folder(tmp_path / "ref", random_images(5, seed=3))
    code, out, _ = _run([str(ref), "--save-stats", str(tmp_path / "s.npz"), "--no-cache", "--quiet"], capsys)
    assert code == 0 and "wrote statistics of" in out
    stats = load_stats(tmp_path / "s.npz")
    assert stats.features is None and stats.num_samples == 5 and stats.mu.shape == (4,)


def _rgba_and_white_folders(root: Path, n: int = 8, size: int = 32) -> tuple[Path, Path, Path]:
    """The same drawings three ways: RGBA with random colours stored under transparent pixels, composited on
    white, and with the alpha channel simply dropped."""
    from PIL import Image

    rng = np.random.default_rng(11)
    folders = [root / "rgba", root / "white", root / "alpha-dropped"]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(n):
        rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rng.random((size, size)) < 0.5, 0, rng.integers(1, 256, (size, size)))
        image = Image.fromarray(rgba, "RGBA")
        image.save(folders[0] / f"{i:03d}.png")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        white.save(folders[1] / f"{i:03d}.png")
        image.convert("RGB").save(folders[2] / f"{i:03d}.png")
    return tuple(folders)


def test_rgba_folder_scores_like_the_same_images_on_white(tmp_path, capsys, monkeypatch):
    """The metrics read image files as extraction and VAE training do (alpha composited on white)."""
    use_fake_detector(monkeypatch)
    rgba, white, dropped = _rgba_and_white_folders(tmp_path)
    code, _, _ = _run([str(rgba), str(white), "--no-cache", "--quiet", "--no-pr", "--kid-subsets", "3",
                       "--json", str(tmp_path / "same.json")], capsys)
    assert code == 0
    assert json.loads((tmp_path / "same.json").read_text())["fid"] == pytest.approx(0.0, abs=1e-6)
    code, _, _ = _run([str(rgba), str(dropped), "--no-cache", "--quiet", "--no-kid", "--no-pr",
                       "--json", str(tmp_path / "dropped.json")], capsys)
    assert code == 0 and json.loads((tmp_path / "dropped.json").read_text())["fid"] > 1e-3


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing_folder", "{tmp}"], "no such file or folder: {tmp}/missing_folder"),
    (["{tmp}/bad.npz", "{tmp}/bad.npz"], "has neither 'arr_0'"),
    (["{tmp}/bad.npz"], "give two inputs A B to compare, or one input with --save-stats PATH"),
    (["{tmp}/empty", "{tmp}/bad.npz"], "no images found in folder"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    (tmp_path / "empty").mkdir()
    code, _, err = _run([a.format(tmp=tmp_path) for a in argv] + ["--no-cache"], capsys)
    assert code == 2 and message.format(tmp=tmp_path) in err


def test_cache_folder_that_is_a_file_is_refused_before_any_feature(tmp_path, capsys, monkeypatch):
    fake = use_fake_detector(monkeypatch)
    ref = write_folder(tmp_path / "ref", random_images(4, seed=1))
    (tmp_path / "cache").write_text("a file where the cache folder belongs")
    code, _, err = _run([str(ref), str(ref), "--cache-dir", str(tmp_path / "cache" / "fid"), "--quiet"], capsys)
    assert code == 2 and f"{tmp_path / 'cache'} is a file, not a folder" in err and fake.calls == 0
    with pytest.raises(LatentDiTError, match="feature cache folder .* exists and is not a folder"):
        MetricSettings(cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["samples.npz", "samples.bin"])
def test_truncated_npz_is_called_damaged(tmp_path, capsys, name):
    np.savez(tmp_path / "whole.npz", arr_0=random_images(6, seed=4))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])  # e.g. a copy cut short
    code, _, err = _run([str(tmp_path / "whole.npz"), str(tmp_path / name), "--no-cache", "--quiet"], capsys)
    assert code == 2
    assert f"{tmp_path / name} is a damaged .npz file" in err and "truncated" in err
    assert "neither a folder nor" not in err and "Traceback" not in err


def test_script_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "nope"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


@pytest.mark.slow
def test_real_detector_end_to_end_on_two_tiny_folders(tmp_path):
    from latentdit.metrics import default_detector_path

    try:
        default_detector_path()
    except LatentDiTError as e:
        pytest.skip(str(e))
    ref = write_folder(tmp_path / "ref", random_images(4, size=32, seed=4))
    gen = write_folder(tmp_path / "gen", random_images(4, size=32, seed=5, shift=60))
    proc = subprocess.run([sys.executable, str(TOOL), str(ref), str(gen), "--no-pr", "--kid-subsets", "10",
                           "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--quiet",
                           "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["num_a"] == r["num_b"] == 4 and r["fid"] > 0 and r["kid_std"] >= 0
    assert "FID from 4 samples with 2048-d features" in proc.stdout
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


@pytest.mark.slow
def test_real_detector_rgba_folder_against_the_same_images_on_white(tmp_path):
    from latentdit.metrics import default_detector_path

    try:
        default_detector_path()
    except LatentDiTError as e:
        pytest.skip(str(e))
    rgba, white, dropped = _rgba_and_white_folders(tmp_path, n=4)
    results = {}
    for other in (white, dropped):
        proc = subprocess.run([sys.executable, str(TOOL), str(rgba), str(other), "--no-pr", "--no-kid",
                               "--device", "cpu", "--no-cache", "--quiet", "--json", str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        results[other.name] = json.loads((tmp_path / "r.json").read_text())["fid"]
    assert abs(results["white"]) < 1e-3 and results["alpha-dropped"] > 1.0
