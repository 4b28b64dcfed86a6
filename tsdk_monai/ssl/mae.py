"""Masked image modelling (MAE-style) pre-training of a student: reconstruct masked 16x16 patches of the input.

What we implement, and how it departs from MAE (He et al., 2022):

- A random ``mask_ratio`` (default 75%) of the non-overlapping ``patch_size`` x ``patch_size`` patches of each
  image is masked (exactly ``round(mask_ratio * L)`` of the ``L`` patches, drawn per image as MAE does: argsort
  of uniform noise). Masked pixels are filled with 0 or with the image's mean over its *visible* pixels (so the
  fill value carries nothing of the hidden content).
- The whole student (encoder *and* decoder) maps the masked image to a reconstruction at the input size. The
  reconstruction network is the student class itself built with ``num_classes = in_channels`` output channels
  (:func:`build_reconstruction_student`): every layer but the final 1x1 output layer has the segmentation
  student's name and shape, so the decoder is pre-trained too and only that last layer keeps its fresh
  initialisation when the weights move to the segmentation student (:func:`~tsdk_monai.ssl.transfer_weights`).
  We chose this over a separate head on the last decoder features because such a head would add a layer the
  segmentation student does not have, while the student's own output layer already *is* a 1x1 head on those
  features.
- For ``vit_tiny`` this is SimMIM-style masked image modelling (Xie et al., 2022) through the whole ViT +
  UNETR-style decoder: masked patches enter the ViT as patches of fill value rather than being dropped from the
  token sequence as in MAE. Dropping tokens would only save compute; it would not fit the convolutional
  ``unet_small`` nor the UNETR skip from the input image. For ``unet_small`` the convolutions see the fill value.
- The loss is the mean squared error over the masked pixels only (MAE's loss on masked patches: all patches
  have the same size, so it equals the mean over masked patches of the per-patch MSE). With
  ``norm_pix_loss=True`` each target patch is normalised by its own mean and standard deviation (MAE's
  per-patch normalised targets); off by default because flat background patches of ultrasound images would
  then ask the network to reconstruct amplified noise.

Shapes: images ``(B, C, H, W)``, ``H`` and ``W`` multiples of ``patch_size``; mask ``(B, 1, H, W)`` with 1 on
masked pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsdk_monai.ssl.method import MethodState

__all__ = [
    "random_patch_mask",
    "PatchMasker",
    "MaskedReconstructionLoss",
    "MaskedAutoencoder",
    "build_reconstruction_student",
]


def random_patch_mask(
    batch: int, height: int, width: int, patch_size: int = 16, mask_ratio: float = 0.75,
    device: torch.device | str | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random patch mask ``(B, 1, H, W)`` (float, 1 = masked) with exactly ``round(mask_ratio * L)`` of the
    ``L = (H / p) * (W / p)`` patches masked in every image.

    Raises:
        ValueError: ``H`` or ``W`` is not a multiple of ``patch_size``, or ``mask_ratio`` is outside ``[0, 1)``.
    """
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {(height, width)} is not a multiple of the patch size {patch_size}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    gh, gw = height // patch_size, width // patch_size
    n_patches = gh * gw
    n_masked = int(round(float(mask_ratio) * n_patches))
    noise = torch.rand(batch, n_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # the rank of each patch's noise: the n_masked lowest are masked
    patch_mask = (ranks < n_masked).float().view(batch, 1, gh, gw)
    return F.interpolate(patch_mask, scale_factor=patch_size, mode="nearest")


class PatchMasker(nn.Module):
    """Masks a random ``mask_ratio`` of the ``patch_size`` patches of each image.

    Args:
        patch_size: side of the square patches (16, the students' stride).
        mask_ratio: fraction of patches masked per image, in ``[0, 1)``.
        fill: ``"zero"`` (masked pixels set to 0) or ``"mean"`` (set to the image's mean over its visible pixels,
            per channel).

    ``forward(x (B, C, H, W))`` -> ``(masked x (B, C, H, W), mask (B, 1, H, W))``, mask 1 on masked pixels.
    """

    FILLS = ("zero", "mean")

    def __init__(self, patch_size: int = 16, mask_ratio: float = 0.75, fill: str = "mean") -> None:
        super().__init__()
        if fill not in self.FILLS:
            raise ValueError(f"fill must be one of {', '.join(self.FILLS)}, got {fill!r}")
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.patch_size, self.mask_ratio, self.fill = int(patch_size), float(mask_ratio), fill

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = random_patch_mask(x.shape[0], x.shape[-2], x.shape[-1], self.patch_size, self.mask_ratio, x.device)
        mask = mask.to(x.dtype)
        visible = 1.0 - mask
        if self.fill == "zero":
            value = torch.zeros_like(x[..., :1, :1])
        else:
            value = (x * visible).sum((-2, -1), keepdim=True) / visible.sum((-2, -1), keepdim=True).clamp_min(1.0)
        return x * visible + value * mask, mask


class MaskedReconstructionLoss(nn.Module):
    """Mean squared error between reconstruction and image over the masked pixels only.

    Args:
        patch_size: patch side (needed for ``norm_pix_loss``).
        norm_pix_loss: normalise each target patch by its own mean and standard deviation (MAE).
        eps: added to the patch variance before the square root.

    ``forward(pred (B, C, H, W), target (B, C, H, W), mask (B, 1, H, W))`` -> scalar; pixels with mask 0 do not
    contribute (nor get a gradient). Raises ``ValueError`` when nothing is masked.
    """

    def __init__(self, patch_size: int = 16, norm_pix_loss: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size, self.norm_pix_loss, self.eps = int(patch_size), bool(norm_pix_loss), float(eps)

    def normalise_patches(self, target: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the same, each ``patch_size`` patch (per channel) scaled to zero mean, unit variance."""
        b, c, h, w = target.shape
        p = self.patch_size
        t = target.reshape(b, c, h // p, p, w // p, p)
        mean = t.mean(dim=(3, 5), keepdim=True)
        var = t.var(dim=(3, 5), keepdim=True, unbiased=False)
        return ((t - mean) / (var + self.eps).sqrt()).reshape(b, c, h, w)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"reconstruction {tuple(pred.shape)} and image {tuple(target.shape)} differ in shape")
        if self.norm_pix_loss:
            target = self.normalise_patches(target)
        mask = mask.to(pred.dtype)
        n = mask.sum() * pred.shape[1]
        if n.item() == 0:
            raise ValueError("the mask hides no pixel: nothing to reconstruct (mask_ratio too small)")
        return (((pred - target) ** 2) * mask).sum() / n


def build_reconstruction_student(name: str, in_channels: int = 1, img_size: int | Sequence[int] = 256,
                                 **kwargs) -> nn.Module:
    """The student ``name`` with ``in_channels`` output channels (a reconstruction of its input).

    ``build_student`` insists on ``num_classes >= 2`` (segmentation); this builds the same class with
    ``num_classes = in_channels``, so every layer except the output layer matches the segmentation student.
    """
    from tsdk_monai.networks.students import STUDENTS, student_names

    if name not in STUDENTS:
        raise ValueError(f"unknown student '{name}'; choose one of {', '.join(student_names())}")
    return STUDENTS[name](in_channels=int(in_channels), num_classes=int(in_channels), img_size=img_size, **kwargs)


class MaskedAutoencoder(MethodState, nn.Module):
    """Masked image modelling with a student as encoder-decoder (see the module docstring).

    Args:
        network: a student mapping ``(B, C, H, W)`` to ``(B, C, H, W)`` (e.g. :func:`build_reconstruction_student`).
        patch_size, mask_ratio, fill: the :class:`PatchMasker`.
        norm_pix_loss: per-patch normalised targets (:class:`MaskedReconstructionLoss`).

    ``forward(x (B, C, H, W))`` -> ``{"loss": scalar, "pred": reconstruction (B, C, H, W), "mask": (B, 1, H, W),
    "masked_image": (B, C, H, W)}``; the loss is computed inside ``forward`` so that the whole objective can be
    wrapped in ``DistributedDataParallel``. ``num_views`` = 1: the trainer gives one (augmented) view.
    """

    method = "mae"
    num_views = 1

    def __init__(self, network: nn.Module, patch_size: int = 16, mask_ratio: float = 0.75, fill: str = "mean",
                 norm_pix_loss: bool = False) -> None:
        super().__init__()
        self.network = network
        self.masker = PatchMasker(patch_size, mask_ratio, fill)
        self.criterion = MaskedReconstructionLoss(patch_size, norm_pix_loss)

    @property
    def student(self) -> nn.Module:
        """The student whose weights initialise the segmentation student."""
        return self.network

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        masked, mask = self.masker(x, mask)
        pred = self.network(masked)
        loss = self.criterion(pred, x, mask)
        return {"loss": loss, "pred": pred, "mask": mask, "masked_image": masked}
