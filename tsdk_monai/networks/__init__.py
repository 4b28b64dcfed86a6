"""Networks: the VFM registry and encoders, the LoRA teacher and its artefacts, the students and the diffusion UNet.

Teachers and students speak one protocol: ``forward(x)`` -> logits, ``forward_features(x)`` -> the feature map that
feature distillation matches, ``forward_with_features(x)`` -> both from one pass.
"""

from tsdk_monai.networks.diffusion import build_diffusion_unet
from tsdk_monai.networks.students import STUDENTS, UNetSmall, ViTTinyUNETR, build_student, load_student_weights
from tsdk_monai.networks.teacher import FINETUNE_MODES, LoRASegTeacher, PromptFreeMaskDecoder, count_parameters, log_trainable
from tsdk_monai.networks.teacher_io import (
    build_teacher,
    load_distill_teacher,
    load_teacher,
    read_teacher_config,
    resolve_teacher_dir,
    save_teacher,
)
from tsdk_monai.networks.vfm import VFM_NAMES, VFMEncoder, build_vfm_encoder, load_vfm

__all__ = [
    "VFM_NAMES", "VFMEncoder", "build_vfm_encoder", "load_vfm",
    "FINETUNE_MODES", "LoRASegTeacher", "PromptFreeMaskDecoder", "build_teacher", "count_parameters",
    "load_teacher", "log_trainable", "read_teacher_config", "save_teacher", "resolve_teacher_dir",
    "load_distill_teacher",
    "STUDENTS", "UNetSmall", "ViTTinyUNETR", "build_student", "load_student_weights",
    "build_diffusion_unet",
]
