"""Transforms MONAI lacks: a loader whose errors name the file, grey conversion of RGB inputs, label checks.

VFM input normalisation (grey to 3 channels, resize to the VFM's size, mean/std) lives inside
:class:`tsdk_monai.networks.VFMEncoder`, so every caller of a VFM gets it.
"""

from tsdk_monai.transforms.intensity import CheckLabeld, EnsureGrey, EnsureGreyd, source_name
from tsdk_monai.transforms.io import CheckedLoadImaged

__all__ = ["CheckedLoadImaged", "CheckLabeld", "EnsureGrey", "EnsureGreyd", "source_name"]
