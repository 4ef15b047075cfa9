"""Sample-quality metrics: FID, KID and precision/recall on TF Inception-v3 pool3 features.

Entry points: :func:`compute_metrics` (two inputs → all numbers), :func:`load_source`,
:func:`extract_features` / :func:`compute_stats` (uint8 images in memory), :func:`save_stats` /
:func:`load_stats`, and the array-level :func:`frechet_distance`, :func:`kid`, :func:`precision_recall`.
"""

from __future__ import annotations

from latentdit.metrics.evaluate import compute_metrics, load_source
from latentdit.metrics.features import (FeatureExtractor, FeatureStats, compute_stats, default_cache_dir,
                                        extract_features, load_stats, open_source, save_stats)
from latentdit.metrics.inception import (DETECTOR_SHA256, FEATURE_DIM, INSTALL_HINT, InceptionDetector,
                                         default_detector_path, tf_bilinear_resize, verify_detector)
from latentdit.metrics.scores import KIDResult, PrecisionRecall, frechet_distance, kid, precision_recall

__all__ = [
    "DETECTOR_SHA256", "FEATURE_DIM", "INSTALL_HINT", "FeatureExtractor", "FeatureStats", "InceptionDetector",
    "KIDResult", "PrecisionRecall", "compute_metrics", "compute_stats", "default_cache_dir",
    "default_detector_path", "extract_features", "frechet_distance", "kid", "load_source", "load_stats",
    "open_source", "precision_recall", "save_stats", "tf_bilinear_resize", "verify_detector",
]
