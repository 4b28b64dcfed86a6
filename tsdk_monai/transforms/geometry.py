"""One geometry for every bundle: an image to the network's square size, either squashed (the default) or letterboxed
(aspect kept: the longer side resized to the size, the shorter one padded with zeros on both sides).

The transform (:class:`SquareResized`, training) and the inferer (:class:`tsdk_monai.inferers.ResizeSliceInferer`,
evaluation and deployment, which undoes it) share :func:`letterbox_box`, so the two can never disagree on where the
image lies inside the padded square.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

from monai.config import KeysCollection
from monai.transforms import MapTransform, Resized, SpatialPadd

__all__ = ["SquareResized", "letterbox_box", "letterbox_pad"]


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """``(h, w, top, left)``: where an image of ``height`` x ``width`` lies, letterboxed, inside a ``size`` square.

    The same rounding as MONAI's ``Resized(size_mode="longest")`` and the same split of the padding as
    ``SpatialPadd(method="symmetric")`` (the smaller half before), which :class:`SquareResized` uses.
    """
    scale = size / max(height, width)
    h, w = (int(round(s * scale)) for s in (height, width))
    return h, w, (size - h) // 2, (size - w) // 2


def letterbox_pad(x: Any, box: tuple[int, int, int, int], size: int) -> Any:
    """``x`` ``(..., h, w)``, already resized to ``box``'s ``(h, w)``, zero-padded to ``size`` x ``size`` where
    :func:`letterbox_box` puts it (a tensor-level twin of ``SpatialPadd(method="symmetric")``)."""
    import torch.nn.functional as F

    h, w, top, left = box
    return F.pad(x, (left, size - w - left, top, size - h - top))


class SquareResized(MapTransform):
    """Resize ``keys`` to ``size`` x ``size``: squashed, or with ``keep_aspect`` letterboxed (MONAI's ``Resized``
    with ``size_mode="longest"``, then ``SpatialPadd`` with zeros, the padding split evenly).

    Letterboxing keeps shapes (a head's ellipse, a lesion's margin) undistorted on non-square images at the cost of
    the padded rows; on a square image both are the same resize. Labels take ``mode="nearest"`` and pad with 0
    (background).

    Args:
        keys: the items to resize.
        size: the square's side.
        keep_aspect: letterbox instead of squashing.
        mode, anti_aliasing: as MONAI's ``Resized`` (one value or one per key).
    """

    def __init__(self, keys: KeysCollection, size: int, keep_aspect: bool = False,
                 mode: str | Sequence[str] = "bilinear", anti_aliasing: bool | Sequence[bool] = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size, self.keep_aspect = int(size), bool(keep_aspect)
        common = dict(keys=keys, mode=mode, anti_aliasing=anti_aliasing, allow_missing_keys=allow_missing_keys)
        if self.keep_aspect:
            self.resize = Resized(spatial_size=self.size, size_mode="longest", **common)
            self.pad = SpatialPadd(keys, (self.size, self.size), method="symmetric", mode="constant",
                                   allow_missing_keys=allow_missing_keys)
        else:
            self.resize, self.pad = Resized(spatial_size=(self.size, self.size), **common), None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = self.resize(data)
        return d if self.pad is None else self.pad(d)
