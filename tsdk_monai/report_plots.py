"""The report's figures (PNG): Dice against labels, the teacher's validation curve, test-case overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tsdk_monai.utils import TSDKInputError, atomic_write_bytes

__all__ = ["plot_dice", "plot_overlays", "plot_teacher", "save_fig"]


def plot_dice(rows: list[dict[str, Any]], manifest: dict[str, Any], path: Path, labels: dict[str, str]) -> Path:
    """Test Dice against the number of labels, one line per method (mean over seeds and fine-tuning seeds, bars:
    std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in manifest["methods"]:
        pts = [(r["n_labeled"], r["dice_mean"], r["dice_std"] or 0.0) for r in rows
               if r["method"] == m and r["dice_mean"] is not None]
        if not pts:
            continue
        xs, ys, es = zip(*sorted(pts))
        style = {"linestyle": "--", "color": "black"} if m == "teacher" else {}
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=labels.get(m, m), **style)
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test Dice (mean over seeds, bars: std)")
    ax.set_xticks(list(manifest["n_labeled"]))
    ft = int(manifest.get("sizes", {}).get("finetune_seeds", 1))
    ax.set_title(f"Dice vs number of labels ({len(manifest['seeds'])} seed(s)"
                 + (f" x {ft} fine-tunings of each student)" if ft > 1 else ")"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_fig(fig, path)


def plot_teacher(history: dict[tuple[int, int], list[dict[str, float]]], path: Path) -> Path:
    """The teacher's validation Dice per epoch, one line per (seed, number of labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (seed, n), epochs in sorted(history.items()):
        ax.plot([e["epoch"] for e in epochs], [e["value"] for e in epochs], marker=".", label=f"{n} labels, seed {seed}")
    ax.set_xlabel("teacher epoch")
    ax.set_ylabel("validation Dice (foreground mean)")
    ax.set_title("Teacher: validation Dice per epoch (the best epoch is the teacher)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_fig(fig, path)


def save_fig(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _slice2d(arr: np.ndarray) -> np.ndarray:
    """(C, *spatial) -> a 2D view for display: channel 0, the middle slice of a volume, rows first."""
    a = np.asarray(arr)[0]
    if a.ndim == 3:
        a = a[..., a.shape[-1] // 2]
    return a.T  # MONAI's image readers put the image's x first


def _dice_fg(pred: np.ndarray, gt: np.ndarray) -> float:
    classes = [c for c in np.unique(gt) if c > 0] or [1]
    vals = []
    for c in classes:
        p, g = pred == c, gt == c
        denom = p.sum() + g.sum()
        vals.append(1.0 if denom == 0 else 2.0 * np.logical_and(p, g).sum() / denom)
    return float(np.mean(vals))


def plot_overlays(manifest: dict[str, Any], path: Path) -> tuple[Path, str] | None:
    """The overlay figure from the predictions the driver's overlay stages wrote; None when there are none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tsdk_monai.data import image_stem, load_split, read_array

    overlay = manifest.get("overlay") or {}
    dirs = {m: Path(d) for m, d in overlay.get("dirs", {}).items() if Path(d).is_dir()}
    if not dirs:
        return None
    key, datalist = overlay["key"], Path(overlay["datalist"])
    seed, n = manifest["runs"][key]["seed"], manifest["runs"][key]["n_labeled"]
    cases = load_split(datalist, "test")
    cols = ["image", "ground truth"] + [m for m in manifest["methods"] if m in dirs]
    fig, axes = plt.subplots(len(cases), len(cols), figsize=(2.3 * len(cols), 2.4 * len(cases)), squeeze=False)
    cmap = matplotlib.colormaps["autumn"]
    for r, case in enumerate(cases):
        img = _slice2d(read_array(case["image"], "image")).astype(np.float32)
        gt = _slice2d(read_array(case["label"], "label")).astype(np.int64)
        stem = image_stem(case["image"])
        for c, col in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == "image":
                title = stem
                mask = None
            elif col == "ground truth":
                title, mask = "ground truth", gt
            else:
                files = sorted(dirs[col].glob(f"{stem}_seg*")) or sorted(dirs[col].rglob(f"{stem}*"))
                if not files:
                    raise TSDKInputError(f"{dirs[col]}: no prediction for {case['image']} (see the overlay stage's "
                                         "log in logs/)")
                mask = _slice2d(read_array(files[0], "prediction")).astype(np.int64)
                if mask.shape != gt.shape:
                    raise TSDKInputError(f"{files[0]}: prediction size {mask.shape} differs from the label's {gt.shape}")
                title = f"{col}\nDice {_dice_fg(mask, gt):.3f}"
            if mask is not None:
                ax.imshow(np.ma.masked_where(mask == 0, mask), cmap=cmap, alpha=0.45, vmin=0,
                          vmax=max(1, int(manifest["num_classes"]) - 1), interpolation="nearest")
            ax.set_title(title, fontsize=8)
    fig.suptitle(f"test cases, {n} labels, seed {seed}: image, ground truth, teacher and students", fontsize=9)
    fig.tight_layout()
    return save_fig(fig, path), key
