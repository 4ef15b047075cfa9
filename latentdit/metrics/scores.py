"""Distances between two sets of features: Fréchet (FID), kernel (KID), precision/recall.

All three take plain arrays, so they are testable without the Inception network:

* :func:`frechet_distance` — ``‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)`` in float64 with
  ``scipy.linalg.sqrtm`` (the formula behind published FIDs).
* :func:`kid` — unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x·y/d + 1)³``, averaged
  over random subsets of at most half the smaller set (Bińkowski et al. 2018); its standard deviation
  over the subsets comes with it.
* :func:`precision_recall` — k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

from latentdit.errors import LatentDiTError

# sqrtm of a product of PSD matrices is real in exact arithmetic; a larger imaginary part on the
# diagonal (the only part that enters the trace) means the result cannot be trusted.
IMAG_TOLERANCE = 1e-3
# Eigenvalues of sigma1 + sigma2 below this fraction of the largest count as zero (float64 eigh noise is
# ~D·1e-16 relative); only used to find the subspace a rank-deficient pair of covariances lives in.
SUPPORT_TOLERANCE = 1e-10


class KIDResult(NamedTuple):
    mean: float
    std: float
    num_subsets: int
    subset_size: int


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_features(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2:
        raise LatentDiTError(f"{what}: expected a feature matrix [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise LatentDiTError(f"{what}: need at least 2 samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise LatentDiTError(f"{what}: features contain NaN or infinity")
    return x.astype(np.float64, copy=False)


def _check_same_dim(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise LatentDiTError(f"{what}: the two feature sets have different dimensions ({a.shape[1]} vs {b.shape[1]})")


def joint_support(sigma1: np.ndarray, sigma2: np.ndarray, rel_tol: float = SUPPORT_TOLERANCE) -> np.ndarray | None:
    """Orthonormal basis [D, r] of the joint range of two PSD matrices, or None when it is all of R^D."""
    w, v = np.linalg.eigh(sigma1 + sigma2)
    keep = w > max(float(w[-1]), 0.0) * rel_tol
    return None if keep.all() else v[:, keep]


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[complex | float, np.ndarray]:
    basis = joint_support(sigma1, sigma2)
    if basis is not None:  # same trace on the r-dim subspace both covariances live in, (D/r)^3 cheaper
        sigma1, sigma2 = basis.T @ sigma1 @ basis, basis.T @ sigma2 @ basis
    with warnings.catch_warnings():
        # A singular product is expected for rank-deficient inputs; the result is checked by the caller.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return np.trace(covmean), covmean


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    If ``sqrtm(sigma1 @ sigma2)`` is not finite (a near-singular product), ``eps·I`` is added to both
    covariances and the square root retried, with a warning. A negligible imaginary part
    (max |imag| on the diagonal < 1e-3) is dropped; a larger one raises :class:`LatentDiTError`.

    When both covariances live in an r-dimensional subspace (r < D: fewer samples than dimensions),
    ``tr sqrtm(Σ₁Σ₂)`` is computed on that subspace (it is the same number, since the dropped
    directions add zero eigenvalues): a 4-image FID then needs a 6×6 sqrtm instead of a 2048×2048 one.
    Full-rank covariances (published 50k-sample FIDs) take the plain 2048×2048 path.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise LatentDiTError(f"frechet_distance: mu vectors must be 1-D and of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise LatentDiTError(f"frechet_distance: {name} must be {d}×{d} to match mu, got {s.shape}")
    for name, v in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(v).all():
            raise LatentDiTError(f"frechet_distance: {name} contains NaN or infinity")

    diff = mu1 - mu2
    tr_covmean, covmean = _trace_sqrt_product(sigma1, sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: sqrtm(sigma1 @ sigma2) is not finite (near-singular covariances); "
            f"adding {eps:g}·I to both covariances and retrying", RuntimeWarning, stacklevel=2,
        )
        offset = np.eye(d) * eps
        tr_covmean, covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
        if not np.isfinite(covmean).all():
            raise LatentDiTError(
                f"frechet_distance: sqrtm(sigma1 @ sigma2) is not finite even with {eps:g}·I added; "
                "the covariances are degenerate (too few samples, or constant features?)"
            )
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > IMAG_TOLERANCE:
            raise LatentDiTError(
                f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary component of {max_imag:.3g} on its "
                f"diagonal (tolerance {IMAG_TOLERANCE:g}); the covariances are numerically unusable"
            )
        tr_covmean = tr_covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * float(tr_covmean))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid_subset_size(requested: int, num_a: int, num_b: int) -> int:
    """The KID subset size used for sets of ``num_a`` and ``num_b`` rows: see :func:`kid`."""
    return min(requested, max(2, min(num_a, num_b) // 2))


def kid(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor, *, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> KIDResult:
    """Kernel Inception Distance: unbiased MMD² (cubic polynomial kernel), mean and std over subsets.

    Each subset draws ``m`` rows from each set without replacement, with a NumPy generator seeded by
    ``seed``, where ``m = min(subset_size, max(2, n // 2))`` and ``n`` is the size of the smaller set.
    Subsets of at most half a set differ from each other, so the std (the spread of a single subset's
    estimate) says how much the number moves with the sample; subsets as large as the sets would all be
    the same sets and give a std of 0 whatever the data. Drawing half of a set shrinks the variance of a
    subset's estimate by about the finite-population correction ½ and doubling the sample size would halve
    it too, so at ``m = n / 2`` the std is close to the standard error of the whole-set value when the
    sets differ (when they do not, it overstates it). The mean stays an unbiased estimate of MMD²:
    every pair of rows is equally likely to be drawn, so the mean's expectation over the subset draws is
    exactly the full-set unbiased estimate. With 50k-image sets the standard protocol (100 subsets of
    1000) is unchanged.
    """
    a = _as_features(features_a, "kid: features_a")
    b = _as_features(features_b, "kid: features_b")
    _check_same_dim(a, b, "kid")
    if num_subsets < 1:
        raise LatentDiTError(f"kid: num_subsets must be ≥ 1, got {num_subsets}")
    if subset_size < 2:
        raise LatentDiTError(f"kid: subset_size must be ≥ 2, got {subset_size}")
    m = kid_subset_size(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx = _poly_kernel(x, x)
        k_yy = _poly_kernel(y, y)
        k_xy = _poly_kernel(x, y)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2.0 * k_xy.sum() / (m * m)
    return KIDResult(float(values.mean()), float(values.std()), num_subsets, m)


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = torch.empty(x.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[start:start + batch_size], x)
        # The smallest distance is the point itself (0), so the k-th neighbour is the (k+1)-th value.
        radii[start:start + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    inside = 0
    for start in range(0, points.shape[0], batch_size):
        d = torch.cdist(points[start:start + batch_size], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     batch_size: int = 1000) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ``k`` nearest neighbours.

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour within the same set. Precision: fraction of ``fake`` inside the real
    manifold; recall: fraction of ``real`` inside the fake manifold. Distances are computed in float64
    with ``torch.cdist`` over ``batch_size`` rows at a time, so memory stays ``batch_size × N``.
    """
    r = _as_features(real, "precision_recall: real")
    f = _as_features(fake, "precision_recall: fake")
    _check_same_dim(r, f, "precision_recall")
    if k < 1:
        raise LatentDiTError(f"precision_recall: k must be ≥ 1, got {k}")
    if k >= min(r.shape[0], f.shape[0]):
        raise LatentDiTError(
            f"precision_recall: k = {k} needs more than {k} samples in each set; got {r.shape[0]} real and "
            f"{f.shape[0]} generated"
        )
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    real_radii = _knn_radii(rt, k, batch_size)
    fake_radii = _knn_radii(ft, k, batch_size)
    precision = _coverage(ft, rt, real_radii, batch_size)
    recall = _coverage(rt, ft, fake_radii, batch_size)
    return PrecisionRecall(precision, recall)


def mean_and_covariance(features: np.ndarray | torch.Tensor, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and (N−1)-normalised covariance of a feature matrix (at least 2 rows)."""
    x = _as_features(features, what)
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    return mu, np.atleast_2d(sigma)
