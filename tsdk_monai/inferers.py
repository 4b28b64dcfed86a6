"""Inference at the network's training size, for 2D images and, slice by slice, for 3D volumes."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SliceInferer

__all__ = ["ResizeSliceInferer"]


class ResizeSliceInferer(Inferer):
    """Run a 2D network at ``image_size`` and return logits at the input's own size.

    A 2D batch ``(B, C, H, W)`` is resized to ``image_size`` (bilinear), segmented, and its logits resized back to
    ``(H, W)``; a 3D batch ``(B, C, H, W, D)`` is segmented slice by slice along ``spatial_dim`` with MONAI's
    ``SliceInferer`` (each slice resized the same way), so the output keeps the volume's geometry and needs no
    inverse transform. Students and teachers stay plain networks; this is the one place that resizes at inference.

    Args:
        image_size: the size the network was trained at, an int or ``(H, W)``.
        spatial_dim: for 3D input, the axis to slice along (0, 1 or 2 of the spatial axes; 2 = axial in RAS NIfTI).
        sw_batch_size: slices per network call for 3D input.
    """

    def __init__(self, image_size: int | Sequence[int] = 256, spatial_dim: int = 2, sw_batch_size: int = 8) -> None:
        super().__init__()
        self.image_size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        self.spatial_dim = spatial_dim
        self.sw_batch_size = sw_batch_size

    def _resized(self, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            size = tuple(x.shape[-2:])
            x_in = x if size == self.image_size else F.interpolate(x, self.image_size, mode="bilinear", align_corners=False)
            out = network(x_in, *args, **kwargs)
            return out if size == self.image_size else F.interpolate(out, size, mode="bilinear", align_corners=False)

        return run

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        run = self._resized(network, *args, **kwargs)
        if inputs.ndim == 4:
            return run(inputs)
        if inputs.ndim == 5:
            slicer = SliceInferer(roi_size=(-1, -1), spatial_dim=self.spatial_dim, sw_batch_size=self.sw_batch_size)
            return slicer(inputs, run)
        raise ValueError(f"expected a 2D batch (B, C, H, W) or a 3D batch (B, C, H, W, D), got shape {tuple(inputs.shape)}")
