"""Sample-quality metrics: FID, KID and precision/recall on TF Inception-v3 pool3 features.

Entry points: :func:`compute_metrics` (two inputs → all numbers, set up by :class:`MetricSettings`),
:func:`load_source`, :func:`extract_features` / :func:`compute_stats` (uint8 images in memory),
:func:`save_stats` / :func:`load_stats`, and the array-level :func:`frechet_distance`, :func:`kid`,
:func:`precision_recall`.

Modules, bottom up: ``scores`` (the three distances on plain arrays), ``inception`` (the detector),
``stats`` (statistics and their files), ``sources`` (folders, ``.npz`` files, arrays), ``features``
(features of a source, cached), ``evaluate`` (two inputs → all numbers).
"""

from __future__ import annotations

from latentdit.metrics.evaluate import MetricSettings, compute_metrics, load_source
from latentdit.metrics.features import (FeatureExtractor, FeatureSettings, compute_stats, default_cache_dir,
                                        extract_features)
from latentdit.metrics.inception import (DETECTOR_SHA256, FEATURE_DIM, INSTALL_HINT, InceptionDetector,
                                         default_detector_path, tf_bilinear_resize, verify_detector)
from latentdit.metrics.scores import KIDResult, PrecisionRecall, frechet_distance, kid, precision_recall
from latentdit.metrics.sources import open_source
from latentdit.metrics.stats import FeatureStats, load_stats, save_stats

__all__ = [
    "DETECTOR_SHA256", "FEATURE_DIM", "INSTALL_HINT", "FeatureExtractor", "FeatureSettings", "FeatureStats",
    "InceptionDetector", "KIDResult", "MetricSettings", "PrecisionRecall", "compute_metrics", "compute_stats",
    "default_cache_dir", "default_detector_path", "extract_features", "frechet_distance", "kid", "load_source",
    "load_stats", "open_source", "precision_recall", "save_stats", "tf_bilinear_resize", "verify_detector",
]
