"""The distillation's (and the pre-training's) transfer set: the images a student learns from without labels."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tsdk_monai.data.datalist import load_split
from tsdk_monai.utils import TSDKInputError

__all__ = ["as_bool", "build_transfer_set"]

logger = logging.getLogger(__name__)


def as_bool(value: Any, name: str) -> bool:
    """A config switch given as a bool or as text (``--use_synthetic false`` on the command line is a string)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes", "on"):
            return True
        if v in ("false", "0", "no", "off", ""):
            return False
        raise TSDKInputError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def build_transfer_set(
    datalist: str | os.PathLike,
    use_unlabeled: bool = True,
    use_labeled: bool = True,
    synthetic_datalist: str | os.PathLike | None = None,
    use_synthetic: bool = True,
) -> list[dict[str, str]]:
    """The transfer set: ``[{"image": absolute path, "source": part}, ...]``.

    Parts (each switchable): ``unlabeled`` (the datalist's unlabelled real images), ``training`` (the labelled
    pool's images, pixels only: labels are dropped) and ``synthetic`` (the ``unlabeled`` list of the synthesis
    stage's ``synthetic_datalist.json``; skipped when ``synthetic_datalist`` is empty). Validation and test
    images are never part of it.

    Raises:
        TSDKInputError: a datalist is missing or invalid, or the transfer set is empty (naming the datalist).
    """
    use_unlabeled, use_labeled, use_synthetic = (as_bool(v, n) for v, n in (
        (use_unlabeled, "use_unlabeled"), (use_labeled, "use_labeled"), (use_synthetic, "use_synthetic")))
    synthetic_datalist = None if synthetic_datalist in (None, "", "None", "none", "null") else synthetic_datalist
    parts: list[tuple[str, str, Any]] = []  # (source, split, datalist)
    if use_unlabeled:
        parts.append(("unlabeled", "unlabeled", datalist))
    if use_labeled:
        parts.append(("training", "training", datalist))
    if use_synthetic and synthetic_datalist:
        if not Path(synthetic_datalist).is_file():
            raise TSDKInputError(f"{synthetic_datalist}: synthetic datalist not found (set use_synthetic to false "
                                 "or synthetic_datalist to '' to distil without synthetic images)")
        parts.append(("synthetic", "unlabeled", synthetic_datalist))
    items: list[dict[str, str]] = []
    counts = {}
    for source, split, path in parts:
        cases = load_split(path, split, allow_empty=True)  # paths confined to each datalist's folder
        items += [{"image": c["image"], "source": source} for c in cases]
        counts[source] = len(cases)
    if not items:
        raise TSDKInputError(
            f"{datalist}: the transfer set is empty (parts used: {counts or 'none'}); enable use_unlabeled, "
            "use_labeled or use_synthetic with a synthetic datalist"
        )
    logger.info("transfer set: %d images (%s)", len(items), ", ".join(f"{k} {v}" for k, v in counts.items()))
    return items
