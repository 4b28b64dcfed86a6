"""``CheckedLoadImaged``: MONAI's ``LoadImaged`` with errors that name the file, and checks of what it read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import LoadImaged

from tsdk_monai.utils import TSDKInputError

__all__ = ["CheckedLoadImaged"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _is_16bit_pil(path: str) -> bool:
    """A 16-bit grey PNG/TIFF (PIL mode ``I;16``): read from the header only."""
    if not path.lower().endswith((".png", ".tif", ".tiff")):
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode in _SIXTEEN_BIT_MODES
    except Exception:
        return False


class CheckedLoadImaged(LoadImaged):
    """``monai.transforms.LoadImaged`` (same arguments) whose every error names the file, then checks the images.

    Before reading: the file exists and is not empty. Reading errors of any reader (PIL, nibabel, ...) become one
    :class:`~tsdk_monai.utils.TSDKInputError` naming the file and the reason. After reading, for each key:

    - the image has pixels and no NaN or infinite value;
    - ``spatial_dims`` (an int or a list of allowed ints): the number of spatial dimensions, e.g. ``2`` for a 2D
      stage, so that a 3D volume given to it fails here, naming the file, not later inside a resize;
    - ``eight_bit=True``: a 16-bit grey PNG/TIFF is divided by 257 (65535 -> 255), as ``skimage.img_as_ubyte``, so
      that it has the intensity range of the 8-bit images every stage expects (stages that rescale each image to
      [0, 1] do not care; the diffusion stage's fixed 0..255 range does).

    It is a subclass of ``LoadImaged``, so tools that look for the loader of a bundle's preprocessing (MONAI Label)
    still find it.
    """

    def __init__(
        self, keys: Any, *args: Any, spatial_dims: int | Sequence[int] | None = None, eight_bit: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, *args, **kwargs)
        self.spatial_dims = None if spatial_dims is None else (
            (int(spatial_dims),) if isinstance(spatial_dims, int) else tuple(int(s) for s in spatial_dims)
        )
        self.eight_bit = eight_bit

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        sources = {}
        for key in self.key_iterator(d):
            src = d[key]
            if isinstance(src, (str, os.PathLike)):
                path = Path(src)
                if not path.is_file():
                    raise TSDKInputError(f"{path}: {key} file not found")
                if path.stat().st_size == 0:
                    raise TSDKInputError(f"{path}: {key} file is empty (0 bytes)")
                sources[key] = str(src)
        try:
            out = super().__call__(d, reader)
        except TSDKInputError:
            raise
        except Exception as exc:
            bad = self._first_unreadable(sources, reader)
            if bad is None:
                raise
            key, err = bad
            raise TSDKInputError(
                f"{sources[key]}: cannot read {key} ({type(err).__name__}: {err})"
            ) from exc
        for key in self.key_iterator(out):
            name = sources.get(key, str(key))
            img = out[key]
            arr = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
            if arr.numel() == 0:
                raise TSDKInputError(f"{name}: {key} has no pixels")
            if arr.is_floating_point() and not bool(torch.isfinite(arr).all()):
                raise TSDKInputError(f"{name}: {key} holds NaN or infinite values")
            if self.spatial_dims is not None:
                n = self._n_spatial(img)
                if n not in self.spatial_dims:
                    allowed = " or ".join(f"{s}D" for s in self.spatial_dims)
                    raise TSDKInputError(
                        f"{name}: {key} is {n}D (shape {tuple(img.shape)}); this stage expects {allowed} images"
                    )
            if self.eight_bit and key in sources and _is_16bit_pil(sources[key]):
                out[key] = img / 257.0
        return out

    def _n_spatial(self, img: Any) -> int:
        meta = getattr(img, "meta", None)
        if isinstance(meta, Mapping) and meta.get("spatial_shape") is not None:
            return len(np.atleast_1d(np.asarray(meta["spatial_shape"])))
        return img.ndim - 1 if self._loader.ensure_channel_first else img.ndim

    def _first_unreadable(self, sources: dict, reader: Any) -> tuple[Hashable, Exception] | None:
        for key, src in sources.items():
            try:
                self._loader(src, reader)
            except Exception as err:  # readers raise many types; the user needs the file and the reason
                return key, err
        return None
