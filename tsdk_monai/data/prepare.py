"""``tsdk prepare``: build a datalist from a folder of images and a folder of labels.

Every pair is read and checked first (readable, same spatial size, integer labels in range); then the
cases are split by group (patient/exam id) with a seed into test / validation / labelled / unlabelled; then
the files are copied into the output folder and the datalist is written last, atomically. Re-running with
the same arguments reproduces the same bytes; an output folder holding a different datalist is refused.
"""

from __future__ import annotations

import filecmp
import logging
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from tsdk_monai.data.io import check_label_values, image_stem, is_image_file, read_array
from tsdk_monai.utils import TSDKInputError, atomic_copy, atomic_write_json, dumps_json

__all__ = ["DEFAULT_GROUP_PATTERN", "group_of", "split_groups", "prepare"]

logger = logging.getLogger(__name__)

# HC18 ids "010_HC" and "010_2HC" come from one examination: the leading digits are the group.
DEFAULT_GROUP_PATTERN = r"^\d+"
DATALIST_NAME = "datalist.json"


def group_of(stem: str, pattern: str = DEFAULT_GROUP_PATTERN) -> str:
    """The group id of a case: the first capture group (or whole match) of ``pattern``; the stem if none."""
    m = re.search(pattern, stem)
    if m is None:
        return stem
    return m.group(1) if m.groups() else m.group(0)


def split_groups(
    groups: dict[str, list[str]],
    n_labeled: int,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> dict[str, list[str]]:
    """Split cases by group: no group straddles two splits.

    Args:
        groups: group id -> case stems.
        n_labeled: exact number of cases in ``training`` (the labelled subset).
        seed: seed of the group permutation.
        test_fraction: share of groups held out for ``test`` (at least one group).
        val_fraction: share of groups for ``validation`` (at least one group when > 0).

    Returns:
        split name -> sorted case stems, for ``training``, ``validation``, ``unlabeled``, ``test``.
    """
    if not 0 < test_fraction < 1:
        raise TSDKInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise TSDKInputError(f"val_fraction must be in [0, 1) with test_fraction + val_fraction < 1, got {val_fraction}")
    if int(n_labeled) != n_labeled or n_labeled < 1:
        raise TSDKInputError(f"n_labeled must be a positive integer (the number of labelled cases), got {n_labeled}")
    names = sorted(groups)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test = max(1, math.floor(len(names) * test_fraction + 0.5))
    n_val = max(1, math.floor(len(names) * val_fraction + 0.5)) if val_fraction > 0 else 0
    if n_test + n_val >= len(names):
        raise TSDKInputError(
            f"only {len(names)} groups: too few to hold out {n_test} test and {n_val} validation groups "
            "and keep a training pool"
        )
    test, val, pool = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    pool_size = sum(len(groups[g]) for g in pool)
    if n_labeled > pool_size:
        raise TSDKInputError(
            f"n_labeled={n_labeled} is larger than the labelled pool: {pool_size} cases remain after holding out "
            f"{n_test} test and {n_val} validation groups"
        )
    labelled: list[str] = []
    count = 0
    for g in pool:
        if count + len(groups[g]) <= n_labeled:
            labelled.append(g)
            count += len(groups[g])
        if count == n_labeled:
            break
    if count != n_labeled:
        raise TSDKInputError(
            f"cannot pick exactly n_labeled={n_labeled} cases from whole groups (the closest is {count}); "
            "choose another n_labeled or seed, or a finer group_pattern"
        )
    unlabelled = [g for g in pool if g not in set(labelled)]

    def stems(gs: Sequence[str]) -> list[str]:
        return sorted(s for g in gs for s in groups[g])

    return {"training": stems(labelled), "validation": stems(val), "unlabeled": stems(unlabelled), "test": stems(test)}


def _index(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise TSDKInputError(f"{folder}: {what} folder not found")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not is_image_file(p):
            continue
        stem = image_stem(p)
        if stem in files:
            raise TSDKInputError(f"{p}: two {what} files share the name '{stem}' ({files[stem].name})")
        files[stem] = p
    if not files:
        raise TSDKInputError(f"{folder}: no {what} files found (expected PNG or NIfTI files)")
    return files


def _check_pairs(images: dict[str, Path], labels: dict[str, Path], num_classes: int | None) -> int:
    only_img = sorted(set(images) - set(labels))
    only_lab = sorted(set(labels) - set(images))
    if only_img:
        raise TSDKInputError(f"{images[only_img[0]]}: no label file with the same name ({len(only_img)} images lack one)")
    if only_lab:
        raise TSDKInputError(f"{labels[only_lab[0]]}: no image file with the same name ({len(only_lab)} labels lack one)")
    max_label = 0
    first: tuple[int, Path] | None = None  # spatial dimensions of the first image: a data set is all 2D or all 3D
    for stem in tqdm(sorted(images), desc="checking pairs", unit="case", leave=False):
        img = read_array(images[stem], "image")
        lab = read_array(labels[stem], "label")
        if first is None:
            first = (img.ndim - 1, images[stem])
        elif img.ndim - 1 != first[0]:
            raise TSDKInputError(
                f"{images[stem]}: image is {img.ndim - 1}D but {first[1].name} is {first[0]}D; "
                "all images of a data set must have the same number of dimensions"
            )
        if img.shape[1:] != lab.shape[1:]:
            raise TSDKInputError(
                f"{labels[stem]}: label size {tuple(lab.shape[1:])} does not match image {images[stem].name} "
                f"size {tuple(img.shape[1:])}"
            )
        max_label = max(max_label, check_label_values(lab, labels[stem], num_classes))
    return max_label


def _place(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` unless the same bytes are already there; refuse to overwrite other bytes."""
    if dst.exists():
        if filecmp.cmp(src, dst, shallow=False):
            return
        raise TSDKInputError(f"{dst}: already exists with other content; use an empty output folder")
    atomic_copy(src, dst)


def prepare(
    images: str,
    labels: str,
    out: str,
    n_labeled: int = 80,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    group_pattern: str = DEFAULT_GROUP_PATTERN,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | None = None,
    name: str | None = None,
) -> Path:
    """Check an images/labels folder pair, split it by group and write ``OUT/datalist.json``.

    Images and labels are paired by file name without suffix and copied to ``OUT/images`` and ``OUT/labels``
    so that the output folder is self-contained (paths in the datalist are relative to it).

    Args:
        images: folder of images (PNG, NIfTI, ...).
        labels: folder of label maps with the same names (integer class indices, 0 = background).
        out: output folder.
        n_labeled: labelled cases the later stages may use (the ``training`` split).
        seed: seed of the split.
        test_fraction: share of groups held out for testing.
        val_fraction: share of groups for validation.
        group_pattern: regular expression whose first match in a file stem is the case's group
            (patient/exam); default: leading digits, so ``010_HC`` and ``010_2HC`` share group ``010``.
        num_classes: number of classes including background; default: the largest label value + 1.
        class_names: names of the classes, background first (a list or a comma-separated string).
        name: data set name recorded in the datalist; default: the name of the folder holding IMAGES.

    Returns:
        The path of the written datalist.
    """
    images_dir, labels_dir, out_dir = Path(images), Path(labels), Path(out)
    img_files, lab_files = _index(images_dir, "image"), _index(labels_dir, "label")
    max_label = _check_pairs(img_files, lab_files, num_classes)
    n_cls = int(num_classes) if num_classes is not None else max(2, max_label + 1)
    if isinstance(class_names, str):
        class_names = [c.strip() for c in class_names.split(",")]
    if class_names is None:
        class_names = ["background"] + ([f"class_{i}" for i in range(1, n_cls)] if n_cls > 2 else ["foreground"])
    if len(class_names) != n_cls:
        raise TSDKInputError(f"class_names has {len(class_names)} names for {n_cls} classes")

    groups: dict[str, list[str]] = {}
    for stem in img_files:
        groups.setdefault(group_of(stem, group_pattern), []).append(stem)
    splits = split_groups(groups, n_labeled, seed, test_fraction, val_fraction)

    def entry(stem: str, labelled: bool) -> dict[str, Any]:
        e = {"image": f"images/{img_files[stem].name}", "group": group_of(stem, group_pattern)}
        if labelled:
            e["label"] = f"labels/{lab_files[stem].name}"
        return e

    datalist: dict[str, Any] = {
        "name": name or images_dir.absolute().parent.name,
        "description": "made by tsdk prepare",
        "num_classes": n_cls,
        "labels": {str(i): c for i, c in enumerate(class_names)},
        "seed": int(seed),
        "n_labeled": int(n_labeled),
        "test_fraction": float(test_fraction),
        "val_fraction": float(val_fraction),
        "group_pattern": group_pattern,
    }
    for split, stems in splits.items():
        datalist[split] = [entry(s, split != "unlabeled") for s in stems]

    target = out_dir / DATALIST_NAME
    if target.exists() and target.read_text(encoding="utf-8", errors="replace") != dumps_json(datalist):
        raise TSDKInputError(
            f"{target}: the output folder already holds a different datalist; choose another output folder "
            "or remove it first"
        )
    for stem in tqdm(sorted(img_files), desc="copying", unit="case", leave=False):
        _place(img_files[stem], out_dir / "images" / img_files[stem].name)
        _place(lab_files[stem], out_dir / "labels" / lab_files[stem].name)
    atomic_write_json(target, datalist)
    logger.info(
        "wrote %s: %s", target, ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    )
    return target
