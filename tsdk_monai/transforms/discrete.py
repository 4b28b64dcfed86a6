"""MONAI's ``AsDiscrete`` / ``AsDiscreted`` with a fast argmax.

torch's CPU ``argmax`` over the channels of a contiguous (C, H, W) tensor is ~30x slower than ``max(dim).indices``,
which gives the same index (the first maximum): 12 ms against 0.35 ms at 3 x 256 x 256 on 2 threads (torch 2.14.1),
paid on every validation and test image of every bundle.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import AsDiscrete, AsDiscreted
from monai.utils import convert_data_type, convert_to_dst_type, convert_to_tensor

__all__ = ["FastAsDiscrete", "FastAsDiscreted", "channel_argmax"]


def channel_argmax(values: torch.Tensor, dim: int = 0, keepdim: bool = True) -> torch.Tensor:
    """``torch.argmax(values, dim, keepdim)`` (the first maximum's index) as ``max(dim).indices``, ~30x faster on the
    CPU over the channels of a contiguous (C, *spatial) tensor."""
    return values.max(dim, keepdim=keepdim).indices


class FastAsDiscrete(AsDiscrete):
    """:class:`monai.transforms.AsDiscrete` whose ``argmax`` is ``max(dim).indices``; everything else is MONAI's."""

    def __call__(self, img: Any, argmax: bool | None = None, to_onehot: int | None = None,
                 threshold: float | None = None, rounding: str | None = None) -> Any:
        if self.argmax if argmax is None else argmax:
            img = convert_to_tensor(img, track_meta=get_track_meta())
            values, *_ = convert_data_type(img, torch.Tensor)
            values = values.as_tensor() if isinstance(values, MetaTensor) else values
            index = channel_argmax(values, self.kwargs.get("dim", 0), self.kwargs.get("keepdim", True))
            img, *_ = convert_to_dst_type(index, img, dtype=self.kwargs.get("dtype", torch.float))
        return super().__call__(img, False, to_onehot, threshold, rounding)


class FastAsDiscreted(AsDiscreted):
    """:class:`monai.transforms.AsDiscreted` with :class:`FastAsDiscrete`'s argmax (same arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fast = FastAsDiscrete()
        fast.kwargs = self.converter.kwargs
        self.converter = fast
