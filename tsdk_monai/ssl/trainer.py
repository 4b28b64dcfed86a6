"""Self-supervised pre-training on MONAI/ignite engines, and the hand-over of its weights to the segmentation student.

:class:`SSLTrainer` is a ``monai.engines.Trainer`` with its own iteration, so every MONAI/ignite handler
(``StatsHandler``, ``TensorBoardStatsHandler``, ``CheckpointSaver``/``CheckpointLoader``, ``ProgressBar``, ...)
works unchanged. One iteration:

1. take the images ``(B, C, H, W)`` (intensities in ``[0, 1]``) of the batch;
2. make ``num_views`` views of them (the objective's attribute: 1 for MAE, 2 for MoCo v3), each by applying the
   random ``augment`` transform (a MONAI dictionary transform on ``{"image": (C, H, W)}``) to every sample
   independently; without ``augment`` the views are the images themselves;
3. ``loss = network(*views)["loss"]`` (the objective computes its loss in ``forward`` so that it can be wrapped
   whole in ``DistributedDataParallel``), backward, optimiser step;
4. ``network.after_step()`` when the objective has it (MoCo v3's momentum-encoder EMA), on every rank.

:func:`build_ssl_model` builds the objective by method name (``"mae"``, ``"mocov3"``) around a student;
:func:`save_pretrained_student` writes the plain state dict of a segmentation student initialised from it, the
file the ``tsdk_student`` bundle takes as ``init_ckpt``.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.utils import CommonKeys as Keys
from torch.utils.data import DataLoader

from tsdk_monai.engines.amp import AmpTrainer, autocast, backward_and_step
from tsdk_monai.engines.distill import unwrap_module as _unwrap
from tsdk_monai.utils import TSDKInputError, atomic_write_bytes

__all__ = [
    "SSL_METHODS",
    "SSLTrainer",
    "build_ssl_model",
    "transfer_weights",
    "save_pretrained_student",
    "check_method_state",
    "method_state",
]

logger = logging.getLogger(__name__)

SSL_METHODS = ("mae", "mocov3")


def method_state(method: str) -> torch.Tensor:
    """The objectives' ``_extra_state``: the method's name as a ``uint8`` tensor (a tensor, so that the state dict
    stays all tensors for code that compares or copies it)."""
    return torch.tensor(list(method.encode("ascii")), dtype=torch.uint8)


def check_method_state(state: Any, method: str) -> None:
    """Refuse a checkpoint of another pre-training method (called by the objectives' ``set_extra_state``, i.e. when a
    resume checkpoint is loaded), before the key mismatch would make a less readable error."""
    found = bytes(state.tolist()).decode("ascii", "replace") if isinstance(state, torch.Tensor) else None
    if found is not None and found != method:
        raise TSDKInputError(
            f"the resume checkpoint was written by {found} pre-training, this run is {method}: give each method its "
            "own ckpt_dir (or delete the ssl/ checkpoints there)"
        )


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
    from tsdk_monai.networks.students import build_student
    from tsdk_monai.ssl.mae import MaskedAutoencoder, build_reconstruction_student
    from tsdk_monai.ssl.mocov3 import MoCoV3

    if method not in SSL_METHODS:
        raise ValueError(f"unknown pre-training method {method!r}; choose one of {', '.join(SSL_METHODS)}")
    if method == "mae":
        net = build_reconstruction_student(student, in_channels=in_channels, img_size=img_size)
        return MaskedAutoencoder(net, **dict(mae or {}))
    net = build_student(student, in_channels=in_channels, num_classes=num_classes, img_size=img_size)
    return MoCoV3(net, **dict(mocov3 or {}))


def transfer_weights(source: nn.Module, target: nn.Module) -> tuple[list[str], list[str]]:
    """Copy every state-dict entry of ``source`` whose name and shape match one of ``target`` into ``target``.

    Returns ``(copied, kept)``: the names copied and the names of ``target`` that keep their own values (e.g. the
    segmentation output layer after MAE, whose reconstruction output has another number of channels).
    """
    src = _unwrap(source).state_dict()
    own = _unwrap(target).state_dict()
    copied = [k for k, v in own.items() if k in src and tuple(src[k].shape) == tuple(v.shape)]
    with torch.no_grad():
        _unwrap(target).load_state_dict({**own, **{k: src[k].detach().to(own[k].device) for k in copied}})
    return copied, [k for k in own if k not in set(copied)]


def save_pretrained_student(ssl_model: nn.Module, student: nn.Module, path: str | os.PathLike) -> Path | None:
    """Initialise the segmentation ``student`` from the pre-trained ``ssl_model``'s student
    (:func:`transfer_weights`) and save its plain state dict atomically to ``path``.

    Only rank 0 writes under ``torch.distributed``; returns the path written (``None`` elsewhere). The file loads
    with ``torch.load(path, weights_only=True)`` into ``build_student(...)`` of the same name, ``num_classes`` and
    ``img_size`` (strict ``load_state_dict``: the ``tsdk_student`` bundle's ``init_ckpt``).

    Raises:
        TSDKInputError: nothing matched (another student than the one pre-trained).
    """
    import torch.distributed as dist

    inner = _unwrap(ssl_model)
    source = getattr(inner, "student", inner)
    copied, kept = transfer_weights(source, student)
    if not copied:
        raise TSDKInputError(f"{path}: no weight of the pre-trained {type(source).__name__} fits the student "
                             f"{type(_unwrap(student)).__name__}; pre-train and fine-tune the same student")
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    state = {k: v.detach().cpu() for k, v in _unwrap(student).state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    out = atomic_write_bytes(path, buf.getvalue())
    logger.info("saved the pre-trained student to %s (%d tensors pre-trained; fresh: %s)", out, len(copied),
                ", ".join(kept) or "none")
    return out


class SSLTrainer(AmpTrainer):
    """Self-supervised pre-training of ``network`` (an objective from :func:`build_ssl_model`) as a MONAI ``Trainer``.

    Args:
        device: device of the objective and the batches.
        max_epochs: epochs to run.
        train_data_loader: batches of dicts with ``image_key`` ``(B, C, H, W)`` in ``[0, 1]``.
        network: the objective (``forward(*views) -> {"loss": scalar, ...}``, attribute ``num_views``, optional
            ``after_step()``); may be wrapped in ``DistributedDataParallel``.
        optimizer: the optimiser of its trainable parameters.
        augment: optional random MONAI dictionary transform on ``{image_key: (C, H, W)}``, applied per sample and
            per view (the views of one image are independent draws); it must keep the spatial size.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        non_blocking: non-blocking host-to-device copies.
        image_key: the batch key of the images.
        train_handlers, key_train_metric, additional_metrics, metric_cmp_fn, postprocessing, amp, event_names,
        event_to_attr, decollate, optim_set_to_none, amp_kwargs: as in ``monai.engines.SupervisedTrainer``.

    ``engine.state.output``: ``image`` (the un-augmented batch), ``loss``, and for MAE ``pred`` (reconstruction)
    and ``mask``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        augment: Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        image_key: str = Keys.IMAGE,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = False,
        amp_kwargs: dict | None = None,
    ) -> None:
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=train_data_loader, epoch_length=epoch_length,
            non_blocking=non_blocking, postprocessing=postprocessing, key_metric=key_train_metric,
            additional_metrics=additional_metrics, metric_cmp_fn=metric_cmp_fn, handlers=train_handlers, amp=amp,
            event_names=event_names, event_to_attr=event_to_attr, decollate=decollate, amp_kwargs=amp_kwargs,
        )
        self.network = network
        self.optimizer = optimizer
        self.augment = augment
        self.image_key = image_key
        self.optim_set_to_none = optim_set_to_none
        self.num_views = int(getattr(_unwrap(network), "num_views", 1))

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
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

    def _iteration(self, engine: "SSLTrainer", batchdata: dict[str, Any]) -> dict:
        """One pre-training step; returns ``{"image", "loss", ...}``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if not isinstance(batchdata, Mapping) or engine.image_key not in batchdata:
            raise ValueError(f"the pre-training trainer expects dict batches with '{engine.image_key}'")
        images = torch.as_tensor(batchdata[engine.image_key]).as_subclass(torch.Tensor)
        images = images.to(engine.state.device, non_blocking=engine.non_blocking).float()
        views = engine.make_views(images)
        engine.state.output = {Keys.IMAGE: images}

        def _compute_loss():
            out = engine.network(*views)
            engine.state.output.update({k: out[k] for k in ("pred", "mask") if k in out})
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = out["loss"]
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast(engine.state.device, engine.amp, engine.amp_kwargs):
            _compute_loss()
        backward_and_step(engine)  # scaled loss for float16 on CUDA
        after_step = getattr(_unwrap(engine.network), "after_step", None)
        if callable(after_step):
            after_step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
