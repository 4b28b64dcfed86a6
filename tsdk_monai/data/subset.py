"""Few-label subsets of a prepared datalist, for runs over several numbers of labels and seeds.

``subset_datalist(D, OUT, n_labeled, seed)`` writes ``OUT/datalist.json``: the same ``validation`` and ``test``
splits as ``D``, ``n_labeled`` cases of ``D``'s labelled pool (``training``) as ``training``, and the rest of the
pool moved into ``unlabeled`` as images only (their labels hidden). Together ``training + unlabeled`` hold the
same images for every ``n_labeled``, so stages that use no labels can be shared between them.

The choice: ``D``'s pool groups (the ``group`` key written by ``tsdk prepare``; else the file name's group) in a
permutation drawn with ``seed``, cases taken group by group in that order (within a group by file name) until
``n_labeled`` are taken. So the subsets of one seed are nested (the 20 labels are among the 40) and at most one
group is split between labelled and unlabelled (both are training data; validation and test groups stay whole).

Paths in ``OUT/datalist.json`` stay relative to its own folder: ``OUT`` gets a symbolic link for each top-level
entry of ``D``'s folder that the datalist refers to (``images``, ``labels``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tsdk_monai.data.datalist import _read_json, load_datalist
from tsdk_monai.data.io import image_stem
from tsdk_monai.data.prepare import DATALIST_NAME, group_of
from tsdk_monai.utils import TSDKInputError, atomic_write_json

__all__ = ["subset_datalist", "labelled_pool_size"]


def labelled_pool_size(datalist: str | os.PathLike) -> int:
    """The number of cases in the datalist's labelled pool (its ``training`` split)."""
    return len(load_datalist(datalist)["training"])


def _link_sources(src_root: Path, out: Path, raw: dict[str, Any], datalist: Path) -> None:
    tops: set[str] = set()
    for split in ("training", "validation", "unlabeled", "test"):
        for item in raw.get(split, []):
            for key in ("image", "label"):
                rel = item.get(key) if isinstance(item, dict) else (item if key == "image" else None)
                if rel:
                    tops.add(Path(rel).parts[0])
    out.mkdir(parents=True, exist_ok=True)
    for top in sorted(tops):
        target = (src_root / top).resolve()
        link = out / top
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                continue
            link.unlink()
        elif link.exists():
            raise TSDKInputError(f"{link}: exists and is not a link to {target}; use another output folder for "
                                 f"the subsets of {datalist}")
        link.symlink_to(target, target_is_directory=target.is_dir())


def subset_datalist(datalist: str | os.PathLike, out: str | os.PathLike, n_labeled: int, seed: int = 0) -> Path:
    """Write ``out/datalist.json``: ``n_labeled`` labelled cases of ``datalist``'s pool chosen with ``seed``.

    Args:
        datalist: a datalist made by ``tsdk prepare`` (its ``training`` split is the labelled pool).
        out: output folder (made; gets links to the data folders of ``datalist``).
        n_labeled: labelled cases to keep, 1 .. the pool size.
        seed: seed of the choice (see the module docstring; nested subsets for one seed).

    Returns:
        The path of the written datalist (written atomically; the same arguments write the same bytes).

    Raises:
        TSDKInputError: the datalist is invalid, or ``n_labeled`` is not in 1 .. the pool size (naming the datalist).
    """
    datalist, out = Path(datalist).absolute(), Path(out).absolute()
    load_datalist(datalist)  # validates every entry and that its files exist
    raw = _read_json(datalist)
    pool = list(raw.get("training", []))
    if isinstance(n_labeled, bool) or int(n_labeled) != n_labeled or not 1 <= int(n_labeled) <= len(pool):
        raise TSDKInputError(
            f"{datalist}: n_labeled={n_labeled} must be an integer from 1 to the size of its labelled pool "
            f"('training', {len(pool)} cases); prepare the data with a larger --n_labeled for more"
        )
    n_labeled = int(n_labeled)
    pattern = raw.get("group_pattern") or r"^\d+"
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in pool:
        g = str(item.get("group") or group_of(image_stem(item["image"]), pattern))
        groups.setdefault(g, []).append(item)
    names = sorted(groups)
    order = [names[i] for i in np.random.default_rng(int(seed)).permutation(len(names))]
    ranked = [item for g in order for item in sorted(groups[g], key=lambda it: it["image"])]
    chosen, rest = ranked[:n_labeled], ranked[n_labeled:]

    def by_image(items: list[Any]) -> list[Any]:
        return sorted(items, key=lambda it: it["image"] if isinstance(it, dict) else it)

    derived = {k: v for k, v in raw.items() if k not in ("training", "unlabeled")}
    derived.update({
        "description": f"{n_labeled} labelled cases of {datalist} chosen with seed {seed} (tsdk subset_datalist)",
        "n_labeled": n_labeled,
        "subset_seed": int(seed),
        "source_datalist": str(datalist),
        "training": by_image(chosen),
        "unlabeled": by_image(list(raw.get("unlabeled", [])) + [{k: v for k, v in it.items() if k != "label"}
                                                               for it in rest]),
    })
    _link_sources(datalist.parent, out, raw, datalist)
    target = atomic_write_json(out / DATALIST_NAME, derived)
    load_datalist(target)  # the links resolve every path
    return target
