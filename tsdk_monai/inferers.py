"""Inferers MONAI lacks: inference at the network's training size (2D images and, slice by slice, 3D volumes), the
student's logits and features in one call (distillation), and autocast on any device type (mixed precision)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SliceInferer
from monai.utils import convert_to_dst_type

from tsdk_monai.engines.amp import autocast
from tsdk_monai.transforms.geometry import letterbox_box, letterbox_pad
from tsdk_monai.utils import unwrap

__all__ = ["ResizeSliceInferer", "FeatureInferer", "AutocastInferer", "plain"]


def plain(x: torch.Tensor) -> tuple[torch.Tensor, MetaTensor | None]:
    """``x`` as a plain tensor for a network, and (for a ``MetaTensor``) an empty one holding its metadata, to put back
    on the output with ``convert_to_dst_type`` (MONAI's ``sliding_window_inference`` does the same): every operation
    of a network on a ``MetaTensor`` goes through its ``__torch_function__``, which made a 128-px bfloat16 forward at
    batch 1 ~19% slower for the student and ~10% slower for the LiteMedSAM teacher (same kernels, same outputs)."""
    if not isinstance(x, MetaTensor):
        return x, None
    return x.as_tensor(), MetaTensor([]).copy_meta_from(x, copy_attr=False)


class ResizeSliceInferer(Inferer):
    """Run a 2D network at ``image_size`` and return logits at the input's own size.

    A 2D batch ``(B, C, H, W)`` is resized to ``image_size`` (bilinear), segmented, and its logits resized back to
    ``(H, W)``; a 3D batch ``(B, C, H, W, D)`` is segmented slice by slice along ``spatial_dim`` with MONAI's
    ``SliceInferer`` (each slice resized the same way), so the output keeps the volume's geometry and needs no
    inverse transform. Students and teachers stay plain networks; this is the one place that resizes at inference.

    With ``keep_aspect`` the image is letterboxed as :class:`tsdk_monai.transforms.SquareResized` letterboxes it in
    training (longer side to ``image_size``, zero padding split evenly), and the logits are cropped back to the image
    before the resize to ``(H, W)``: metrics and masks are at the image's own resolution either way.

    Args:
        image_size: the size the network was trained at, an int or ``(H, W)`` (square with ``keep_aspect``).
        spatial_dim: for 3D input, the axis to slice along (0, 1 or 2 of the spatial axes; 2 = axial in RAS NIfTI).
        sw_batch_size: slices per network call for 3D input.
        keep_aspect: letterbox instead of squashing (the geometry the network was trained with).
        antialias: antialiased downsampling of the input (as the training resize had ``anti_aliasing``).
    """

    def __init__(self, image_size: int | Sequence[int] = 256, spatial_dim: int = 2, sw_batch_size: int = 8,
                 keep_aspect: bool = False, antialias: bool = False) -> None:
        super().__init__()
        self.image_size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if keep_aspect and self.image_size[0] != self.image_size[1]:
            raise ValueError(f"keep_aspect letterboxes into a square; got image_size {self.image_size}")
        self.spatial_dim = spatial_dim
        self.sw_batch_size = sw_batch_size
        self.keep_aspect, self.antialias = bool(keep_aspect), bool(antialias)

    def _resize(self, x: torch.Tensor, size: tuple[int, ...], antialias: bool = False) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=antialias)

    def _resized(self, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            x, meta = plain(x)
            size = tuple(x.shape[-2:])
            if not self.keep_aspect:
                out = self._resize(network(self._resize(x, self.image_size, self.antialias), *args, **kwargs), size)
            else:
                side = self.image_size[0]
                box = h, w, top, left = letterbox_box(size[0], size[1], side)
                out = network(letterbox_pad(self._resize(x, (h, w), self.antialias), box, side), *args, **kwargs)
                out = self._resize(out[..., top:top + h, left:left + w], size)
            return out if meta is None else convert_to_dst_type(out, meta)[0]

        return run

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        run = self._resized(network, *args, **kwargs)
        if inputs.ndim == 4:
            return run(inputs)
        if inputs.ndim == 5:
            slicer = SliceInferer(roi_size=(-1, -1), spatial_dim=self.spatial_dim, sw_batch_size=self.sw_batch_size)
            return slicer(inputs, run)
        raise ValueError(f"expected a 2D batch (B, C, H, W) or a 3D batch (B, C, H, W, D), got shape {tuple(inputs.shape)}")


class FeatureInferer(Inferer):
    """``network(x)`` -> ``{"logits": (B, C, H, W), "features": (B, Cf, h, w) or None}``: the student's side of a
    distillation step (what :mod:`tsdk_monai.losses` KD losses take).

    The features are the output of the network's ``features_module`` (the students' protocol), read by a forward
    hook, so the call goes through ``network.forward``: ``DistributedDataParallel`` needs that to synchronise
    gradients.

    Args:
        features: whether the loss needs the features (without, no hook and ``"features": None``).
    """

    def __init__(self, features: bool = True) -> None:
        super().__init__()
        self.features = bool(features)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> dict[str, torch.Tensor | None]:
        if not self.features:
            return {"logits": network(inputs, *args, **kwargs), "features": None}
        inner = unwrap(network)
        target = getattr(inner, "features_module", None)
        if not isinstance(target, nn.Module):
            raise TypeError(f"the student {type(inner).__name__} has no 'features_module' for feature distillation")
        store: dict[str, torch.Tensor] = {}
        handle = target.register_forward_hook(lambda _m, _i, out: store.__setitem__("f", out))
        try:
            logits = network(inputs, *args, **kwargs)
        finally:
            handle.remove()
        if "f" not in store:
            raise RuntimeError(f"{type(inner).__name__}.features_module was not called in forward")
        return {"logits": logits, "features": store["f"]}


class AutocastInferer(Inferer):
    """Run ``inferer`` under ``torch.autocast`` on the input's device type when ``enabled``: the one mixed-precision
    switch of the trainers whose step MONAI's ``amp`` does not cover on the CPU (MONAI autocasts on CUDA only), so
    ``amp=True`` with ``amp_dtype="bfloat16"`` also runs on the CPU (with AMX or AVX-512 BF16, several times faster than
    float32: ``bench/cpu_amp.py``). Floating outputs come back in float32 (a tensor, or the tensors of a dict, list or
    tuple), so a loss, a metric or an argmax downstream never sees the low-precision copy.

    Args:
        inferer: the inner inferer (default ``SimpleInferer``).
        enabled: the bundle's ``amp``.
        amp_kwargs: ``torch.autocast`` arguments, e.g. ``{"dtype": torch.bfloat16}`` (see
            :func:`tsdk_monai.engines.amp.autocast`).
    """

    def __init__(self, inferer: Inferer | None = None, enabled: bool = False,
                 amp_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.inferer = inferer or SimpleInferer()
        self.enabled, self.amp_kwargs = bool(enabled), dict(amp_kwargs or {})

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with autocast(inputs.device, self.enabled, self.amp_kwargs):
            out = self.inferer(inputs, network, *args, **kwargs)
        return _float32(out) if self.enabled else out


def _float32(out: Any) -> Any:
    """``out`` with its floating tensors (itself, or those of a dict, list or tuple) in float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, Mapping):
        return type(out)({k: _float32(v) for k, v in out.items()})
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(v) for v in out)
    return out
