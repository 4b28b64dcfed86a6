"""The teacher's artefacts: writing them, reading them back, and finding them from a stage's output folder.

Saved artefacts (:func:`save_teacher`, in one folder, e.g. ``models/teacher``)::

    teacher.json                 constructor arguments (rebuilds the architecture)
    adapter/adapter_config.json  peft LoRA adapter of the encoder (finetune="lora")
    adapter/adapter_model.safetensors
    decoder.safetensors          prompt-free decoder and learned default prompts
    encoder.safetensors          the whole encoder (finetune="full" only)
    model.pt                     merged plain state dict (LoRA folded in with merge_and_unload), for inference

:func:`load_teacher` rebuilds a teacher from either the merged state dict (no VFM checkpoint needed) or the
VFM checkpoint + adapter + decoder; :func:`load_distill_teacher` is the frozen teacher of the distillation stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from tsdk_monai.networks.teacher import LoRASegTeacher, count_parameters
from tsdk_monai.utils import (
    TSDKInputError,
    atomic_write_bytes,
    atomic_write_json,
    load_state_dict_strict,
    read_json,
    read_state_dict,
    save_state_dict,
    unwrap,
)

__all__ = [
    "TEACHER_CONFIG",
    "TEACHER_MERGED",
    "TEACHER_DECODER",
    "TEACHER_ENCODER",
    "TEACHER_ADAPTER_DIR",
    "save_teacher",
    "read_teacher_config",
    "build_teacher",
    "load_teacher",
    "resolve_teacher_dir",
    "load_distill_teacher",
]

TEACHER_CONFIG = "teacher.json"
TEACHER_MERGED = "model.pt"
TEACHER_DECODER = "decoder.safetensors"
TEACHER_ENCODER = "encoder.safetensors"
TEACHER_ADAPTER_DIR = "adapter"


def read_teacher_config(path: str | os.PathLike) -> dict[str, Any]:
    """The constructor arguments saved in ``path/teacher.json`` (``path``: a teacher folder or the JSON file)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / TEACHER_CONFIG
    cfg = read_json(file, "teacher config not found (train the teacher bundle first)", "not a valid teacher config")
    if not isinstance(cfg, dict) or "num_classes" not in cfg or "vfm" not in cfg:
        raise TSDKInputError(f"{file}: teacher config lacks 'num_classes'/'vfm'")
    return cfg


def _safetensors_save(state: Mapping[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save

    atomic_write_bytes(file, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def save_teacher(teacher: nn.Module, path: str | os.PathLike) -> Path:
    """Write a teacher's artefacts into the folder ``path`` (see the module docstring); return ``path``.

    Every file is written through a temporary file and a rename; ``model.pt`` is written last.
    """
    net = unwrap(teacher)
    if not isinstance(net, LoRASegTeacher):
        raise TypeError(f"save_teacher needs a LoRASegTeacher, got {type(net).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(net.config)
    if net.has_adapter:
        tmp = path / f".{TEACHER_ADAPTER_DIR}.tmp"
        net.save_adapter(tmp)
        target = path / TEACHER_ADAPTER_DIR
        for f in tmp.iterdir():
            target.mkdir(exist_ok=True)
            os.replace(f, target / f.name)
        tmp.rmdir()
    _safetensors_save(net.decoder.state_dict(), path / TEACHER_DECODER)
    if net.finetune == "full":
        _safetensors_save(net.encoder.state_dict(), path / TEACHER_ENCODER)
    trainable, total = count_parameters(net)
    config["parameters"] = {"trainable": trainable, "total": total}
    atomic_write_json(path / TEACHER_CONFIG, config)
    save_state_dict(net.merged_state_dict(), path / TEACHER_MERGED)
    return path


_CTOR_KEYS = (
    "num_classes", "vfm", "checkpoint", "img_size", "finetune", "lora_rank", "lora_alpha", "lora_dropout",
    "target_modules", "default_prompt", "arch",
)


def build_teacher(path: str | os.PathLike, merged: bool = True, checkpoint: str | None = None) -> LoRASegTeacher:
    """The architecture of a saved teacher, weights not loaded (for a bundle's ``network_def``).

    ``merged=True``: the plain architecture (``finetune="decoder"``, no VFM checkpoint read) that ``model.pt``
    loads into. ``merged=False``: the saved fine-tuning set-up on the VFM checkpoint (``checkpoint`` overrides
    the saved path), ready for :meth:`LoRASegTeacher.load_adapter`.
    """
    cfg = read_teacher_config(path)
    kwargs = {k: cfg[k] for k in _CTOR_KEYS if k in cfg}
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    if merged:
        kwargs.update(finetune="decoder", pretrained=False)
    return LoRASegTeacher(**kwargs)


def load_teacher(
    path: str | os.PathLike,
    merged: bool = True,
    checkpoint: str | None = None,
    map_location: str | torch.device = "cpu",
    freeze: bool = True,
) -> LoRASegTeacher:
    """Rebuild a teacher saved by :func:`save_teacher` in the folder ``path``.

    Args:
        path: the teacher folder (e.g. ``<bundle>/models/teacher``).
        merged: ``True`` loads ``model.pt`` (plain weights, LoRA merged; no VFM checkpoint needed);
            ``False`` rebuilds from the VFM checkpoint + ``adapter/`` + ``decoder.safetensors``.
        checkpoint: the VFM checkpoint for ``merged=False`` when it moved since training.
        map_location: device of the returned teacher.
        freeze: eval mode and gradients off (a distillation teacher).
    """
    path = Path(path)
    net = build_teacher(path, merged=merged, checkpoint=checkpoint)
    if merged:
        load_state_dict_strict(net, read_state_dict(path / TEACHER_MERGED, "teacher weights"),
                               path / TEACHER_MERGED, "the merged teacher")
    else:
        if net.has_adapter:
            net.load_adapter(path / TEACHER_ADAPTER_DIR)
        parts = [(TEACHER_DECODER, net.decoder)] + ([(TEACHER_ENCODER, net.encoder)] if net.finetune == "full" else [])
        for name, module in parts:
            load_state_dict_strict(module, read_state_dict(path / name, "teacher weights"), path / name, "the teacher")
    net = net.to(map_location)
    if freeze:
        net.requires_grad_(False)
        net.eval()
    return net


def resolve_teacher_dir(teacher_ckpt: str | os.PathLike) -> Path:
    """The teacher folder (holding ``teacher.json``) from the teacher stage's ckpt_dir, its ``teacher/`` sub-folder,
    the folder itself or a file in it (e.g. the merged ``model.pt``).

    Raises:
        TSDKInputError: nothing there, naming the path.
    """
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
    return load_teacher(resolve_teacher_dir(teacher_ckpt), merged=merged, map_location=device, freeze=True)
