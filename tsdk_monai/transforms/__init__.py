"""Transforms MONAI lacks: a loader whose errors name the file, AsDiscrete with a fast argmax, grey conversion of RGB
inputs, label checks, the teacher's hard labels (distillation evaluation), the post-processing chosen on validation
(with a moment-ellipse shape prior), the square resize every bundle shares (squashed or letterboxed).

VFM input normalisation (grey to 3 channels, resize to the VFM's size, mean/std) lives inside
:class:`tsdk_monai.networks.VFMEncoder`, so every caller of a VFM gets it.
"""

from tsdk_monai.transforms.discrete import FastAsDiscrete, FastAsDiscreted
from tsdk_monai.transforms.geometry import SquareResized, letterbox_box, letterbox_pad
from tsdk_monai.transforms.intensity import CheckLabeld, EnsureGrey, EnsureGreyd, source_name
from tsdk_monai.transforms.io import CheckedLoadImaged
from tsdk_monai.transforms.postprocess import (
    POSTPROCESS_CHOICES,
    POSTPROCESS_DICE_TOLERANCE,
    ChosenPostprocessd,
    moment_ellipse,
    read_postprocess_choice,
    read_postprocess_record,
)
from tsdk_monai.transforms.teacher import TeacherLabeld

__all__ = [
    "CheckedLoadImaged", "CheckLabeld", "ChosenPostprocessd", "EnsureGrey", "EnsureGreyd", "FastAsDiscrete",
    "FastAsDiscreted", "POSTPROCESS_CHOICES", "POSTPROCESS_DICE_TOLERANCE",
    "SquareResized", "TeacherLabeld", "letterbox_box", "letterbox_pad", "moment_ellipse", "read_postprocess_choice",
    "read_postprocess_record",
    "source_name",
]
