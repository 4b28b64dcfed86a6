"""The ``tsdk`` command (also ``python -m tsdk_monai``).

    tsdk demo-data OUT [--n 40] [--size 128] [--num_classes 2] [--n_labeled 8] [--seed 0]
        write the embedded ultrasound-like demo phantoms and their datalist to OUT
    tsdk prepare IMAGES LABELS OUT [--n_labeled 80] [--seed 0] [--test_fraction 0.2] [--val_fraction 0.1]
        check an images/labels folder pair and write OUT/datalist.json with a grouped, seeded split
    tsdk demo [--workdir tsdk_demo]
        run what the pipeline has today on the demo data and say what was done

Run ``tsdk COMMAND --help`` for every option. Bad input stops with one line naming the file and the problem.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["main", "demo_data", "prepare", "demo"]


def demo_data(
    out: str, n: int = 40, size: int = 128, num_classes: int = 2, n_labeled: int = 8, seed: int = 0
) -> str:
    """Write N ultrasound-like phantoms (images/, labels/ as PNG) and OUT/datalist.json; print the datalist path.

    Args:
        out: output folder.
        n: number of images.
        size: image side in pixels.
        num_classes: 2 (background, head) or 3 (background, head, inner structure).
        n_labeled: labelled cases in the datalist's training split.
        seed: seed of the images and of the split.
    """
    from tsdk_monai.data import write_demo_data

    return str(write_demo_data(out, n=n, size=size, num_classes=num_classes, n_labeled=n_labeled, seed=seed))


def prepare(
    images: str,
    labels: str,
    out: str,
    n_labeled: int = 80,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    group_pattern: str = r"^\d+",
    num_classes: int | None = None,
    class_names: str | None = None,
) -> str:
    """Check IMAGES/LABELS (same file names), split by group with SEED, copy to OUT, write OUT/datalist.json.

    Args:
        images: folder of images (PNG or NIfTI).
        labels: folder of label maps with the same file names (0 = background, 1.. = classes).
        out: output folder (made self-contained: images/, labels/, datalist.json).
        n_labeled: how many labelled cases later stages may use (the 'training' split).
        seed: seed of the split; the same seed writes the same bytes.
        test_fraction: share of groups held out as the test split.
        val_fraction: share of groups in the validation split.
        group_pattern: regex whose first match in a file name is its patient/exam group (default: leading digits).
        num_classes: classes including background (default: largest label value + 1).
        class_names: comma-separated class names, background first.
    """
    from tsdk_monai.data import prepare as _prepare

    return str(
        _prepare(
            images, labels, out, n_labeled=n_labeled, seed=seed, test_fraction=test_fraction,
            val_fraction=val_fraction, group_pattern=group_pattern, num_classes=num_classes, class_names=class_names,
        )
    )


def demo(workdir: str = "tsdk_demo") -> None:
    """Run the pipeline stages that exist today on the embedded demo data, and say what was done.

    Args:
        workdir: folder for the demo data and every stage's output.
    """
    from tsdk_monai.data import load_datalist, write_demo_data

    wd = Path(workdir)
    datalist = write_demo_data(wd / "data")
    splits = load_datalist(datalist)
    counts = ", ".join(f"{k} {len(splits[k])}" for k in ("training", "validation", "unlabeled", "test"))
    print(f"demo data: {datalist} ({counts})")
    print("stages run: data only; the teacher, synthesis, distillation and student bundles are not built yet.")


def main(argv: list[str] | None = None) -> None:
    import fire

    from tsdk_monai.utils import TSDKInputError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire({"demo-data": demo_data, "prepare": prepare, "demo": demo}, command=argv, name="tsdk")
    except TSDKInputError as exc:
        print(f"tsdk: error: {exc}", file=sys.stderr)
        sys.exit(2)
