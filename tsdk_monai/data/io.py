"""Reading images and labels with MONAI readers, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tsdk_monai.utils import TSDKInputError

__all__ = ["IMAGE_SUFFIXES", "image_stem", "is_image_file", "read_array", "check_label_values"]

# Suffixes MONAI's LoadImage reads without optional readers (PIL for 2D, nibabel for NIfTI).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def image_stem(path: str | Path) -> str:
    """File name without its image suffix (``case_1.nii.gz`` -> ``case_1``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)


def read_array(path: str | Path, what: str = "image") -> np.ndarray:
    """Load ``path`` with MONAI's ``LoadImage`` and return a channel-first array ``(C, *spatial)``.

    Raises:
        TSDKInputError: the file is missing, empty or cannot be decoded, or holds NaN/Inf values.
    """
    from monai.transforms import LoadImage

    path = Path(path)
    if not path.is_file():
        raise TSDKInputError(f"{path}: {what} file not found")
    if path.stat().st_size == 0:
        raise TSDKInputError(f"{path}: {what} file is empty (0 bytes)")
    try:
        arr = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)(str(path))
    except Exception as exc:  # readers raise many types; the user needs the file name and the reason
        raise TSDKInputError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    if arr.size == 0:
        raise TSDKInputError(f"{path}: {what} has no pixels")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise TSDKInputError(f"{path}: {what} holds NaN or infinite values")
    return arr


def check_label_values(label: np.ndarray, path: str | Path, num_classes: int | None = None) -> int:
    """Check that ``label`` has one channel of integer values in ``[0, num_classes)``; return its max value."""
    if label.shape[0] != 1:
        raise TSDKInputError(f"{path}: label has {label.shape[0]} channels; a label map must have one")
    if np.issubdtype(label.dtype, np.floating) and not np.all(np.mod(label, 1) == 0):
        raise TSDKInputError(f"{path}: label values must be integers (class indices); found fractional values")
    lo, hi = int(label.min()), int(label.max())
    if lo < 0:
        raise TSDKInputError(f"{path}: label value {lo} is negative; class indices start at 0")
    if num_classes is not None and hi >= num_classes:
        raise TSDKInputError(f"{path}: label value {hi} is out of range for {num_classes} classes (0..{num_classes - 1})")
    return hi
