"""Distillation on MONAI's trainer shape: a prepare-batch that yields the frozen teacher's targets.

The distillation stage is a plain ``monai.engines.SupervisedTrainer`` (so every MONAI handler works unchanged):

- ``prepare_batch``: :class:`DistillationPrepareBatch` takes the un-augmented images ``(B, 1, H, W)`` (intensities in
  ``[0, 1]``) of the batch, gets the teacher's targets for them (from a :class:`TeacherCache`, memory or disk, keyed by
  image file and size; or from the teacher in eval mode under ``torch.no_grad()``, one image per call when cached),
  then optionally augments image and targets together (a MONAI dictionary transform per sample) and returns
  ``(images, {"logits", "features"})``;
- ``inferer``: :class:`~tsdk_monai.inferers.FeatureInferer`, the student's ``{"logits", "features"}`` (the features
  read by a hook, so the call goes through ``DistributedDataParallel.forward``);
- ``loss_function``: a :mod:`tsdk_monai.losses` KD loss over the two dicts.

Teachers speak the students' protocol (:mod:`tsdk_monai.networks`): ``forward(x)`` -> logits,
``forward_features(x)`` -> features, ``forward_with_features(x)`` -> both; :func:`teacher_targets` calls the one the
loss needs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys as Keys

from tsdk_monai.engines.amp import autocast
from tsdk_monai.utils import TSDKInputError, read_checkpoint, save_state_dict, unwrap

__all__ = ["LOGITS", "FEATURES", "teacher_targets", "TeacherCache", "DistillationPrepareBatch", "cache_tag",
           "keep_confident", "logits_at"]

logger = logging.getLogger(__name__)

LOGITS, FEATURES = "logits", "features"


def logits_at(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``logits`` ``(B, C, h, w)`` at spatial ``size`` (bilinear, antialiased; as they are when already that size):
    a teacher's logits of its own copy of the images, brought to the student's size."""
    size = tuple(int(v) for v in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, x: torch.Tensor, logits: bool, features: bool) -> dict[str, torch.Tensor]:
    """The frozen ``teacher``'s targets for images ``x`` ``(B, 1, H, W)``: ``{"logits": (B, C, H, W)}`` and/or
    ``{"features": (B, Ct, h, w)}`` (float32), by ``forward``, ``forward_features`` or ``forward_with_features``.

    Raises:
        TSDKInputError: the teacher's logits are not at the input size.
    """
    if not (logits or features):
        raise ValueError("the loss needs neither teacher logits nor teacher features")
    if teacher.training:  # (re-entering eval mode makes TinyViT recompute its cached attention biases)
        teacher.eval()
    x = x.as_tensor() if isinstance(x, MetaTensor) else x  # the targets need no metadata (inferers.plain: faster)
    inner = unwrap(teacher)
    if logits and features:
        out = dict(zip((LOGITS, FEATURES), inner.forward_with_features(x)))
    elif features:
        out = {FEATURES: inner.forward_features(x)}
    else:
        out = {LOGITS: teacher(x)}
    if logits and out[LOGITS].shape[-2:] != x.shape[-2:]:
        raise TSDKInputError(f"the teacher's logits {tuple(out[LOGITS].shape)} are not at the input size "
                             f"{tuple(x.shape[-2:])}")
    return {k: v.float() for k, v in out.items()}


class TeacherCache:
    """Teacher targets of un-augmented images, computed once per image and kept in memory or on disk.

    Args:
        mode: ``"none"`` (always recompute), ``"memory"`` (a dict on the CPU) or ``"disk"`` (one ``.pt`` file per
            image in ``cache_dir``, read back with ``weights_only=True``).
        cache_dir: folder of the disk cache (created).
        tag: anything that identifies the teacher (e.g. its checkpoint path and size); part of every key, so a
            disk cache of another teacher is never reused.
        dtype: storage dtype (``float32`` keeps the targets those of a run without a cache; ``float16`` halves
            memory, and holds a bfloat16 teacher's outputs exactly). A run with a cache uses the stored copy from
            the first epoch on, so its targets do not depend on whether an earlier run filled the cache.

    Keys are ``(tag, image file, spatial size)``; ``get``/``put`` take and give dicts of ``(C, ...)`` tensors
    (one image), stored on the CPU.
    """

    MODES = ("none", "memory", "disk")

    def __init__(self, mode: str = "memory", cache_dir: str | os.PathLike | None = None, tag: str = "",
                 dtype: torch.dtype | str = torch.float32) -> None:
        if mode not in self.MODES:
            raise ValueError(f"teacher cache mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if mode == "disk":
            if not cache_dir:
                raise ValueError("a disk teacher cache needs cache_dir")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.mode, self.tag = mode, str(tag)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self._mem: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def key(self, image_id: str, size: Sequence[int]) -> str:
        raw = f"{self.tag}|{image_id}|{'x'.join(str(int(s)) for s in size)}"
        return hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()  # file names need not be UTF-8

    def _file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.pt"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        hit = None
        if self.mode == "memory":
            hit = self._mem.get(key)
        elif self.mode == "disk" and self._file(key).is_file():
            try:
                hit = read_checkpoint(self._file(key), "teacher cache")
            except TSDKInputError as exc:  # a damaged cache file is recomputed, not fatal
                logger.warning("%s; recomputing", exc)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: str, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``targets`` in the cache's dtype; returns what was stored (what ``get`` will give back)."""
        item = {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in targets.items()}
        if self.mode == "memory":
            self._mem[key] = item
        elif self.mode == "disk":
            save_state_dict(item, self._file(key))
        return item

    def __len__(self) -> int:
        if self.mode == "disk" and self.cache_dir is not None:
            return len(list(self.cache_dir.glob("*.pt")))
        return len(self._mem)


def _image_ids(batchdata: Mapping, image_key: str) -> list[str] | None:
    """One identifier per image of the batch: its ``filename_or_obj`` meta (MONAI's ``LoadImaged``)."""
    meta = getattr(batchdata[image_key], "meta", None)
    if isinstance(meta, Mapping) and "filename_or_obj" in meta:
        names = meta["filename_or_obj"]
        return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]
    return None


class DistillationPrepareBatch(PrepareBatch):
    """MONAI prepare-batch of the distillation trainer: ``(images, teacher targets)`` for the KD loss.

    Args:
        teacher: the frozen teacher (eval mode, no gradients; see :func:`teacher_targets`), on the trainer's device.
        logits, features: which targets the loss needs (the loss's ``needs_logits`` / ``needs_features``).
        cache: a :class:`TeacherCache` (``None``: no cache); images are identified by their ``filename_or_obj``.
        augment: optional MONAI dictionary transform applied per sample to ``{"image": (1, H, W), "logits": (C, H, W),
            "features": (Ct, h, w)}`` once the targets are known (spatial transforms must act on all present keys
            alike), so the cached targets stay those of the un-augmented image.
        amp, amp_kwargs: the teacher's inference under autocast on the device's type (as the student's forward in
            :class:`~tsdk_monai.inferers.AutocastInferer`).
        image_key: the batch key of the images.
        teacher_key: the batch key of the teacher's own copy of the images (e.g. loaded at the size the teacher was
            trained at, when the student runs smaller); ``None`` or absent from the batch: the teacher reads
            ``image_key``. Its logits are resized (bilinear, antialiased) to the student images' size.

    ``__call__(batchdata, device, non_blocking)`` -> ``(images (B, 1, H, W) float32, {"logits": ..., "features": ...})``.
    """

    def __init__(self, teacher: nn.Module, logits: bool = True, features: bool = False,
                 cache: TeacherCache | None = None, augment: Callable | None = None, amp: bool = False,
                 amp_kwargs: Mapping[str, Any] | None = None, image_key: str = Keys.IMAGE,
                 teacher_key: str | None = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.logits, self.features = bool(logits), bool(features)
        self.cache, self.augment = cache, augment
        self.amp, self.amp_kwargs, self.image_key, self.teacher_key = amp, amp_kwargs, image_key, teacher_key
        self.wanted = [k for k, on in ((LOGITS, self.logits), (FEATURES, self.features)) if on]

    def _teacher(self, images: torch.Tensor, size: Sequence[int]) -> dict[str, torch.Tensor]:
        out = teacher_targets(self.teacher, images, self.logits, self.features)
        if LOGITS in out:
            out[LOGITS] = logits_at(out[LOGITS], size)
        return out

    def targets(self, images: torch.Tensor, ids: Sequence[str] | None,
                teacher_images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher targets of ``images`` (the teacher reads ``teacher_images`` when given, its logits resized to
        ``images``' size): from the cache when it has them, the others in one teacher call (stored)."""
        t_in = images if teacher_images is None else teacher_images
        size = tuple(images.shape[-2:])
        with autocast(images.device, self.amp, self.amp_kwargs):
            if self.cache is None or not self.cache.enabled:
                return self._teacher(t_in, size)
            if ids is None or len(ids) != images.shape[0]:
                raise TSDKInputError("the teacher cache needs an identifier per image: load images with LoadImaged "
                                     "(filename_or_obj meta)")
            sizes = size if t_in.shape[-2:] == images.shape[-2:] else size + tuple(t_in.shape[-2:])
            keys = [self.cache.key(i, sizes) for i in ids]
            found = [self.cache.get(k) for k in keys]
            for j, f in enumerate(found):
                if f is None or any(w not in f for w in self.wanted):
                    # one image per teacher call, and the cache's copy used: a target is a function of its image
                    # alone, the same in every epoch and whichever other images were cached before (a CPU's
                    # bfloat16 kernels give a batch of 8 other logits than a batch of 1, ~0.04 apart; and on
                    # 2 CPU cores one image at a time is faster: LiteMedSAM 145 vs 230 ms per image at 128 px)
                    fresh = self._teacher(t_in[j : j + 1], size)
                    found[j] = self.cache.put(keys[j], {k: v[0] for k, v in fresh.items()})
        return {w: torch.stack([f[w] for f in found]).to(images.device, torch.float32) for w in self.wanted}

    def augmented(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """``augment`` applied to each sample's image and targets together."""
        outs = [self.augment({Keys.IMAGE: images[j], **{k: v[j] for k, v in targets.items()}})
                for j in range(images.shape[0])]

        def stack(k: str) -> torch.Tensor:
            return torch.stack([torch.as_tensor(o[k]) for o in outs]).to(images.device).as_subclass(torch.Tensor)

        return stack(Keys.IMAGE), {k: stack(k) for k in targets}

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            raise ValueError(f"the distillation trainer expects dict batches with '{self.image_key}'")
        ids = _image_ids(batchdata, self.image_key)
        images = torch.as_tensor(batchdata[self.image_key]).as_subclass(torch.Tensor)
        images = images.to(device, non_blocking=non_blocking).float()
        t_images = None
        if self.teacher_key is not None and self.teacher_key in batchdata:
            t_images = torch.as_tensor(batchdata[self.teacher_key]).as_subclass(torch.Tensor)
            t_images = t_images.to(device, non_blocking=non_blocking).float()
        targets = self.targets(images, ids, t_images)
        if self.augment is not None:
            images, targets = self.augmented(images, targets)
        return images, targets


def cache_tag(*parts: Any, exclude: Sequence[str | os.PathLike] = ()) -> str:
    """A teacher-cache tag from ``parts``; a part that is an existing path adds its files' sizes and mtimes.

    So a disk cache made with another (e.g. retrained) teacher checkpoint is never reused. Files under ``exclude``
    (the cache's own folder, which the driver keeps inside the teacher's checkpoint folder) do not count: otherwise
    every target written would change the tag, and the next run (TS-KD after TS-KD without synthesis, an ablation)
    would find none of them.
    """
    skip = [Path(e).absolute() for e in exclude if e]
    out = []
    for p in parts:
        out.append(str(p))
        if isinstance(p, (str, os.PathLike)) and str(p) and Path(p).exists():
            files = [Path(p)] if Path(p).is_file() else sorted(f for f in Path(p).rglob("*") if f.is_file())
            files = [f for f in files if not any(f.absolute().is_relative_to(e) for e in skip)]
            out += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return "|".join(out)


def keep_confident(items: Sequence[Mapping[str, Any]], teacher: nn.Module, transform: Callable, keep: float = 1.0,
                   source: str = "synthetic", image_key: str = "teacher_image",
                   device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """The transfer set ``items`` without the ``source`` images the teacher is least sure of.

    Each ``source`` item is loaded with ``transform`` (the bundle's preprocessing) and scored by the teacher's mean
    confidence: the mean over pixels of its highest softmax probability. The best ``keep`` fraction (rounded up) of
    them stays; the other items pass through. A synthetic image the task's teacher cannot read confidently is one
    that looks least like the task's images, and its soft targets are the noisiest. ``keep`` 1 (the default) returns
    ``items`` as they are and runs nothing.

    Raises:
        TSDKInputError: ``keep`` outside (0, 1], or a teacher without logits at the input size (the task-agnostic
            VFM: it has no use for synthetic images).
    """
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise TSDKInputError(f"synthetic_keep {keep}: must be in (0, 1] (the fraction of {source} images kept)")
    items = [dict(it) for it in items]
    chosen = [i for i, it in enumerate(items) if it.get("source") == source]
    if keep >= 1.0 or not chosen:
        return items
    teacher = teacher.eval().requires_grad_(False)
    scores = []
    for i in chosen:
        d = transform(dict(items[i]))
        x = torch.as_tensor(d[image_key] if image_key in d else d[Keys.IMAGE]).as_subclass(torch.Tensor)
        logits = teacher_targets(teacher, x[None].float().to(device), True, False)[LOGITS]
        scores.append(float(logits.float().softmax(1).amax(1).mean()))
    n_keep = max(1, math.ceil(keep * len(chosen)))
    order = sorted(range(len(chosen)), key=lambda j: -scores[j])  # most confident first
    dropped = {chosen[j] for j in order[n_keep:]}
    logger.info("%s images: kept %d of %d by the teacher's mean confidence (kept >= %.3f; all: min %.3f, median "
                "%.3f, max %.3f)", source, n_keep, len(chosen), scores[order[n_keep - 1]], scores[order[-1]],
                scores[order[len(order) - 1 - len(order) // 2]], scores[order[0]])
    return [it for i, it in enumerate(items) if i not in dropped]
