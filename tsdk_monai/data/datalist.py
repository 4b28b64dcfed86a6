"""MSD-style datalists: reading, validation and path resolution.

A tsdk datalist is a JSON file::

    {
      "name": "hc18", "num_classes": 2, "labels": {"0": "background", "1": "foreground"},
      "training":   [{"image": "images/000_HC.png", "label": "labels/000_HC.png", "group": "000"}, ...],
      "validation": [{"image": ..., "label": ..., "group": ...}, ...],
      "unlabeled":  [{"image": ..., "group": ...}, ...],
      "test":       [{"image": ..., "label": ..., "group": ...}, ...],
      ...provenance: seed, n_labeled, test_fraction, val_fraction, group_pattern
    }

``training`` is the labelled subset the later stages may use, ``unlabeled`` holds images whose labels are
hidden, ``validation`` is for model selection and ``test`` is held out from every stage. Paths are
relative to the datalist's folder and may not leave it (an absolute path, ``../``) unless ``allow_outside=True``
or, for the bundles, the environment variable ``TSDK_ALLOW_OUTSIDE=1``: a datalist from elsewhere cannot make a
stage read (and copy into its outputs) files outside the data set's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tsdk_monai.utils import TSDKInputError, read_json

__all__ = ["SPLITS", "LABELLED_SPLITS", "ALLOW_OUTSIDE_ENV", "load_datalist", "load_split", "num_classes_of"]

SPLITS = ("training", "validation", "unlabeled", "test")
LABELLED_SPLITS = ("training", "validation", "test")
ALLOW_OUTSIDE_ENV = "TSDK_ALLOW_OUTSIDE"  # "1": datalist paths may be absolute or leave the datalist's folder
_HOW_TO_ALLOW = f"set {ALLOW_OUTSIDE_ENV}=1 or pass allow_outside=True to accept it"


def _allow_outside(value: bool | None) -> bool:
    return os.environ.get(ALLOW_OUTSIDE_ENV, "") in ("1", "true", "True") if value is None else bool(value)


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "datalist file not found", "not a valid JSON datalist")
    if not isinstance(data, dict):
        raise TSDKInputError(f"{path}: a datalist must be a JSON object with keys {', '.join(SPLITS)}")
    return data


def _resolve(root: Path, rel: Any, datalist: Path, where: str, allow_outside: bool, check_files: bool) -> str:
    if not isinstance(rel, str) or not rel:
        raise TSDKInputError(f"{datalist}: {where} must be a non-empty path string, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() and not allow_outside:
        raise TSDKInputError(
            f"{datalist}: {where} is an absolute path ({rel}); paths must be relative to the datalist's folder "
            f"({_HOW_TO_ALLOW})"
        )
    full = Path(os.path.normpath(root / p))
    if not allow_outside and os.path.commonpath([full, root]) != str(root):
        raise TSDKInputError(
            f"{datalist}: {where} ({rel}) leaves the datalist's folder {root} ({_HOW_TO_ALLOW})"
        )
    if check_files and not full.is_file():
        raise TSDKInputError(f"{datalist}: {where} refers to a missing file {full}")
    return str(full)


def load_datalist(
    path: str | os.PathLike, check_files: bool = True, allow_outside: bool | None = None
) -> dict[str, Any]:
    """Read and validate a datalist; return it with every image/label path made absolute.

    Checks: valid JSON object; every split a list of objects with ``image`` (and ``label`` for labelled splits);
    paths inside the datalist's folder (``allow_outside``: ``None`` reads ``TSDK_ALLOW_OUTSIDE``); files present;
    no image listed twice. Image contents are checked where they are read (``tsdk prepare`` and the bundles'
    transforms).

    Raises:
        TSDKInputError: naming the datalist and the entry at fault.
    """
    path = Path(path).absolute()
    allow_outside = _allow_outside(allow_outside)
    data = _read_json(path)
    root = Path(os.path.normpath(path.parent))
    out = dict(data)
    seen: dict[str, str] = {}
    total = 0
    for split in SPLITS:
        items = data.get(split, [])
        if not isinstance(items, list):
            raise TSDKInputError(f"{path}: '{split}' must be a list of cases")
        resolved = []
        for i, item in enumerate(items):
            where = f"{split}[{i}]"
            if isinstance(item, str):  # MSD allows bare image paths in 'unlabeled'/'test'
                item = {"image": item}
            if not isinstance(item, dict) or "image" not in item:
                raise TSDKInputError(f"{path}: {where} must be an object with an 'image' key")
            case = dict(item)
            case["image"] = _resolve(root, item["image"], path, f"{where}.image", allow_outside, check_files)
            if split in LABELLED_SPLITS:
                if "label" not in item:
                    raise TSDKInputError(f"{path}: {where} has no 'label'; every '{split}' case needs one")
                case["label"] = _resolve(root, item["label"], path, f"{where}.label", allow_outside, check_files)
            if case["image"] in seen:
                raise TSDKInputError(f"{path}: {where}.image {item['image']} is listed twice (also in {seen[case['image']]})")
            seen[case["image"]] = where
            resolved.append(case)
        out[split] = resolved
        total += len(resolved)
    if total == 0:
        raise TSDKInputError(f"{path}: the datalist is empty (no case in {', '.join(SPLITS)})")
    return out


def load_split(
    path: str | os.PathLike, split: str, allow_empty: bool = False, allow_outside: bool | None = None
) -> list[dict[str, Any]]:
    """The cases of one split with absolute paths, for a bundle's dataset (``$tsdk_monai.data.load_split(...)``)."""
    if split not in SPLITS:
        raise TSDKInputError(f"{path}: unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    cases = load_datalist(path, allow_outside=allow_outside)[split]
    if not cases and not allow_empty:
        raise TSDKInputError(f"{path}: split '{split}' has no cases")
    return cases


def num_classes_of(path: str | os.PathLike) -> int:
    """The datalist's ``num_classes`` (background included)."""
    data = _read_json(Path(path))
    n = data.get("num_classes")
    if not isinstance(n, int) or n < 2:
        raise TSDKInputError(f"{path}: 'num_classes' must be an integer >= 2 (background included), got {n!r}")
    return n
