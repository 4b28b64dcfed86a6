"""Metrics MONAI lacks: HD95 that counts misses, the quality report of a synthetic transfer set (Fréchet distance,
memorisation)."""

from tsdk_monai.metrics.distance import MissAwareHausdorffDistanceMetric
from tsdk_monai.metrics.grid import quality_grid
from tsdk_monai.metrics.quality import (
    SyntheticQualityReport,
    frechet_distance,
    load_images,
    nearest_neighbours,
    pooled_features,
    quality_report,
)

__all__ = [
    "MissAwareHausdorffDistanceMetric", "SyntheticQualityReport", "frechet_distance", "load_images", "nearest_neighbours", "pooled_features",
    "quality_grid", "quality_report",
]
