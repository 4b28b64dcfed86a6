"""Distillation losses: task-specific (tempered KL + Dice to the teacher's labels + feature MSE), task-agnostic."""

from tsdk_monai.losses.kd import FeatureProjection, TaskAgnosticKDLoss, TaskSpecificKDLoss, kd_kl_div

__all__ = ["TaskSpecificKDLoss", "TaskAgnosticKDLoss", "FeatureProjection", "kd_kl_div"]
