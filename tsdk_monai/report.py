"""The comparison report of a ``tsdk run`` folder: ``W/report.md`` and the plots in ``W/plots/``.

Everything is read from what the stages wrote: each student's ``eval/metrics.json`` (``tsdk_student`` evaluate:
Dice and HD95 on the test split), the teacher's ``test/metrics.json`` (``tsdk_teacher`` evaluate, the same), the stage
markers in ``W/logs`` (seconds per stage) and ``W/run.json`` (the plan: methods, seeds, numbers of labels, sizes).
Two things are measured here: parameter counts and CPU inference time per image of the networks (forward of one
image at the run's size, median of a few repeats, in this process, so teacher and student are timed on the same
machine in the same run). The overlay figure's predictions come from the bundles' own ``inference.json`` (teacher
and each student of one run, on a few test cases), run as stages of the driver (skipped when done).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tsdk_monai.utils import TSDKInputError, atomic_write_bytes, atomic_write_json

__all__ = ["METHOD_LABELS", "collect_results", "measure_networks", "write_report"]

METHOD_LABELS = {
    "teacher": "teacher (LiteMedSAM + LoRA, reference)",
    "scratch": "student from scratch",
    "task_agnostic_kd": "task-agnostic KD (frozen VFM features)",
    "mae": "MAE pre-training",
    "mocov3": "MoCo v3 pre-training",
    "tskd_no_synth": "TS-KD without synthesis",
    "tskd": "TS-KD (ours)",
}


def _read_manifest(workdir: Path) -> dict[str, Any]:
    f = Path(workdir) / "run.json"
    if not f.is_file():
        raise TSDKInputError(f"{f}: not found; is {workdir} a folder made by `tsdk run` or `tsdk demo`?")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise TSDKInputError(f"{f}: not valid JSON ({exc})") from exc


def _metrics(run_dir: Path, method: str) -> tuple[float, float | None] | None:
    """(mean test Dice, mean test HD95 or None) of one method of one run, from the ``metrics.json`` its evaluation
    wrote (``tsdk_teacher`` and ``tsdk_student`` evaluate write the same layout); None when not evaluated yet."""
    f = run_dir / ("teacher/test" if method == "teacher" else f"{method}/eval") / "metrics.json"
    if not f.is_file():
        return None
    try:
        mean = json.loads(f.read_text())["mean"]
        hd = mean.get("test_hd95")
        return float(mean["test_mean_dice"]), (None if hd is None or not math.isfinite(hd) else float(hd))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise TSDKInputError(f"{f}: not a tsdk metrics file ({type(exc).__name__}: {exc})") from exc


def _stage_seconds(workdir: Path, names: Sequence[str]) -> float | None:
    total = 0.0
    for n in names:
        f = Path(workdir) / "logs" / f"{n}.stage.json"
        if not f.is_file():
            return None
        rec = json.loads(f.read_text())
        if rec.get("state", "done") != "done":
            return None
        total += float(rec.get("seconds", 0.0))
    return total


def collect_results(workdir: Path, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (method, n_labeled): per-seed Dice/HD95/stage seconds and their mean and std over seeds."""
    w = Path(workdir)
    manifest = manifest or _read_manifest(w)
    rows = []
    for m in manifest["methods"]:
        for n in manifest["n_labeled"]:
            per_seed = []
            for seed in manifest["seeds"]:
                key = f"seed{seed}_n{n}"
                run = manifest["runs"].get(key)
                if run is None:
                    continue
                run_dir = Path(run["dir"])
                res = _metrics(run_dir, m)
                secs = _stage_seconds(w, manifest["stages"].get(m, {}).get(key, []))
                if res is not None:
                    per_seed.append({"seed": seed, "dice": res[0], "hd95": res[1], "seconds": secs})
            rows.append({"method": m, "n_labeled": n, "runs": per_seed, **_summary(per_seed)})
    return rows


def _summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(key: str) -> tuple[float | None, float | None]:
        vals = [r[key] for r in per_seed if r[key] is not None]
        if not vals:
            return None, None
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)

    (dm, ds), (hm, hs), (sm, _) = ms("dice"), ms("hd95"), ms("seconds")
    return {"dice_mean": dm, "dice_std": ds, "hd95_mean": hm, "hd95_std": hs, "seconds_mean": sm}


# ------------------------------------------------------------------------------------------------- networks
def _time_interleaved(nets: dict[str, tuple[Any, Sequence[int]]], repeats: int) -> dict[str, float]:
    """Median ms of one forward per network; the networks take turns, so a change of machine load hits them alike."""
    import torch

    inputs = {k: torch.rand(*shape) for k, (_, shape) in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        for k, (net, _) in nets.items():
            net(inputs[k])  # warm-up
        for _ in range(repeats):
            for k, (net, _) in nets.items():
                t0 = time.perf_counter()
                net(inputs[k])
                times[k].append(time.perf_counter() - t0)
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}


def measure_networks(manifest: dict[str, Any], repeats: int = 5) -> dict[str, dict[str, Any]]:
    """Parameters and CPU inference ms per image (batch 1, at the run's input size) of the student and the teacher."""
    import torch

    from tsdk_monai.networks.students import build_student

    sizes = manifest["sizes"]
    nets: dict[str, tuple[Any, Sequence[int]]] = {}
    names: dict[str, str] = {}
    if any(m != "teacher" for m in manifest["methods"]):
        net = build_student(sizes["student"], in_channels=1, num_classes=manifest["num_classes"],
                            img_size=sizes["student_size"]).eval()
        nets["student"] = (net, (1, 1, sizes["student_size"], sizes["student_size"]))
        names["student"] = sizes["student"]
    if "teacher" in manifest["methods"]:
        from tsdk_monai.networks import load_teacher

        for run in manifest["runs"].values():
            tdir = Path(run["dir"]) / "teacher" / "models" / "teacher"
            if (tdir / "model.pt").is_file():
                nets["teacher"] = (load_teacher(tdir, merged=True).eval(),
                                   (1, 1, sizes["teacher_size"], sizes["teacher_size"]))
                names["teacher"] = "teacher"
                break
    ms = _time_interleaved(nets, repeats) if nets else {}
    out: dict[str, dict[str, Any]] = {
        k: {"name": names[k], "params": sum(p.numel() for p in net.parameters()), "ms": ms[k], "size": shape[-1]}
        for k, (net, shape) in nets.items()
    }
    out["threads"] = {"torch_threads": torch.get_num_threads()}
    return out


# ---------------------------------------------------------------------------------------------------- plots
def _plot_dice(rows: list[dict[str, Any]], manifest: dict[str, Any], path: Path) -> Path:
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
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=METHOD_LABELS.get(m, m), **style)
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test Dice (mean over seeds, bars: std)")
    ax.set_xticks(list(manifest["n_labeled"]))
    ax.set_title(f"Dice vs number of labels ({len(manifest['seeds'])} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, path)


def _save_fig(fig: Any, path: Path) -> Path:
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


def _overlay_datalist(split: Path, k: int) -> Path:
    """``overlay_datalist.json`` beside the split's datalist: its test split cut to ``k`` evenly spaced cases."""
    raw = json.loads(Path(split).read_text())
    test = raw.get("test", [])
    if not test:
        raise TSDKInputError(f"{split}: no test cases for the overlay figure")
    idx = sorted({round(i * (len(test) - 1) / max(1, k - 1)) for i in range(min(k, len(test)))})
    out = dict(raw, test=[test[i] for i in idx], description=f"{len(idx)} test cases of {split} for the report figures")
    return atomic_write_json(Path(split).parent / "overlay_datalist.json", out)


def _plot_overlays(workdir: Path, manifest: dict[str, Any], runner: Any, k: int, path: Path) -> tuple[Path, str] | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tsdk_monai.data import image_stem, load_split, read_array
    from tsdk_monai.pipeline import overlay_stages

    seed, n = manifest["seeds"][0], min(manifest["n_labeled"])
    key = f"seed{seed}_n{n}"
    run = manifest["runs"][key]
    datalist = _overlay_datalist(Path(run["datalist"]), k)
    stages = overlay_stages(workdir, manifest, key, datalist)
    if not stages:
        return None
    for st in stages.values():
        runner.run(st)
    cases = load_split(datalist, "test")
    cols = ["image", "ground truth"] + [m for m in manifest["methods"] if m in stages]
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
                files = sorted(Path(stages[col].outputs[0]).glob(f"{stem}_seg*")) or sorted(
                    Path(stages[col].outputs[0]).rglob(f"{stem}*"))
                if not files:
                    raise TSDKInputError(f"{stages[col].outputs[0]}: no prediction for {case['image']} "
                                         f"(see {Path(workdir) / 'logs' / (stages[col].name + '.log')})")
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
    return _save_fig(fig, path), key


# --------------------------------------------------------------------------------------------------- report
def _fmt(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _table(rows: list[dict[str, Any]], nets: dict[str, dict[str, Any]], n_seeds: int) -> str:
    lines = [
        "| method | labels | seeds | test Dice | test HD95 (px) | parameters | CPU ms / image | stage minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        net = nets.get("teacher" if r["method"] == "teacher" else "student", {})
        params = f"{net['params'] / 1e6:.2f} M" if net else "n/a"
        speed = f"{net['ms']:.1f} ({net['size']} px)" if net else "n/a"
        hd = _fmt(r["hd95_mean"], r["hd95_std"], 1)
        mins = "n/a" if r["seconds_mean"] is None else f"{r['seconds_mean'] / 60:.1f}"
        label = METHOD_LABELS.get(r["method"], r["method"])
        dice = _fmt(r["dice_mean"], r["dice_std"], 3) if r["runs"] else "not run"
        lines.append(f"| {label} | {r['n_labeled']} | {len(r['runs'])}/{n_seeds} | {dice} | {hd} | {params} | "
                     f"{speed} | {mins} |")
    return "\n".join(lines)


def write_report(workdir: str | Path, runner: Any = None, overlay_cases: int = 3, repeats: int = 5,
                 print_table: bool = True) -> str:
    """Write ``W/report.md``, ``W/plots/dice_vs_labels.png`` and ``W/plots/overlays.png``; return the table.

    Args:
        workdir: a folder made by ``tsdk run`` (holds ``run.json``).
        runner: the :class:`~tsdk_monai.pipeline.StageRunner` for the overlay inference stages (default: a new one).
        overlay_cases: test cases in the overlay figure.
        repeats: timing repeats per network (median kept).
        print_table: print the table (and where the report is).
    """
    from tsdk_monai.pipeline import StageRunner

    w = Path(workdir).absolute()
    manifest = _read_manifest(w)
    rows = collect_results(w, manifest)
    own = runner is None
    runner = runner or StageRunner(w)
    try:
        overlay = _plot_overlays(w, manifest, runner, overlay_cases, w / "plots" / "overlays.png")
    finally:
        if own:
            runner.close()
    nets = measure_networks(manifest, repeats)
    _plot_dice(rows, manifest, w / "plots" / "dice_vs_labels.png")
    table = _table(rows, nets, len(manifest["seeds"]))
    sizes = manifest["sizes"]
    ratio = ""
    if "teacher" in nets and "student" in nets:
        ratio = (f"The student runs {nets['teacher']['ms'] / nets['student']['ms']:.1f}x faster than the teacher and has "
                 f"{nets['teacher']['params'] / nets['student']['params']:.1f}x fewer parameters (measured in this run). ")
    stage_rows = ["| stage | minutes |", "|---|---|"]
    for f in sorted((w / "logs").glob("*.stage.json")):
        rec = json.loads(f.read_text())
        if rec.get("state", "done") == "done":
            stage_rows.append(f"| {f.name[:-len('.stage.json')]} | {float(rec.get('seconds', 0)) / 60:.1f} |")
    md = [
        "# TS-KD comparison",
        "",
        f"Data: `{manifest['datalist']}` ({manifest['num_classes']} classes); labelled cases: "
        f"{', '.join(map(str, manifest['n_labeled']))}; seeds: {', '.join(map(str, manifest['seeds']))} (the seed picks "
        "the labelled subset and seeds every stage's training). Test Dice and HD95: mean over the test split of the "
        "foreground classes, then mean ± std over seeds (no ± with one seed).",
        "",
        table,
        "",
        f"Parameters and CPU ms / image: batch 1 forward at the size shown, median of {repeats} repeats taken in turns, "
        f"{nets['threads']['torch_threads']} torch threads, measured when this report was written. {ratio}"
        "Stage minutes: wall time of every stage the row needs (shared label-free stages and the teacher included), "
        "mean over seeds: the compute budget of the row. Test HD95: 95th-percentile Hausdorff distance in pixels at "
        "the evaluation size, mean over the test cases.",
        "",
        "## Dice vs number of labels",
        "",
        "![Dice vs labels](plots/dice_vs_labels.png)",
        "",
    ]
    if overlay is not None:
        key = overlay[1]
        md += ["## Test cases", "",
               f"Predictions of the `{key}` models through each bundle's `inference.json` "
               "(per-image foreground Dice in the titles).", "", "![overlays](plots/overlays.png)", ""]
    md += [
        "## Schedule", "",
        "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in sizes.items() if k != "extra"],
        *([f"| extra overrides | `{json.dumps(sizes['extra'])}` |"] if sizes.get("extra") else []),
        "", "## Stage times", "", *stage_rows, "",
        "Every stage's exact `python -m monai.bundle run` command is the first line of its log in `logs/`.", "",
    ]
    atomic_write_bytes(w / "report.md", "\n".join(md).encode("utf-8"))
    atomic_write_json(w / "report.json", {"rows": rows, "networks": nets})
    if print_table:
        print(table)
        print(f"\nreport: {w / 'report.md'}; plots: {w / 'plots'}", flush=True)
    return table
