"""One call from two inputs to FID, KID and precision/recall (what ``tools/fid.py`` and the demo use)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from latentdit.errors import LatentDiTError
from latentdit.metrics.features import FeatureExtractor, FeatureSettings, source_stats
from latentdit.metrics.scores import frechet_distance, kid as kid_score, precision_recall
from latentdit.metrics.sources import Source, open_source
from latentdit.metrics.stats import FeatureStats

SourceLike = str | os.PathLike | np.ndarray | torch.Tensor | FeatureStats


@dataclasses.dataclass(frozen=True)
class MetricSettings(FeatureSettings):
    """What :func:`compute_metrics` reports and how; the feature settings are inherited.

    ``kid_subset_size`` is an upper bound: KID draws subsets of at most half the smaller set (see
    :func:`latentdit.metrics.scores.kid`), so its spread always means something. ``seed`` seeds the
    KID subsets; ``pr_k`` is the number of nearest neighbours of precision/recall.
    """

    kid: bool = True
    pr: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kid_subsets < 1:
            raise LatentDiTError(f"kid_subsets must be ≥ 1, got {self.kid_subsets}")
        if self.kid_subset_size < 2:
            raise LatentDiTError(f"kid_subset_size must be ≥ 2, got {self.kid_subset_size}")
        if self.pr_k < 1:
            raise LatentDiTError(f"pr_k must be ≥ 1, got {self.pr_k}")


def _why_no_features(name: str, source: Source) -> str:
    return f"{name} ({source.label}) has statistics (mu, sigma) only"


def compute_metrics(source_a: SourceLike, source_b: SourceLike,
                    settings: MetricSettings | None = None) -> dict[str, Any]:
    """FID (and KID, precision/recall) between a reference set ``source_a`` and an evaluated set ``source_b``.

    Each source is an image folder, an ``.npz`` (``arr_0`` images or ``mu``/``sigma`` statistics), a
    uint8 array/tensor, or :class:`FeatureStats`. FID is symmetric; precision is the fraction of B
    inside A's manifold, recall the fraction of A inside B's. KID and precision/recall need features of
    both sets; when one side is statistics only they are reported as None with a line in ``notes``.

    Returns ``dict(fid, kid_mean, kid_std, kid_subsets, kid_subset_size, precision, recall, pr_k,
    num_a, num_b, source_a, source_b, notes)``.
    """
    s = settings if settings is not None else MetricSettings()
    extractor = FeatureExtractor(s)
    src_a, src_b = open_source(source_a), open_source(source_b)  # both validated before any long work
    notes: list[str] = []
    want_features = s.kid or s.pr
    if want_features and not (src_a.can_give_features and src_b.can_give_features):
        lacking = [_why_no_features(n, src) for n, src in (("A", src_a), ("B", src_b)) if not src.can_give_features]
        notes.append("KID and precision/recall need features of both sets, but " + "; ".join(lacking)
                     + " — reporting FID only")
        want_features = False
    stats_a = source_stats(src_a, extractor, want_features)
    stats_b = source_stats(src_b, extractor, want_features)
    if stats_a.dim != stats_b.dim:
        raise LatentDiTError(
            f"the two inputs have statistics of different dimensions: A ({src_a.description}) {stats_a.dim}, "
            f"B ({src_b.description}) {stats_b.dim}"
        )

    counts = [n for n in (stats_a.num_samples, stats_b.num_samples) if n is not None]
    if counts and min(counts) <= stats_a.dim:
        notes.append(f"FID from {min(counts)} samples with {stats_a.dim}-d features (rank-deficient covariance) is "
                     "strongly biased upwards and not comparable with published FIDs (50k samples); prefer KID at small N")
    result: dict[str, Any] = {
        "fid": frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma),
        "kid_mean": None, "kid_std": None, "kid_subsets": None, "kid_subset_size": None,
        "precision": None, "recall": None, "pr_k": None,
        "num_a": stats_a.num_samples, "num_b": stats_b.num_samples,
        "source_a": src_a.description, "source_b": src_b.description,
        "notes": notes,
    }
    if want_features and s.kid:
        k = kid_score(stats_a.features, stats_b.features, num_subsets=s.kid_subsets, subset_size=s.kid_subset_size,
                      seed=s.seed)
        result.update(kid_mean=k.mean, kid_std=k.std, kid_subsets=k.num_subsets, kid_subset_size=k.subset_size)
    if want_features and s.pr:
        smallest = min(stats_a.features.shape[0], stats_b.features.shape[0])
        if s.pr_k < smallest:
            p = precision_recall(stats_a.features, stats_b.features, k=s.pr_k)
            result.update(precision=p.precision, recall=p.recall, pr_k=s.pr_k)
        else:
            notes.append(f"precision/recall with k = {s.pr_k} needs more than {s.pr_k} samples in each set "
                         f"(smallest set: {smallest}) — not reported")
    return result


def load_source(source: SourceLike, settings: FeatureSettings | None = None, *,
                need_features: bool = True) -> FeatureStats:
    """:class:`FeatureStats` of any source :func:`compute_metrics` accepts: features and statistics, or the
    stored statistics of a stats file (with features too when it has them or its images and ``need_features``)."""
    return source_stats(open_source(source), FeatureExtractor(settings), need_features)
