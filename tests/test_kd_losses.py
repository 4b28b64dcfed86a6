"""The KD losses: zero at agreement, growing with disagreement, gradients to the student and projection only."""

from __future__ import annotations

import pytest
import torch

from tsdk_monai.losses import TaskAgnosticKDLoss, TaskSpecificKDLoss, kd_kl_div
from tsdk_monai.networks.students import build_student

torch.set_num_threads(2)


def _pair(s_logits=None, t_logits=None, s_feats=None, t_feats=None):
    """The loss's two arguments: the student's and the teacher's ``{"logits", "features"}``."""
    return {"logits": s_logits, "features": s_feats}, {"logits": t_logits, "features": t_feats}


def _identity_projection(loss: TaskSpecificKDLoss) -> None:
    with torch.no_grad():
        w = loss.projection.proj.weight
        w.zero_()
        w[:, :, 0, 0].copy_(torch.eye(w.shape[0], w.shape[1]))
        loss.projection.proj.bias.zero_()


def test_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    loss = TaskSpecificKDLoss(student_channels=8, teacher_channels=8, alpha=1.0, beta=1.0, gamma=1.0, temperature=2.0)
    _identity_projection(loss)
    # a confident teacher: Dice of the softmax against its hard labels is 0 only as probabilities saturate
    labels = torch.randint(0, 3, (2, 32, 32))
    t = 30.0 * torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    f = torch.randn(2, 8, 8, 8)
    value = loss(*_pair(t.clone(), t, f.clone(), f))
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.last_terms["kd_kl"] == pytest.approx(0.0, abs=1e-6)
    assert loss.last_terms["kd_feat"] == pytest.approx(0.0, abs=1e-8)
    # the KL and feature terms are exactly 0 for any (not just confident) logits
    t = torch.randn(2, 3, 32, 32)
    assert kd_kl_div(t.clone(), t, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    agn = TaskAgnosticKDLoss(student_channels=8, teacher_channels=8)
    _identity_projection(agn)
    assert agn(*_pair(None, None, f.clone(), f)).item() == pytest.approx(0.0, abs=1e-8)


def test_grows_with_disagreement():
    torch.manual_seed(0)
    loss = TaskSpecificKDLoss(student_channels=8, teacher_channels=8, temperature=2.0)
    _identity_projection(loss)
    t, f = torch.randn(2, 3, 32, 32) * 4, torch.randn(2, 8, 8, 8)
    noise_t, noise_f = torch.randn_like(t) * 4, torch.randn_like(f)
    values, terms = [], []
    for eps in (0.0, 0.25, 0.5, 1.0, 2.0):
        values.append(loss(*_pair(t + eps * noise_t, t, f + eps * noise_f, f)).item())
        terms.append(dict(loss.last_terms))
    assert all(a < b for a, b in zip(values, values[1:])), values
    for key in ("kd_kl", "kd_feat"):
        series = [d[key] for d in terms]
        assert series[0] == pytest.approx(0.0, abs=1e-6)
        assert all(a < b for a, b in zip(series, series[1:])), (key, series)


def test_weights_and_temperature_are_configurable():
    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    only_kl = TaskSpecificKDLoss(alpha=2.0, beta=0.0, gamma=0.0, temperature=4.0)
    assert only_kl.projection is None and not only_kl.needs_features
    assert only_kl(*_pair(s, t)).item() == pytest.approx(2.0 * kd_kl_div(s, t, 4.0).item(), rel=1e-6)
    assert set(only_kl.last_terms) == {"kd_kl"}
    with pytest.raises(ValueError, match="student_channels"):
        TaskSpecificKDLoss(gamma=1.0)
    with pytest.raises(ValueError, match="temperature"):
        TaskSpecificKDLoss(student_channels=4, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        only_kl(*_pair(torch.randn(2, 2, 16, 16), torch.randn(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="gamma"):
        TaskAgnosticKDLoss(student_channels=4, gamma=0.0)


@pytest.mark.parametrize("kind", ["task_specific", "task_agnostic"])
def test_gradients_reach_student_and_projection_only(kind):
    torch.manual_seed(0)
    student = build_student("unet_small", num_classes=2, img_size=32)
    teacher = build_student("vit_tiny", num_classes=2, img_size=32)  # any real network stands in for the teacher
    for p in teacher.parameters():
        p.requires_grad_(True)  # even a teacher that would accept gradients must not receive any
    if kind == "task_specific":
        loss = TaskSpecificKDLoss(student.feature_channels, teacher.feature_channels)
    else:
        loss = TaskAgnosticKDLoss(student.feature_channels, teacher.feature_channels)
    x = torch.rand(2, 1, 32, 32)
    t_logits, t_feats = teacher.forward_with_features(x)  # not detached on purpose: the loss must detach
    s_logits, s_feats = student.forward_with_features(x)
    loss(*_pair(s_logits, t_logits, s_feats, t_feats)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert loss.projection.proj.weight.grad is not None and loss.projection.proj.weight.grad.abs().sum() > 0
    if kind == "task_agnostic":  # features only: the decoder gets nothing
        assert student.final_conv.weight.grad is None


def test_confidence_mask_ignores_the_teachers_unsure_pixels():
    """With ``confidence`` the KL and Dice terms see only the pixels where the teacher is sure: a student that is
    wrong only where the teacher is unsure has no KL loss, and one wrong where it is sure does."""
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 16, 16))
    t = 10.0 * torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    unsure = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    unsure[:, :, :, :8] = True
    t = torch.where(unsure, torch.zeros_like(t), t)  # uniform (p = 1/3) on the left half
    s = torch.where(unsure, 10.0 * torch.randn_like(t), t)  # the student differs only there
    masked = TaskSpecificKDLoss(alpha=1.0, beta=1.0, gamma=0.0, confidence=0.6)
    plain = TaskSpecificKDLoss(alpha=1.0, beta=1.0, gamma=0.0)
    masked(*_pair(s, t))
    plain(*_pair(s, t))
    assert masked.last_terms["kd_kl"] == pytest.approx(0.0, abs=1e-6)
    assert masked.last_terms["kd_confident"] == pytest.approx(0.5)
    assert plain.last_terms["kd_kl"] > 0.1 and "kd_confident" not in plain.last_terms
    assert masked.last_terms["kd_dice"] < plain.last_terms["kd_dice"]
    wrong = t.roll(1, dims=1)  # wrong on the sure half too
    masked(*_pair(wrong, t))
    assert masked.last_terms["kd_kl"] > 1.0
    # the masked Dice term is the plain one when every pixel is sure
    sure_t = 10.0 * torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    s2 = torch.randn(2, 3, 16, 16)
    assert masked(*_pair(s2, sure_t)).item() == pytest.approx(plain(*_pair(s2, sure_t)).item(), rel=1e-5)
    with pytest.raises(ValueError, match="confidence"):
        TaskSpecificKDLoss(gamma=0.0, confidence=1.0)
