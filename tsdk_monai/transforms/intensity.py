"""Image transforms MONAI lacks: grey conversion of RGB(A) inputs and a label check that names the file."""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from tsdk_monai.utils import TSDKInputError

__all__ = ["EnsureGrey", "EnsureGreyd", "CheckLabeld", "source_name"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" conversion


def source_name(img: Any, default: str = "<array>") -> str:
    """The file an image came from (MONAI's ``filename_or_obj`` metadata), for error messages."""
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return default


class EnsureGrey(Transform):
    """Channel-first image (C, *spatial) -> one channel (1, *spatial).

    1 channel: unchanged; 2 channels (grey + alpha): the first; 3 (RGB) or 4 (RGBA) channels: luminance
    0.299 R + 0.587 G + 0.114 B (alpha dropped). MONAI metadata is kept.

    Raises:
        TSDKInputError: another channel count (naming the source file).
    """

    backend = ["torch", "numpy"]

    def __call__(self, img: Any) -> Any:
        c = img.shape[0]
        if c == 1:
            return img
        if c == 2:
            return img[:1]
        if c in (3, 4):
            if isinstance(img, torch.Tensor):
                w = torch.tensor(_LUMA, dtype=torch.float32, device=img.device).view(3, *([1] * (img.ndim - 1)))
                return (img[:3].float() * w).sum(0, keepdim=True)
            w = np.asarray(_LUMA, dtype=np.float32).reshape(3, *([1] * (img.ndim - 1)))
            return (np.asarray(img[:3], dtype=np.float32) * w).sum(0, keepdims=True)
        raise TSDKInputError(f"{source_name(img)}: image has {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")


class EnsureGreyd(MapTransform):
    """Dictionary version of :class:`EnsureGrey`."""

    backend = EnsureGrey.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureGrey()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class CheckLabeld(MapTransform):
    """Check a label map (1, *spatial): integer class indices in ``[0, num_classes)``, same size as ``image_key``.

    Raises:
        TSDKInputError: naming the label file, for a value out of range, fractional values, several channels or a
            size that differs from the image's.
    """

    def __init__(
        self, keys: KeysCollection, num_classes: int | None = None, image_key: str | None = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from tsdk_monai.data.io import check_label_values

        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            name = source_name(lab, str(key))
            arr = lab.detach().cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
            check_label_values(arr, name, self.num_classes)
            if self.image_key is not None and self.image_key in d:
                img = d[self.image_key]
                if tuple(img.shape[1:]) != tuple(arr.shape[1:]):
                    raise TSDKInputError(
                        f"{name}: label size {tuple(arr.shape[1:])} does not match the image "
                        f"{source_name(img)} size {tuple(img.shape[1:])}"
                    )
        return d
