"""A transform of the distillation stage's evaluation: the teacher's hard labels beside the image."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
from monai.transforms import MapTransform

from tsdk_monai.transforms.discrete import channel_argmax

__all__ = ["TeacherLabeld"]


class TeacherLabeld(MapTransform):
    """Adds the teacher's one-hot hard labels of ``image`` under ``output_key`` (for teacher-agreement metrics).

    Works on one decollated sample: ``image`` ``(1, H, W)`` -> ``output_key`` ``(C, H, W)`` one-hot of
    ``argmax(teacher(image))``, on the image's device.

    Args:
        keys: the image key (one): the teacher's own copy where it reads another size than the student.
        teacher: the frozen teacher (``forward(x)`` -> logits at the input size).
        output_key: where to put the labels.
        like_key: when given, the teacher's logits are resized (bilinear, antialiased, as in training) to this
            item's spatial size before the argmax, so the labels line up with the student's image and prediction.
    """

    def __init__(self, keys: str | Sequence[str], teacher: nn.Module, output_key: str = "teacher_label",
                 like_key: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.teacher = teacher.eval().requires_grad_(False)
        self.output_key = output_key
        self.like_key = like_key

    def __call__(self, data: Mapping) -> dict:
        from tsdk_monai.engines.distill import LOGITS, logits_at, teacher_targets

        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).as_subclass(torch.Tensor).float()
            dev = next(self.teacher.parameters()).device
            logits = teacher_targets(self.teacher, img[None].to(dev), True, False)[LOGITS]
            if self.like_key is not None:
                logits = logits_at(logits, d[self.like_key].shape[1:])
            logits = logits[0]
            hard = channel_argmax(logits, keepdim=False)
            onehot = torch.nn.functional.one_hot(hard, logits.shape[0]).permute(2, 0, 1).float()
            d[self.output_key] = onehot.to(img.device)
        return d
