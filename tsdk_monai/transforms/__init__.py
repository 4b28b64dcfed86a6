"""Transforms MONAI lacks: grey conversion of RGB inputs and label checks naming the file.

VFM input normalisation (grey to 3 channels, resize to the VFM's size, mean/std) lives inside
:class:`tsdk_monai.networks.VFMEncoder`, so every caller of a VFM gets it.
"""

from tsdk_monai.transforms.intensity import CheckLabeld, EnsureGrey, EnsureGreyd, source_name

__all__ = ["CheckLabeld", "EnsureGrey", "EnsureGreyd", "source_name"]
