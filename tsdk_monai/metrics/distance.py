"""HD95 that counts a missed or invented structure instead of dropping it."""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.metrics import HausdorffDistanceMetric

__all__ = ["MissAwareHausdorffDistanceMetric"]


class MissAwareHausdorffDistanceMetric(HausdorffDistanceMetric):
    """MONAI's :class:`~monai.metrics.HausdorffDistanceMetric` where a class that is in the label but not in the
    prediction (a miss), or predicted but absent from the label (an invention), scores the image diagonal in pixels
    (the largest distance the image allows) instead of infinity.

    MONAI returns ``inf`` for both, so one missed structure makes the whole test mean infinite (the report could only
    say n/a), and dropping those cases would reward a method for predicting nothing on its hardest images. The
    diagonal is a finite, bounded penalty that keeps them in the mean. A class absent from both stays NaN (nothing to
    measure, left out of the mean).
    ``empty_predictions`` and ``invented`` count the (image, class) pairs of each kind since the last ``reset()``,
    for the evaluation's ``metrics.json``.

    Args and shapes as for :class:`~monai.metrics.HausdorffDistanceMetric`: ``y_pred`` and ``y`` one-hot,
    ``(B, C, *spatial)``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.empty_predictions = 0
        self.invented = 0

    def reset(self) -> None:
        super().reset()
        self.empty_predictions = 0
        self.invented = 0

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        d = super()._compute_tensor(y_pred, y, **kwargs)
        first = 0 if self.include_background else 1
        has_pred = y_pred[:, first:].flatten(2).any(-1)
        has_label = y[:, first:].flatten(2).any(-1)
        missed, invented = has_label & ~has_pred, has_pred & ~has_label
        self.empty_predictions += int(missed.sum())
        self.invented += int(invented.sum())
        diagonal = math.sqrt(sum(float(s) ** 2 for s in y.shape[2:]))
        return torch.where((missed | invented).to(d.device), torch.full_like(d, diagonal), d)
