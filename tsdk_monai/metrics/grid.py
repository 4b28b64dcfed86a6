"""How a synthetic set is shown: the grid of the synthesis quality report (real images beside synthetic ones) and its
one-line summary."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["quality_grid", "quality_summary"]


def quality_grid(
    real: torch.Tensor, synthetic: torch.Tensor, nearest: torch.Tensor | None = None, columns: int = 8, rows: int = 2,
    pad: int = 2, transpose: bool = True,
) -> np.ndarray:
    """A uint8 greyscale grid: ``rows`` rows of real images, then synthetic ones, then (if given) each shown
    synthetic image's nearest real image, separated by white bands.

    Args:
        real, synthetic, nearest: ``(N, 1, H, W)`` in ``[0, 1]`` (``nearest[i]`` belongs to ``synthetic[i]``).
        transpose: images are in MONAI's PNG orientation ``(W, H)``: transpose them for display.

    Returns:
        ``(height, width)`` uint8 array.
    """
    n = columns * rows
    sections = [real[:n], synthetic[:n]] + ([nearest[:n]] if nearest is not None else [])
    h, w = real.shape[-2:]
    if transpose:
        h, w = w, h
    cell_h, cell_w = h + pad, w + pad
    band = 3 * pad
    grid = np.full((len(sections) * rows * cell_h + (len(sections) - 1) * band + pad, columns * cell_w + pad), 255, np.uint8)
    for s, imgs in enumerate(sections):
        top = s * (rows * cell_h + band)
        for k in range(min(n, len(imgs))):
            im = imgs[k, 0].float().clamp(0, 1).cpu().numpy()
            im = im.T if transpose else im
            r, c = divmod(k, columns)
            y, x = top + pad + r * cell_h, pad + c * cell_w
            grid[y : y + h, x : x + w] = np.round(im * 255).astype(np.uint8)
    return grid


def quality_summary(report: dict[str, Any]) -> str:
    """One line on a synthetic set from its ``quality.json`` (:func:`~tsdk_monai.metrics.quality_report` plus the
    bundle's fields): how many images at which size, the Fréchet distance beside the noise baseline's, the
    near-copies."""
    mem = report.get("memorisation") or {}
    noise = (report.get("noise_baseline") or {}).get("frechet_distance")
    return (f"{report['num_synthetic']} synthetic images at {report['image_size']} px; Fréchet distance to "
            f"{report.get('num_real_fid', report.get('num_real'))} real images in the "
            f"{report.get('feature_extractor', 'feature')} space {report['frechet_distance']:.3f}"
            + (f" (Gaussian noise: {noise:.3f})" if noise is not None else " (no noise baseline measured)")
            + (f"; near-copies of a real image (pixel correlation ≥ {mem['copy_threshold']}): {mem['num_copies']}"
               if "num_copies" in mem else ""))
