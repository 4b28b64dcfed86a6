"""MoCo v3 (Chen, Xie and He, 2021) pre-training of a student's encoder: contrast two augmented views.

- Base encoder: the student's encoder features (``forward_features``, ``(B, Cs, H/16, W/16)``) global-average
  pooled to ``(B, Cs)``, then a projection MLP (3 layers, as MoCo v3 for ViTs) to ``(B, dim)``; the query side
  adds a prediction MLP (2 layers). Only the student's encoder trains: its decoder is never called, so it keeps
  its initialisation (under ``DistributedDataParallel`` use ``find_unused_parameters=True``).
- Momentum encoder: a copy of student + projector, no gradients, moved at the start of every training step by an
  EMA ``theta_m <- m * theta_m + (1 - m) * theta`` (:meth:`MoCoV3.momentum_update`, as MoCo v3's ``forward``; so
  the objective is a plain module for any trainer and ``DistributedDataParallel``; ``m`` fixed from the config,
  0.99 by default; MoCo v3 ramps ``m`` to 1 with a cosine, which we leave out for short schedules).
- Loss: symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)``, ``ctr(q, k) = 2 tau * CE(q k^T / tau, positives on
  the diagonal)`` with L2-normalised ``q``, ``k`` and temperature ``tau`` (0.2). Under ``torch.distributed`` the
  keys of all ranks are gathered (no gradient), so every rank contrasts against the whole global batch (equal
  batch sizes per rank: ``DistributedSampler`` + ``drop_last``).
- MLP heads use BatchNorm1d as MoCo v3 (the last projector BN without affine), always with batch statistics
  (``track_running_stats=False``): the heads only ever run in training mode and are dropped after pre-training, so
  running statistics would serve nothing, and without them no buffer can drift apart between ranks. BN centres the
  pooled features across the batch, which makes the images of a batch discriminable from the first step (with
  ``head_norm="layer"`` a fresh student's near-identical pooled features make the start much slower). Every rank
  needs more than one sample per step (the bundle drops the last incomplete batch). In one process the batch is
  the global batch, as with MoCo v3's SyncBatchNorm; on GPUs the multi-process bundle converts the heads to
  SyncBatchNorm; on CPUs (gloo has none) each rank normalises its own part of the batch.

The two views go through the student backbone as one batch ``(2B, C, H, W)`` (the students normalise per
sample: instance/layer norm, so this equals two separate calls and costs one) and through the heads separately
(BN statistics per view, as MoCo v3).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tsdk_monai.ssl.method import MethodState

__all__ = ["MLPHead", "InfoNCELoss", "MoCoV3", "concat_all_gather"]


class MLPHead(nn.Sequential):
    """MoCo v3's MLP: ``num_layers`` linear layers, norm + ReLU between them, optional norm at the end.

    Args:
        num_layers: number of linear layers (>= 1).
        in_dim, hidden_dim, out_dim: widths.
        last_norm: add a final normalisation without affine parameters (MoCo v3's projector).
        norm: ``"batch"`` (BatchNorm1d with batch statistics only, MoCo v3), ``"layer"`` (LayerNorm) or ``"none"``.

    ``(B, in_dim)`` -> ``(B, out_dim)``.
    """

    NORMS = ("batch", "layer", "none")

    def __init__(self, num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_norm: bool = False,
                 norm: str = "batch") -> None:
        if norm not in self.NORMS:
            raise ValueError(f"head norm must be one of {', '.join(self.NORMS)}, got {norm!r}")
        if num_layers < 1:
            raise ValueError(f"an MLP head needs at least one layer, got {num_layers}")

        def make_norm(dim: int, affine: bool = True) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm1d(dim, affine=affine, track_running_stats=False)
            if norm == "layer":
                return nn.LayerNorm(dim, elementwise_affine=affine)
            return nn.Identity()

        layers: list[nn.Module] = []
        for i in range(num_layers):
            d_in = in_dim if i == 0 else hidden_dim
            d_out = out_dim if i == num_layers - 1 else hidden_dim
            layers.append(nn.Linear(d_in, d_out, bias=norm == "none"))
            if i < num_layers - 1:
                layers += [make_norm(d_out), nn.ReLU(inplace=True)]
            elif last_norm:
                layers.append(make_norm(d_out, affine=False))
        super().__init__(*layers)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` on each of ``W`` ranks -> ``(W * N, D)`` in rank order, no gradient; ``x`` itself when
    ``torch.distributed`` is not initialised or has one rank. Every rank must give the same ``N``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class InfoNCELoss(nn.Module):
    """MoCo v3's contrastive loss ``2 tau * CE(q k^T / tau, labels)``: query ``i`` of this rank is positive with
    key ``i`` of this rank, negative with every other key (of all ranks when ``gather`` and distributed).

    Args:
        temperature: ``tau``.
        gather: gather the keys of all ranks under ``torch.distributed``.

    ``forward(q (N, D), k (N, D))`` -> scalar; ``q`` and ``k`` are L2-normalised inside; no gradient reaches
    ``k`` from the other ranks.
    """

    def __init__(self, temperature: float = 0.2, gather: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.gather = float(temperature), bool(gather)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if q.shape != k.shape or q.ndim != 2:
            raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must both be (N, D)")
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        offset = 0
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            k = concat_all_gather(k)
            offset = q.shape[0] * dist.get_rank()
        logits = q @ k.t() / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels) * (2 * self.temperature)


class MoCoV3(MethodState, nn.Module):
    """MoCo v3 on a student's encoder (see the module docstring).

    Args:
        student: a student with ``forward_features`` and ``feature_channels`` (``build_student(...)``).
        dim: output width of projector and predictor.
        proj_hidden_dim, pred_hidden_dim: hidden widths of the projection and prediction MLPs.
        proj_layers, pred_layers: their depths (3 and 2 in MoCo v3 for ViTs).
        momentum: EMA momentum ``m`` of the momentum encoder.
        temperature: InfoNCE temperature ``tau``.
        head_norm: ``"batch"`` (MoCo v3), ``"layer"`` or ``"none"`` in the MLP heads.
        gather_keys: contrast with the keys of all ranks under ``torch.distributed``.

    ``forward(x1 (B, C, H, W), x2 (B, C, H, W))`` -> ``{"loss": scalar, "q1", "q2", "k1", "k2": (B, dim)}``;
    ``num_views`` = 2: the trainer gives two independently augmented views of the same images.
    """

    method = "mocov3"
    num_views = 2

    def __init__(self, student: nn.Module, dim: int = 128, proj_hidden_dim: int = 512, pred_hidden_dim: int = 512,
                 proj_layers: int = 3, pred_layers: int = 2, momentum: float = 0.99, temperature: float = 0.2,
                 head_norm: str = "batch", gather_keys: bool = True) -> None:
        super().__init__()
        if not hasattr(student, "forward_features") or not hasattr(student, "feature_channels"):
            raise TypeError(f"{type(student).__name__} has no forward_features/feature_channels (build it with build_student)")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.student = student
        self.projector = MLPHead(proj_layers, int(student.feature_channels), proj_hidden_dim, dim, last_norm=True,
                                 norm=head_norm)
        self.predictor = MLPHead(pred_layers, dim, pred_hidden_dim, dim, last_norm=False, norm=head_norm)
        self.momentum_student = copy.deepcopy(student).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.criterion = InfoNCELoss(temperature, gather_keys)

    @staticmethod
    def _pooled(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> globally average-pooled encoder features ``(N, feature_channels)``."""
        return student.forward_features(x).mean(dim=(-2, -1))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        if x1.shape != x2.shape:
            raise ValueError(f"the two views differ in shape: {tuple(x1.shape)} and {tuple(x2.shape)}")
        b = x1.shape[0]
        both = torch.cat([x1, x2], dim=0)
        h1, h2 = self._pooled(self.student, both).split(b)
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            if self.training:  # as MoCo v3: move the momentum encoder towards the current weights, then take keys
                self.momentum_update()
            m1, m2 = self._pooled(self.momentum_student, both).split(b)
            k1, k2 = self.momentum_projector(m1), self.momentum_projector(m2)
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        return {"loss": loss, "q1": q1, "q2": q2, "k1": k1, "k2": k2}

    def _pairs(self):
        for base, mom in ((self.student, self.momentum_student), (self.projector, self.momentum_projector)):
            yield from zip(base.parameters(), mom.parameters())

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """``theta_m <- m * theta_m + (1 - m) * theta`` for the momentum student and projector (``forward`` calls it in
        training mode before it computes the keys, as MoCo v3 does: the keys of step ``t`` come from the momentum
        encoder moved towards the weights of step ``t - 1``)."""
        m = self.momentum if momentum is None else float(momentum)
        for p, pm in self._pairs():
            pm.mul_(m).add_(p.detach(), alpha=1.0 - m)
