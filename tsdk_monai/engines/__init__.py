"""What the stages' MONAI trainers need beyond MONAI: the diffusion trainer and sampler (synthesis stage), the
distillation's prepare-batch and teacher cache, autocast on any device type."""

from tsdk_monai.engines.amp import amp_dtype, autocast
from tsdk_monai.engines.diffusion import (
    DiffusersInferer,
    DiffusionTrainer,
    MinSNRLoss,
    diffusion_training_cases,
    load_weights,
)
from tsdk_monai.engines.distill import (
    DistillationPrepareBatch,
    TeacherCache,
    cache_tag,
    keep_confident,
    teacher_targets,
)
from tsdk_monai.engines.sampler import SYNTHETIC_DATALIST, DiffusionSampler, encode_image, sample_images

__all__ = [
    "amp_dtype", "autocast",
    "DiffusersInferer", "DiffusionTrainer", "MinSNRLoss", "diffusion_training_cases", "load_weights",
    "DistillationPrepareBatch", "TeacherCache", "cache_tag", "keep_confident", "teacher_targets",
    "SYNTHETIC_DATALIST", "DiffusionSampler", "encode_image", "sample_images",
]
