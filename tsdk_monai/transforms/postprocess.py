"""Post-processing chosen on the validation split: MONAI's ``KeepLargestConnectedComponentd`` when it helps."""

from __future__ import annotations

import os
from typing import Any, Hashable, Mapping, Sequence

from monai.transforms import KeepLargestConnectedComponentd, MapTransform

__all__ = ["ChosenPostprocessd", "read_postprocess_choice"]


def read_postprocess_choice(path: str | os.PathLike) -> bool:
    """Whether ``postprocess.json`` (written by :class:`~tsdk_monai.handlers.PostprocessChooser`) chose to keep the
    largest component; False when the file is absent (a model evaluated before the choice existed)."""
    from tsdk_monai.utils import read_json

    if not os.path.isfile(path):
        return False
    return bool(read_json(path, "not found", "not valid JSON")["keep_largest_component"])


class ChosenPostprocessd(MapTransform):
    """Keep each foreground class's largest connected component (MONAI's ``KeepLargestConnectedComponentd``, every
    class independently) when ``enabled``, else pass the data through.

    ``enabled`` is set by :class:`~tsdk_monai.handlers.PostprocessChooser` from the validation split before the test
    images are scored, or given (``inference.json`` of an exported bundle bakes the choice in).

    Args:
        keys: the prediction's key.
        num_classes: classes including background (components of labels / channels ``1..num_classes-1``).
        enabled: a bool, or the path of a ``postprocess.json`` to read the choice from.
        is_onehot: the prediction's layout (None: one-hot when it has more than one channel).
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, num_classes: int, enabled: bool | str = False,
                 is_onehot: bool | None = None) -> None:
        super().__init__(keys)
        self.enabled = enabled if isinstance(enabled, bool) else read_postprocess_choice(enabled)
        self.lcc = KeepLargestConnectedComponentd(keys, applied_labels=list(range(1, int(num_classes))),
                                                  is_onehot=is_onehot, independent=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        return self.lcc(data) if self.enabled else data
