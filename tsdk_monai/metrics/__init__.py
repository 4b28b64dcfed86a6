"""Metrics MONAI lacks: the quality report of a synthetic transfer set (Fréchet distance, memorisation)."""

from tsdk_monai.metrics.quality import (
    SyntheticQualityReport,
    frechet_distance,
    load_images,
    nearest_neighbours,
    pooled_features,
    quality_grid,
    quality_report,
)

__all__ = [
    "SyntheticQualityReport", "frechet_distance", "load_images", "nearest_neighbours", "pooled_features",
    "quality_grid", "quality_report",
]
