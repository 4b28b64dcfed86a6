"""Self-supervised pre-training on MONAI's trainer shape, and the hand-over of its weights to the segmentation student.

The pre-training stage is a plain ``monai.engines.SupervisedTrainer`` (so every MONAI/ignite handler works):

- ``prepare_batch``: :class:`SSLPrepareBatch` makes ``num_views`` views of the batch's images ``(B, C, H, W)`` (the
  objective's attribute: 1 for MAE, 2 for MoCo v3), each by applying the random ``augment`` transform (a MONAI
  dictionary transform on ``{"image": (C, H, W)}``) to every sample independently;
- ``inferer``: MONAI's ``SimpleInferer``, i.e. ``network(view_1, ..., view_n)``: the objective computes its loss in
  ``forward`` (so that it can be wrapped whole in ``DistributedDataParallel``; MoCo v3's momentum update happens there
  too) and returns ``{"loss": ..., ...}``;
- ``loss_function``: :class:`ObjectiveLoss`, which takes that ``"loss"``.

:func:`build_ssl_model` builds the objective by method name (``"mae"``, ``"mocov3"``) around a student;
:func:`save_pretrained_student` writes the plain state dict of a segmentation student initialised from it, the
file the ``tsdk_student`` bundle takes as ``init_ckpt``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from monai.engines.utils import PrepareBatch
from monai.networks.utils import copy_model_state
from monai.utils import CommonKeys as Keys

from tsdk_monai.networks.students import build_student
from tsdk_monai.ssl.mae import MaskedAutoencoder, build_reconstruction_student
from tsdk_monai.ssl.method import SSL_METHODS
from tsdk_monai.ssl.mocov3 import MoCoV3
from tsdk_monai.utils import TSDKInputError, save_state_dict, unwrap

__all__ = ["SSLPrepareBatch", "ObjectiveLoss", "build_ssl_model", "save_pretrained_student"]

logger = logging.getLogger(__name__)


def build_ssl_model(
    method: str,
    student: str,
    img_size: int | Sequence[int] = 256,
    num_classes: int = 2,
    in_channels: int = 1,
    mae: Mapping[str, Any] | None = None,
    mocov3: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The pre-training objective ``method`` around a fresh student ``student`` (``vit_tiny`` or ``unet_small``).

    Args:
        method: ``"mae"`` (:class:`~tsdk_monai.ssl.MaskedAutoencoder` on a student with ``in_channels`` outputs)
            or ``"mocov3"`` (:class:`~tsdk_monai.ssl.MoCoV3` on ``build_student(student, num_classes=...)``).
        student: the student's name.
        img_size: the training image size (``vit_tiny``'s position embeddings are made for it).
        num_classes: the segmentation student's classes (MoCo v3 builds that student; MAE ignores it).
        in_channels: image channels.
        mae, mocov3: keyword arguments of the objective's class (the other method's dict is ignored).

    Raises:
        ValueError: an unknown method or student.
    """
    if method not in SSL_METHODS:
        raise ValueError(f"unknown pre-training method {method!r}; choose one of {', '.join(SSL_METHODS)}")
    if method == "mae":
        net = build_reconstruction_student(student, in_channels=in_channels, img_size=img_size)
        return MaskedAutoencoder(net, **dict(mae or {}))
    net = build_student(student, in_channels=in_channels, num_classes=num_classes, img_size=img_size)
    return MoCoV3(net, **dict(mocov3 or {}))


class SSLPrepareBatch(PrepareBatch):
    """MONAI prepare-batch of the pre-training trainer: ``num_views`` views of the batch's images.

    Args:
        num_views: views per image (the objective's ``num_views``).
        augment: optional random MONAI dictionary transform on ``{image_key: (C, H, W)}``, applied per sample and per
            view (the views of one image are independent draws); it must keep the spatial size. Without it the views
            are the images themselves.
        image_key: the batch key of the images.

    ``__call__(batchdata, device, non_blocking)`` -> ``(view_1, None, (view_2, ...), {})``, each ``(B, C, H, W)``, so
    MONAI's ``SimpleInferer`` calls ``network(view_1, view_2, ...)``.
    """

    def __init__(self, num_views: int = 1, augment: Callable | None = None, image_key: str = Keys.IMAGE) -> None:
        self.num_views, self.augment, self.image_key = int(num_views), augment, image_key

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``num_views`` views ``(B, C, H, W)`` of ``images``: independent draws of ``augment`` per sample and view."""
        if self.augment is None:
            return [images] * self.num_views
        views = []
        for _ in range(self.num_views):
            outs = [torch.as_tensor(self.augment({self.image_key: img})[self.image_key]) for img in images]
            view = torch.stack([o.as_subclass(torch.Tensor) for o in outs]).to(images.device, images.dtype)
            if view.shape != images.shape:
                raise ValueError(f"augment changed the batch shape from {tuple(images.shape)} to {tuple(view.shape)}; "
                                 "end it with a resize to the input size")
            views.append(view)
        return views

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, None, tuple, dict]:
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            raise ValueError(f"the pre-training trainer expects dict batches with '{self.image_key}'")
        images = torch.as_tensor(batchdata[self.image_key]).as_subclass(torch.Tensor)
        views = self.views(images.to(device, non_blocking=non_blocking).float())
        return views[0], None, tuple(views[1:]), {}


class ObjectiveLoss(nn.Module):
    """The loss of an objective that computes it in ``forward``: ``ObjectiveLoss()(output, _) = output["loss"]``."""

    def forward(self, output: Mapping[str, torch.Tensor], target: Any = None) -> torch.Tensor:
        return output["loss"]


def save_pretrained_student(ssl_model: nn.Module, student: nn.Module, path: str | os.PathLike,
                            save: bool = True) -> Path | None:
    """Initialise the segmentation ``student`` from the pre-trained ``ssl_model``'s student (MONAI's
    ``copy_model_state``: every entry whose name and shape match) and save its plain state dict atomically to
    ``path`` when ``save`` (the bundles pass ``@main_process``: one rank writes); returns the path written or ``None``.

    The file loads with ``torch.load(path, weights_only=True)`` into ``build_student(...)`` of the same name,
    ``num_classes`` and ``img_size`` (strict ``load_state_dict``: the ``tsdk_student`` bundle's ``init_ckpt``).
    Entries of another shape (the segmentation output layer after MAE, whose reconstruction has another number of
    channels) keep the student's initialisation.

    Raises:
        TSDKInputError: nothing matched (another student than the one pre-trained).
    """
    source = getattr(unwrap(ssl_model), "student", unwrap(ssl_model))
    _, copied, kept = copy_model_state(unwrap(student), unwrap(source).state_dict())
    if not copied:
        raise TSDKInputError(f"{path}: no weight of the pre-trained {type(source).__name__} fits the student "
                             f"{type(unwrap(student)).__name__}; pre-train and fine-tune the same student")
    if not save:
        return None
    out = save_state_dict(student, path)
    logger.info("saved the pre-trained student to %s (%d tensors pre-trained; fresh: %s)", out, len(copied),
                ", ".join(kept) or "none")
    return out
