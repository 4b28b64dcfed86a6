"""Networks: the VFM registry and encoders, the LoRA teacher, the students and the diffusion UNet."""

from tsdk_monai.networks.diffusion import build_diffusion_unet
from tsdk_monai.networks.students import STUDENTS, UNetSmall, ViTTinyUNETR, build_student, load_student_weights
from tsdk_monai.networks.teacher import (
    FINETUNE_MODES,
    LoRASegTeacher,
    PromptFreeMaskDecoder,
    build_teacher,
    count_parameters,
    load_teacher,
    log_trainable,
    read_teacher_config,
    save_teacher,
)
from tsdk_monai.networks.vfm import VFM_NAMES, VFMEncoder, build_vfm_encoder, load_vfm

__all__ = [
    "VFM_NAMES", "VFMEncoder", "build_vfm_encoder", "load_vfm",
    "FINETUNE_MODES", "LoRASegTeacher", "PromptFreeMaskDecoder", "build_teacher", "count_parameters",
    "load_teacher", "log_trainable", "read_teacher_config", "save_teacher",
    "STUDENTS", "UNetSmall", "ViTTinyUNETR", "build_student", "load_student_weights",
    "build_diffusion_unet",
]
