"""The distillation trainer: a frozen teacher, a student that learns from it, on MONAI/ignite engines.

``DistillationTrainer`` is a ``monai.engines.Trainer`` with its own iteration, so every MONAI handler
(``StatsHandler``, ``ValidationHandler``, ``CheckpointSaver``, ``LrScheduleHandler``, ...) works unchanged.
One iteration:

1. take the un-augmented images ``(B, 1, H, W)`` (intensities in ``[0, 1]``) from the batch;
2. teacher targets (:class:`TeacherTargets`): from the cache (:class:`TeacherCache`, memory or disk, keyed by
   the image's file and size) or from the teacher in eval mode under ``torch.no_grad()``; logits
   ``(B, C, H, W)`` and/or the embedding ``(B, Ct, h, w)``, as the loss needs;
3. optional joint augmentation (a MONAI dictionary transform on ``image``, ``teacher_logits`` and
   ``teacher_features`` per sample, e.g. ``RandFlipd`` on all three, intensity transforms on the image);
4. student forward (its feature map is read by a hook on ``features_module``, so the call goes through
   ``DistributedDataParallel.forward``), the KD loss, backward, optimiser step. The loss's 1x1 projection
   trains with the student (put ``loss.parameters()`` in the optimiser).

The teacher interface lives in one place, :class:`TeacherTargets`: the teacher may return a tensor (logits,
or the embedding for a bare VFM encoder), a dict (``logits``/``pred`` and ``features``/``embedding``), or a
tuple ``(logits, features)``; or expose ``forward_with_embedding(x) -> (logits, features)`` (``LoRASegTeacher``).
:func:`load_distill_teacher` loads the teacher stage's artefacts.

``build_transfer_set`` gathers the transfer set (unlabelled real images, the labelled pool's images, synthetic
images), each part switchable.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.transforms import MapTransform
from monai.utils import CommonKeys as Keys
from torch.utils.data import DataLoader

from tsdk_monai.engines.amp import AmpTrainer, autocast, backward_and_step
from tsdk_monai.utils import TSDKInputError, atomic_write_bytes

__all__ = [
    "DistillationTrainer",
    "TeacherCache",
    "TeacherTargets",
    "TeacherLabeld",
    "build_transfer_set",
    "unwrap_module",
    "student_forward",
    "save_student",
    "cache_tag",
    "resolve_teacher_dir",
    "load_distill_teacher",
]

logger = logging.getLogger(__name__)

LOGITS, FEATURES = "teacher_logits", "teacher_features"


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside ``DataParallel``/``DistributedDataParallel`` (or the module itself)."""
    return module.module if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else module


# ----------------------------------------------------------------------------------------------- teacher side
class TeacherTargets:
    """Calls a frozen teacher and returns the targets the KD loss needs (the one adapter to teacher modules).

    Accepted teachers (``x``: ``(B, 1, H, W)`` in ``[0, 1]``):

    - ``forward_with_embedding(x) -> (logits (B, C, H, W), embedding (B, Ct, h, w))`` and ``embed(x)`` (the
      ``LoRASegTeacher`` of ``tsdk_monai.networks.teacher``), or ``forward_with_features(x)`` (our students);
    - ``forward(x)`` returning a dict with ``logits``/``pred`` and/or ``features``/``embedding``/``image_embeddings``;
    - ``forward(x)`` returning a tuple ``(logits, features)``;
    - ``forward(x)`` returning one tensor: logits when the loss needs logits, otherwise the embedding (a bare
      VFM encoder such as ``build_vfm_encoder(...)``, the task-agnostic teacher).

    ``__call__(teacher, x, need_logits, need_features)`` -> ``{"teacher_logits": ..., "teacher_features": ...}``
    (only the needed keys), computed in eval mode with no gradient.
    """

    _LOGIT_KEYS = ("logits", "pred", "seg_logits")
    _FEATURE_KEYS = ("features", "embedding", "image_embeddings", "image_embedding")

    @staticmethod
    def _pick(out: Mapping, keys: Sequence[str], what: str) -> torch.Tensor:
        for k in keys:
            if k in out:
                return out[k]
        raise TSDKInputError(f"the teacher's output dict has no {what} (looked for {', '.join(keys)}; got {list(out)})")

    @torch.no_grad()
    def __call__(self, teacher: nn.Module, x: torch.Tensor, need_logits: bool, need_features: bool) -> dict[str, torch.Tensor]:
        if not (need_logits or need_features):
            raise ValueError("the loss needs neither teacher logits nor teacher features")
        if teacher.training:  # (re-entering eval mode makes TinyViT recompute its cached attention biases)
            teacher.eval()
        inner = unwrap_module(teacher)
        logits = feats = None
        if need_features and need_logits and hasattr(inner, "forward_with_embedding"):
            logits, feats = inner.forward_with_embedding(x)  # LoRASegTeacher
        elif need_features and need_logits and hasattr(inner, "forward_with_features"):
            logits, feats = inner.forward_with_features(x)
        elif need_features and not need_logits and hasattr(inner, "embed"):
            feats = inner.embed(x)  # LoRASegTeacher's encoder alone
        else:
            out = teacher(x)
            if isinstance(out, Mapping):
                logits = self._pick(out, self._LOGIT_KEYS, "logits") if need_logits else None
                feats = self._pick(out, self._FEATURE_KEYS, "features") if need_features else None
            elif isinstance(out, (tuple, list)):
                logits, feats = out[0], (out[1] if len(out) > 1 else None)
            elif need_logits:
                logits = out
            else:
                feats = out
        result: dict[str, torch.Tensor] = {}
        if need_logits:
            if logits is None:
                raise TSDKInputError(f"the teacher {type(inner).__name__} gives no logits; the loss needs them")
            if logits.shape[-2:] != x.shape[-2:]:
                raise TSDKInputError(f"the teacher's logits {tuple(logits.shape)} are not at the input size {tuple(x.shape[-2:])}")
            result[LOGITS] = logits.float()
        if need_features:
            if feats is None:
                raise TSDKInputError(
                    f"the teacher {type(inner).__name__} gives no features; give it forward_with_features or a dict output"
                )
            result[FEATURES] = feats.float()
        return result


def resolve_teacher_dir(teacher_ckpt: str | os.PathLike) -> Path:
    """The teacher folder (holding ``teacher.json``) from the teacher stage's ckpt_dir, its ``teacher/`` sub-folder,
    the folder itself or a file in it (e.g. the merged ``model.pt``).

    Raises:
        TSDKInputError: nothing there, naming the path.
    """
    from tsdk_monai.networks.teacher import TEACHER_CONFIG

    p = Path(teacher_ckpt)
    if not str(teacher_ckpt) or not p.exists():
        raise TSDKInputError(f"{p}: teacher checkpoint not found (train the tsdk_teacher bundle first, then pass its "
                             "ckpt_dir as teacher_ckpt)")
    for cand in ([p.parent] if p.is_file() else [p, p / "teacher"]):
        if (cand / TEACHER_CONFIG).is_file():
            return cand
    raise TSDKInputError(f"{p}: no {TEACHER_CONFIG} there or in {p / 'teacher'}; teacher_ckpt must name the teacher "
                         "stage's ckpt_dir, its teacher folder or the merged model.pt")


def load_distill_teacher(teacher_ckpt: str | os.PathLike, device: str | torch.device = "cpu",
                         merged: bool = True) -> nn.Module:
    """The frozen task-specific teacher (``LoRASegTeacher``, eval mode, no gradients) from the teacher stage.

    ``merged=True`` reads the merged state dict (``model.pt``; no VFM checkpoint needed), ``False`` the VFM
    checkpoint + LoRA adapter + decoder.
    """
    from tsdk_monai.networks.teacher import load_teacher

    return load_teacher(resolve_teacher_dir(teacher_ckpt), merged=merged, map_location=device, freeze=True)


class TeacherCache:
    """Teacher targets of un-augmented images, computed once per image and kept in memory or on disk.

    Args:
        mode: ``"none"`` (always recompute), ``"memory"`` (a dict on the CPU) or ``"disk"`` (one ``.pt`` file per
            image in ``cache_dir``, read back with ``weights_only=True``).
        cache_dir: folder of the disk cache (created).
        tag: anything that identifies the teacher (e.g. its checkpoint path and size); part of every key, so a
            disk cache of another teacher is never reused.
        dtype: storage dtype (``float32`` keeps cached and online targets identical; ``float16`` halves memory).

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
        if self.mode == "memory":
            hit = self._mem.get(key)
        elif self.mode == "disk" and self._file(key).is_file():
            try:
                hit = torch.load(self._file(key), map_location="cpu", weights_only=True)
            except Exception as exc:  # a damaged cache file is recomputed, not fatal
                logger.warning("%s: unreadable teacher cache file (%s); recomputing", self._file(key), exc)
                hit = None
        else:
            hit = None
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: str, targets: Mapping[str, torch.Tensor]) -> None:
        item = {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in targets.items()}
        if self.mode == "memory":
            self._mem[key] = item
        elif self.mode == "disk":
            buf = io.BytesIO()
            torch.save(item, buf)
            atomic_write_bytes(self._file(key), buf.getvalue())

    def __len__(self) -> int:
        if self.mode == "disk" and self.cache_dir is not None:
            return len(list(self.cache_dir.glob("*.pt")))
        return len(self._mem)


def _image_ids(batchdata: Mapping, image_key: str, id_key: str | None) -> list[str] | None:
    """One identifier per image of the batch: ``batch[id_key]`` or the image's ``filename_or_obj`` meta."""
    if id_key and id_key in batchdata:
        ids = batchdata[id_key]
        return [str(i) for i in ids]
    img = batchdata[image_key]
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping) and "filename_or_obj" in meta:
        names = meta["filename_or_obj"]
        return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]
    meta = batchdata.get(f"{image_key}_meta_dict")
    if isinstance(meta, Mapping) and "filename_or_obj" in meta:
        return [str(n) for n in meta["filename_or_obj"]]
    return None


# ----------------------------------------------------------------------------------------------- student side
def student_forward(network: nn.Module, x: torch.Tensor, need_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``network(x)`` -> ``(logits (B, C, H, W), features (B, Cs, H/16, W/16) or None)``.

    The features come from a forward hook on the student's ``features_module``, so the call goes through
    ``network.forward`` (``DistributedDataParallel`` needs that to synchronise gradients).
    """
    if not need_features:
        return network(x), None
    inner = unwrap_module(network)
    target = getattr(inner, "features_module", None)
    if not isinstance(target, nn.Module):
        raise TypeError(f"the student {type(inner).__name__} has no 'features_module' for feature distillation")
    store: dict[str, torch.Tensor] = {}
    handle = target.register_forward_hook(lambda _m, _i, out: store.__setitem__("f", out))
    try:
        logits = network(x)
    finally:
        handle.remove()
    if "f" not in store:
        raise RuntimeError(f"{type(inner).__name__}.features_module was not called in forward")
    return logits, store["f"]


class DistillationTrainer(AmpTrainer):
    """Knowledge distillation of a frozen ``teacher`` into ``network`` (the student), as a MONAI ``Trainer``.

    Args:
        device: device of the student, the teacher and the batches.
        max_epochs: epochs to run.
        train_data_loader: batches of dicts with ``image_key`` ``(B, 1, H, W)`` in ``[0, 1]``, un-augmented
            (deterministic transforms only; augment with ``augment`` so teacher targets stay cacheable).
        network: the student (``forward(x) -> (B, C, H, W)`` logits; ``features_module`` when the loss needs
            features); may be wrapped in ``DistributedDataParallel``.
        teacher: the frozen teacher (see :class:`TeacherTargets`); it is put in eval mode with gradients off.
        optimizer: optimiser of the student's and the loss's parameters.
        loss_function: a :class:`~tsdk_monai.losses.TaskSpecificKDLoss` or ``TaskAgnosticKDLoss`` (any module
            called as ``loss(s_logits, t_logits, s_features, t_features)`` with ``needs_logits``/``needs_features``);
            may be wrapped in ``DistributedDataParallel`` when it has parameters.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        non_blocking: non-blocking host-to-device copies.
        teacher_cache: a :class:`TeacherCache` (or ``None``: no cache).
        augment: optional MONAI dictionary transform applied per sample to
            ``{"image": (1, H, W), "teacher_logits": (C, H, W), "teacher_features": (Ct, h, w)}`` after the
            teacher targets are known (spatial transforms must act on all present keys alike).
        image_key: the batch key of the images.
        id_key: batch key of image identifiers for the cache (default: the image's ``filename_or_obj`` meta).
        amp, amp_kwargs: mixed precision as in ``monai.engines.SupervisedTrainer`` (``amp_kwargs={"dtype": ...}``),
            but autocast on the device's type, so bfloat16 also runs on the CPU; the teacher's inference and the
            student's forward are autocast, the loss is computed in float32; the loss is scaled only for float16
            on CUDA (see :mod:`tsdk_monai.engines.amp`).
        train_handlers, key_train_metric, additional_metrics, metric_cmp_fn, postprocessing, event_names,
        event_to_attr, decollate, optim_set_to_none: as in ``monai.engines.SupervisedTrainer``.

    ``engine.state.output``: ``image``, ``pred`` (student logits), ``loss``, and the loss's weighted terms
    (``kd_kl``, ``kd_dice``, ``kd_feat`` as floats).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        teacher: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: nn.Module,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        teacher_cache: TeacherCache | None = None,
        augment: Callable | None = None,
        image_key: str = Keys.IMAGE,
        id_key: str | None = None,
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
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.teacher_cache = teacher_cache
        self.teacher_targets = TeacherTargets()
        self.augment = augment
        self.image_key, self.id_key = image_key, id_key
        self.optim_set_to_none = optim_set_to_none
        loss = unwrap_module(loss_function)
        self.need_logits = bool(getattr(loss, "needs_logits", True))
        self.need_features = bool(getattr(loss, "needs_features", False))

    # the teacher side of one iteration; public so tests and benchmarks can call it alone
    def get_teacher_targets(self, images: torch.Tensor, ids: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """Teacher targets ``{"teacher_logits": (B, C, H, W), "teacher_features": (B, Ct, h, w)}`` for ``images``.

        With an enabled cache, targets of images seen before come from it and the others are computed in one
        teacher call and stored.
        """
        cache = self.teacher_cache
        if cache is None or not cache.enabled:
            return self.teacher_targets(self.teacher, images, self.need_logits, self.need_features)
        if ids is None or len(ids) != images.shape[0]:
            raise TSDKInputError(
                "the teacher cache needs an identifier per image: load images with LoadImaged (filename_or_obj meta) "
                "or give the trainer an id_key"
            )
        keys = [cache.key(i, images.shape[-2:]) for i in ids]
        found = [cache.get(k) for k in keys]
        wanted = [k for k in (LOGITS if self.need_logits else None, FEATURES if self.need_features else None) if k]
        missing = [j for j, f in enumerate(found) if f is None or any(w not in f for w in wanted)]
        if missing:
            fresh = self.teacher_targets(self.teacher, images[missing], self.need_logits, self.need_features)
            for n, j in enumerate(missing):
                found[j] = {k: v[n] for k, v in fresh.items()}
                cache.put(keys[j], found[j])
        return {w: torch.stack([f[w] for f in found]).to(images.device, torch.float32) for w in wanted}

    def _augment(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        outs = []
        for j in range(images.shape[0]):
            item = {Keys.IMAGE: images[j], **{k: v[j] for k, v in targets.items()}}
            outs.append(self.augment(item))
        stack = lambda k: torch.stack([torch.as_tensor(o[k]) for o in outs]).to(images.device)  # noqa: E731
        return stack(Keys.IMAGE).as_subclass(torch.Tensor), {k: stack(k).as_subclass(torch.Tensor) for k in targets}

    def _iteration(self, engine: "DistillationTrainer", batchdata: dict[str, Any]) -> dict:
        """One distillation step; returns ``{"image", "pred", "loss", <loss terms>}``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if not isinstance(batchdata, Mapping) or engine.image_key not in batchdata:
            raise ValueError(f"the distillation trainer expects dict batches with '{engine.image_key}'")
        raw = batchdata[engine.image_key]
        ids = _image_ids(batchdata, engine.image_key, engine.id_key)
        images = torch.as_tensor(raw).as_subclass(torch.Tensor).to(engine.state.device, non_blocking=engine.non_blocking)
        images = images.float()
        with autocast(engine.state.device, engine.amp, engine.amp_kwargs):  # teacher inference in the AMP dtype too
            targets = engine.get_teacher_targets(images, ids)
        if engine.augment is not None:
            images, targets = engine._augment(images, targets)
        engine.state.output = {Keys.IMAGE: images}

        def _compute_pred_loss():
            with autocast(engine.state.device, engine.amp, engine.amp_kwargs):  # the student's forward
                logits, feats = student_forward(engine.network, images, engine.need_features)
            engine.state.output[Keys.PRED] = logits
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            if engine.amp:  # the loss (and the loss's projection) in float32
                logits, feats = logits.float(), (feats.float() if feats is not None else None)
            loss = engine.loss_function(logits, targets.get(LOGITS), feats, targets.get(FEATURES))
            if not engine.need_logits and isinstance(engine.network, nn.parallel.DistributedDataParallel):
                # DDP expects every parameter reachable from forward's output to get a gradient; a features-only
                # loss leaves the decoder out, so tie the logits in with weight 0 (zero gradients, same loss).
                loss = loss + 0.0 * logits.float().mean()
            engine.state.output[Keys.LOSS] = loss
            engine.state.output.update(getattr(unwrap_module(engine.loss_function), "last_terms", {}))
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.loss_function.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        _compute_pred_loss()
        backward_and_step(engine)  # scaled loss for float16 on CUDA
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def save_student(network: nn.Module, path: str | os.PathLike) -> Path | None:
    """Save the student's plain state dict (``DistributedDataParallel`` unwrapped) atomically to ``path``.

    Only rank 0 writes when ``torch.distributed`` is initialised; returns the path written (``None`` elsewhere).
    The file loads with ``torch.load(path, weights_only=True)`` into ``build_student(...)`` of the same name.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    state = {k: v.detach().cpu() for k, v in unwrap_module(network).state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    out = atomic_write_bytes(path, buf.getvalue())
    logger.info("saved the distilled student to %s", out)
    return out


def cache_tag(*parts: Any) -> str:
    """A teacher-cache tag from ``parts``; a part that is an existing path adds its files' sizes and mtimes.

    So a disk cache made with another (e.g. retrained) teacher checkpoint is never reused.
    """
    out = []
    for p in parts:
        out.append(str(p))
        if isinstance(p, (str, os.PathLike)) and str(p) and Path(p).exists():
            files = [Path(p)] if Path(p).is_file() else sorted(f for f in Path(p).rglob("*") if f.is_file())
            out += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return "|".join(out)


# ----------------------------------------------------------------------------------------------- evaluation
class TeacherLabeld(MapTransform):
    """Adds the teacher's one-hot hard labels of ``image`` under ``output_key`` (for teacher-agreement metrics).

    Works on one decollated sample: ``image`` ``(1, H, W)`` -> ``output_key`` ``(C, H, W)`` one-hot of
    ``argmax(teacher(image))``, on the image's device.

    Args:
        keys: the image key (one).
        teacher: the teacher (see :class:`TeacherTargets`; it must give logits).
        output_key: where to put the labels.
    """

    def __init__(self, keys: str | Sequence[str], teacher: nn.Module, output_key: str = "teacher_label",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.teacher = teacher.eval().requires_grad_(False)
        self.output_key = output_key
        self._targets = TeacherTargets()

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).as_subclass(torch.Tensor).float()
            dev = next(self.teacher.parameters()).device
            logits = self._targets(self.teacher, img[None].to(dev), True, False)[LOGITS][0]
            hard = logits.argmax(0)
            onehot = torch.nn.functional.one_hot(hard, logits.shape[0]).permute(2, 0, 1).float()
            d[self.output_key] = onehot.to(img.device)
        return d


# ----------------------------------------------------------------------------------------------- transfer set
def _as_bool(value: Any, name: str) -> bool:
    """A config switch given as a bool or as text (``--use_synthetic false`` on the command line is a string)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes", "on"):
            return True
        if v in ("false", "0", "no", "off", ""):
            return False
        raise TSDKInputError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def build_transfer_set(
    datalist: str | os.PathLike,
    use_unlabeled: bool = True,
    use_labeled: bool = True,
    synthetic_datalist: str | os.PathLike | None = None,
    use_synthetic: bool = True,
) -> list[dict[str, str]]:
    """The distillation's transfer set: ``[{"image": absolute path, "source": part}, ...]``.

    Parts (each switchable): ``unlabeled`` (the datalist's unlabelled real images), ``training`` (the labelled
    pool's images, pixels only: labels are dropped) and ``synthetic`` (the ``unlabeled`` list of the synthesis
    stage's ``synthetic_datalist.json``; skipped when ``synthetic_datalist`` is empty). Validation and test
    images are never part of it.

    Raises:
        TSDKInputError: a datalist is missing or invalid, or the transfer set is empty (naming the datalist).
    """
    from tsdk_monai.data import load_split

    use_unlabeled, use_labeled, use_synthetic = (_as_bool(v, n) for v, n in (
        (use_unlabeled, "use_unlabeled"), (use_labeled, "use_labeled"), (use_synthetic, "use_synthetic")))
    synthetic_datalist = None if synthetic_datalist in (None, "", "None", "none", "null") else synthetic_datalist
    items: list[dict[str, str]] = []
    parts: list[tuple[str, str, Any]] = []  # (source, split, datalist)
    if use_unlabeled:
        parts.append(("unlabeled", "unlabeled", datalist))
    if use_labeled:
        parts.append(("training", "training", datalist))
    if use_synthetic and synthetic_datalist:
        if not Path(synthetic_datalist).is_file():
            raise TSDKInputError(f"{synthetic_datalist}: synthetic datalist not found (set use_synthetic to false "
                                 "or synthetic_datalist to '' to distil without synthetic images)")
        parts.append(("synthetic", "unlabeled", synthetic_datalist))
    counts = {}
    for source, split, path in parts:
        cases = load_split(path, split, allow_empty=True)  # paths confined to each datalist's folder
        items += [{"image": c["image"], "source": source} for c in cases]
        counts[source] = len(cases)
    if not items:
        raise TSDKInputError(
            f"{datalist}: the transfer set is empty (parts used: {counts or 'none'}); enable use_unlabeled, "
            "use_labeled or use_synthetic with a synthetic datalist"
        )
    logger.info("transfer set: %d images (%s)", len(items), ", ".join(f"{k} {v}" for k, v in counts.items()))
    return items
