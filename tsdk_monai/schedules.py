"""The learning-rate schedule of the training bundles: MONAI's warm-up + cosine, resumable under a new schedule."""

from __future__ import annotations

from typing import Any

from monai.optimizers import WarmupCosineSchedule

__all__ = ["WarmupCosine"]


class WarmupCosine(WarmupCosineSchedule):
    """:class:`monai.optimizers.WarmupCosineSchedule` whose resume takes only the step count from the checkpoint.

    A torch scheduler's ``state_dict`` holds its settings too (``t_total``, ``warmup_steps``, ``cycles``,
    ``base_lrs``): resumed with more epochs, MONAI's schedule would keep the old ``t_total`` and its cosine would
    climb back to the full learning rate past the old end. Here the bundle's configuration (epochs, learning rate,
    warm-up) wins and the checkpoint says only how far training got.
    """

    _SETTINGS = ("warmup_steps", "t_total", "cycles", "end_lr", "warmup_multiplier", "base_lrs")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keep = {k: getattr(self, k) for k in self._SETTINGS}
        super().load_state_dict(state_dict)
        self.__dict__.update(keep)
