"""Knowledge-distillation losses: task-specific (outputs + features) and task-agnostic (features only).

``TaskSpecificKDLoss``::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))      per pixel, summed over classes, mean over pixels
      + beta  * Dice(softmax(s), onehot(argmax(t)))             MONAI DiceLoss against the teacher's hard labels
      + gamma * MSE(resize(proj(f_s)), e_t)                     proj: learned 1x1 conv, student -> teacher channels

with ``s``/``t`` the student/teacher logits ``(B, C, H, W)``, ``f_s`` the student's encoder features
``(B, Cs, h_s, w_s)`` and ``e_t`` the teacher's embedding ``(B, Ct, h_t, w_t)``. The KL term is the
standard (Hinton) distillation term: the teacher's tempered distribution is the target. The projection is a
parameter of the loss: it must go into the optimizer with the student (``list(loss.parameters())``).
With ``confidence`` ``c > 0`` the KL and Dice terms count only the pixels where the teacher is sure
(``max softmax(t) >= c``, its top class probability at T = 1), so the student is not taught the teacher's guesses
where it is unsure (boundaries, shadows, a synthetic image it cannot read).

``TaskAgnosticKDLoss`` is the feature term alone (teacher: a frozen, un-fine-tuned VFM encoder, which has
no segmentation logits).

The loss is 0 when the student's logits equal the teacher's (KL term), when the projected student features
equal the teacher embedding (feature term) and, for the Dice term, when the teacher is confident
(Dice of a softmax against hard labels reaches 0 only as the probabilities saturate).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

from tsdk_monai.transforms.discrete import channel_argmax

__all__ = ["TaskSpecificKDLoss", "TaskAgnosticKDLoss", "kd_kl_div", "teacher_confidence_mask", "FeatureProjection"]


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over classes (dim 1), averaged over batch and pixels.

    Args:
        student_logits: ``(B, C, *spatial)``.
        teacher_logits: ``(B, C, *spatial)``, no gradient needed.
        temperature: ``T > 0``.
        mask: optional ``(B, 1, *spatial)`` of 0/1: the average is over the pixels where it is 1 (0 if none is).

    Returns:
        A scalar tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)
    if mask is None:
        return kl.mean() * t * t
    m = mask.float().squeeze(1)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t


def teacher_confidence_mask(teacher_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B, 1, *spatial)`` float 0/1: where the teacher's top class probability (softmax at T = 1) is ``>= threshold``."""
    return (F.softmax(teacher_logits.float(), dim=1).amax(dim=1, keepdim=True) >= float(threshold)).float()


class FeatureProjection(nn.Module):
    """Learned 1x1 convolution from student features to the teacher's channels, resized to the teacher's grid.

    Shapes: ``(B, student_channels, h_s, w_s)`` -> ``(B, teacher_channels, h_t, w_t)`` (bilinear resize).
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(int(student_channels), int(teacher_channels), kernel_size=1)

    def forward(self, student_features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = self.proj(student_features)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out


class TaskSpecificKDLoss(nn.Module):
    """Task-specific distillation loss (see the module docstring for the formula).

    Args:
        student_channels: channels of the student's feature map (``student.feature_channels``); needed when
            ``gamma > 0``.
        teacher_channels: channels of the teacher's embedding (256 for SAM-family encoders).
        alpha: weight of the tempered KL term.
        beta: weight of the Dice term against the teacher's hard labels.
        gamma: weight of the feature MSE term.
        temperature: KD temperature ``T``.
        include_background: whether the Dice term counts the background channel.
        confidence: ``0`` (default): every pixel counts; ``c`` in ``(0, 1)``: the KL and Dice terms count only the
            pixels where the teacher's top class probability is ``>= c`` (``last_terms["kd_confident"]``: their share).

    ``forward(student, teacher)`` takes two dicts ``{"logits", "features"}`` (logits ``(B, C, H, W)`` for both;
    features ``(B, student_channels, h_s, w_s)`` and ``(B, teacher_channels, h_t, w_t)``) and returns the scalar
    loss; the weighted terms of the last call are in ``last_terms`` (detached floats) for logging.
    """

    needs_logits = True

    def __init__(
        self,
        student_channels: int | None = None,
        teacher_channels: int = 256,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 2.0,
        include_background: bool = True,
        confidence: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(confidence) < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {confidence}")
        self.confidence = float(confidence)
        if min(alpha, beta, gamma) < 0 or alpha + beta + gamma <= 0:
            raise ValueError(f"the weights must be >= 0 and not all 0, got alpha={alpha}, beta={beta}, gamma={gamma}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.gamma, self.temperature = float(alpha), float(beta), float(gamma), float(temperature)
        self.dice = DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True)
        self.masked_dice = DiceLoss(include_background=include_background)  # on masked probabilities and one-hot
        self.projection: FeatureProjection | None = None
        if self.gamma > 0:
            if student_channels is None:
                raise ValueError("gamma > 0 needs student_channels (the student's feature_channels)")
            self.projection = FeatureProjection(student_channels, teacher_channels)
        self.last_terms: dict[str, float] = {}

    @property
    def needs_features(self) -> bool:
        return self.gamma > 0

    def feature_term(self, student_features: torch.Tensor | None, teacher_features: torch.Tensor | None) -> torch.Tensor:
        """``MSE(resize(proj(f_s)), e_t)``: ``(B, Cs, h_s, w_s)``, ``(B, Ct, h_t, w_t)`` -> scalar."""
        if student_features is None or teacher_features is None:
            raise ValueError("the feature term needs both student_features and teacher_features")
        if self.projection is None:
            raise ValueError("this loss has no feature projection (gamma == 0)")
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError(f"batch sizes differ: student features {tuple(student_features.shape)}, "
                             f"teacher features {tuple(teacher_features.shape)}")
        pred = self.projection(student_features.float(), teacher_features.shape[-2:])  # float32 under autocast too
        return F.mse_loss(pred.float(), teacher_features.float())

    def forward(self, student: Mapping[str, torch.Tensor | None], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``student``: ``{"logits": (B, C, H, W), "features": (B, Cs, h_s, w_s) or None}`` (what
        :class:`~tsdk_monai.inferers.FeatureInferer` returns); ``teacher``: ``{"logits": ..., "features": ...}`` (the
        distillation prepare-batch's targets; only the ones the loss needs). Returns the scalar loss."""
        s_logits, t_logits = student.get("logits"), teacher.get("logits")
        terms: dict[str, torch.Tensor] = {}
        mask = None
        if self.alpha > 0 or self.beta > 0:
            if s_logits is None or t_logits is None:
                raise ValueError("alpha > 0 or beta > 0 needs student and teacher logits")
            t_logits = t_logits.detach()
            if self.confidence > 0:
                mask = teacher_confidence_mask(t_logits, self.confidence)
        if self.alpha > 0:
            terms["kd_kl"] = self.alpha * kd_kl_div(s_logits, t_logits, self.temperature, mask)
        if self.beta > 0:
            hard = channel_argmax(t_logits, dim=1)  # torch's CPU argmax over channels is ~20x slower
            if mask is None:
                terms["kd_dice"] = self.beta * self.dice(s_logits.float(), hard)
            else:  # MONAI's MaskedDiceLoss masks before its softmax and one-hot: mask the probabilities instead
                onehot = F.one_hot(hard[:, 0], t_logits.shape[1]).movedim(-1, 1).float()
                terms["kd_dice"] = self.beta * self.masked_dice(F.softmax(s_logits.float(), dim=1) * mask, onehot * mask)
        if self.gamma > 0:
            t_feats = teacher.get("features")
            terms["kd_feat"] = self.gamma * self.feature_term(
                student.get("features"), None if t_feats is None else t_feats.detach())
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        if mask is not None:
            self.last_terms["kd_confident"] = float(mask.mean())
        return torch.stack(list(terms.values())).sum()


class TaskAgnosticKDLoss(TaskSpecificKDLoss):
    """Feature-only distillation: ``gamma * MSE(resize(proj(f_s)), e_t)``; logits are not used (under
    ``DistributedDataParallel`` the decoder then gets no gradient: wrap the student with ``find_unused_parameters``).

    Args:
        student_channels: the student's ``feature_channels``.
        teacher_channels: channels of the VFM encoder's embedding (256 for SAM-family encoders).
        gamma: weight of the feature term.
    """

    needs_logits = False

    def __init__(self, student_channels: int, teacher_channels: int = 256, gamma: float = 1.0) -> None:
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0 for feature-only distillation, got {gamma}")
        super().__init__(student_channels, teacher_channels, alpha=0.0, beta=0.0, gamma=gamma)
