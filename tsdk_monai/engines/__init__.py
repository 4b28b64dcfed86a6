"""Engines built on MONAI/ignite workflows: the diffusion trainer and sampler (synthesis stage)."""

from tsdk_monai.engines.diffusion import (
    DiffusersInferer,
    DiffusionTrainer,
    MinSNRLoss,
    diffusion_training_cases,
    load_weights,
)
from tsdk_monai.engines.sampler import SYNTHETIC_DATALIST, DiffusionSampler, encode_image, sample_images

__all__ = [
    "DiffusersInferer", "DiffusionTrainer", "MinSNRLoss", "diffusion_training_cases", "load_weights",
    "SYNTHETIC_DATALIST", "DiffusionSampler", "encode_image", "sample_images",
]

# distillation stage (issue 5)
from tsdk_monai.engines.distill import (  # noqa: E402
    DistillationTrainer,
    TeacherCache,
    TeacherLabeld,
    TeacherTargets,
    build_transfer_set,
    load_distill_teacher,
    save_student,
    student_forward,
    unwrap_module,
)

__all__ += [
    "DistillationTrainer", "TeacherCache", "TeacherLabeld", "TeacherTargets", "build_transfer_set", "student_forward",
    "unwrap_module", "load_distill_teacher", "save_student",
]
