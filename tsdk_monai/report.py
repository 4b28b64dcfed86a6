"""The comparison report of a ``tsdk run`` folder: ``W/report.md`` and the plots in ``W/plots/``.

The report reads, it never runs anything: each method's test ``metrics.json`` (``tsdk_teacher`` and ``tsdk_student``
evaluate: Dice and HD95 on the test split), the stage markers in ``W/logs`` (seconds per stage), ``W/run.json`` (the
plan: methods, seeds, numbers of labels, sizes), ``W/networks.json`` (parameters and CPU ms per image, measured by the
driver) and the overlay predictions (the bundles' own ``inference.json`` on a few test cases, stages of the driver).
Paths come from :class:`tsdk_monai.layout.RunLayout`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tsdk_monai.layout import RunDirs, RunLayout
from tsdk_monai.metrics.grid import quality_summary
from tsdk_monai.report_plots import plot_dice, plot_overlays, plot_teacher
from tsdk_monai.transforms import POSTPROCESS_CHOICES, POSTPROCESS_DICE_TOLERANCE, read_postprocess_record
from tsdk_monai.utils import TSDKInputError, atomic_write_bytes, atomic_write_json, read_json

__all__ = ["METHOD_LABELS", "collect_results", "compare_to", "write_report"]

METHOD_LABELS = {
    "teacher": "teacher (LiteMedSAM + LoRA, reference)",
    "scratch": "student from scratch",
    "task_agnostic_kd": "task-agnostic KD (frozen VFM features)",
    "mae": "MAE pre-training",
    "mocov3": "MoCo v3 pre-training",
    "tskd_no_synth": "TS-KD without synthesis",
    "tskd": "TS-KD (ours)",
}


def _manifest(layout: RunLayout) -> dict[str, Any]:
    return read_json(layout.manifest, "not found; is this a folder made by `tsdk run` or `tsdk demo`?", "not valid JSON")


def _metrics(f: Path) -> tuple[float, float | None] | None:
    """(mean test Dice, mean test HD95 or None) from an evaluation's ``metrics.json``; None when not evaluated yet."""
    if not f.is_file():
        return None
    try:
        mean = json.loads(f.read_text())["mean"]
        hd = mean.get("test_hd95")
        return float(mean["test_mean_dice"]), (None if hd is None or not math.isfinite(hd) else float(hd))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise TSDKInputError(f"{f}: not a tsdk metrics file ({type(exc).__name__}: {exc})") from exc


def _case_dice(f: Path) -> dict[str, float]:
    """{image file name: foreground Dice (mean over the classes the image has)} from an evaluation's ``metrics.json``."""
    out = {}
    for case in json.loads(f.read_text()).get("cases", []):
        vals = [v for v in (case.get("test_mean_dice") or {}).values() if v is not None]
        if vals:
            out[Path(case["image"]).name] = float(np.mean(vals))
    return out


def _finetune_count(manifest: dict[str, Any]) -> int:
    """``Schedule.finetune_seeds`` of a run (1 in the ``run.json`` of a version without it)."""
    return int(manifest["sizes"].get("finetune_seeds", 1))


def _finetunes(manifest: dict[str, Any], method: str) -> range:
    """The fine-tuning seeds ``k`` a method's rows have (:func:`_finetune_count`; one for the teacher)."""
    return range(1 if method == "teacher" else _finetune_count(manifest))


def compare_to(workdir: Path, ours: str = "tskd", manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per number of labels, ``ours`` minus every other method: mean per-image test Dice difference and its paired
    bootstrap 95% interval over the test images (each image's Dice averaged over the student's fine-tuning seeds, then
    over the seeds both have)."""
    from tsdk_monai.stats import paired_over_seeds

    layout = RunLayout(workdir)
    manifest = manifest or _manifest(layout)
    if ours not in manifest["methods"]:
        return []

    def scores(method: str, n: int) -> dict[int, dict[str, float]]:
        out = {}
        for seed in manifest["seeds"]:
            run = manifest["runs"].get(layout.key(seed, n))
            if run is None:
                continue
            dirs = RunDirs.of(run)
            files = [f for f in (dirs.metrics(method, k) for k in _finetunes(manifest, method)) if f.is_file()]
            if files:  # each image's Dice averaged over the student's fine-tuning seeds
                cases = [_case_dice(f) for f in files]
                out[seed] = {i: float(np.mean([c[i] for c in cases])) for i in set.intersection(*map(set, cases))}
        return out

    found = []
    for n in manifest["n_labeled"]:
        mine = scores(ours, n)
        for other in manifest["methods"]:
            theirs = scores(other, n) if other != ours else {}
            if mine and theirs:
                found.append({"n_labeled": n, "method": other, **paired_over_seeds(mine, theirs)})
    return found


def _stage_seconds(layout: RunLayout, names: Sequence[str]) -> float | None:
    total = 0.0
    for n in names:
        f = layout.marker(n)
        rec = json.loads(f.read_text()) if f.is_file() else {"state": "not started"}
        if rec.get("state", "done") != "done":
            return None
        total += float(rec.get("seconds", 0.0))
    return total


def collect_results(workdir: Path, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (method, n_labeled): Dice/HD95 of each run (seed and fine-tuning seed), the row's stage seconds of
    each seed (every stage its runs of that seed need), and their mean and std."""
    layout = RunLayout(workdir)
    manifest = manifest or _manifest(layout)
    rows = []
    for m in manifest["methods"]:
        for n in manifest["n_labeled"]:
            per_seed = []
            for seed in manifest["seeds"]:
                key = layout.key(seed, n)
                run = manifest["runs"].get(key)
                if run is None:
                    continue
                secs = _stage_seconds(layout, manifest["stages"].get(m, {}).get(key, []))
                dirs = RunDirs.of(run)
                for k in _finetunes(manifest, m):
                    res = _metrics(dirs.metrics(m, k))
                    if res is not None:
                        post = dirs.postprocess(m, k)  # a teacher evaluated before bundle 0.5 chose none
                        post, tol = read_postprocess_record(post) if m != "teacher" or post.is_file() else (None, None)
                        per_seed.append({"seed": seed, "finetune": k, "dice": res[0], "hd95": res[1], "seconds": secs
                                         if k == 0 else None, "postprocess": post, "dice_tolerance": tol})
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


def _teacher_history(manifest: dict[str, Any]) -> dict[tuple[int, int], list[dict[str, float]]]:
    """(seed, n) -> the teacher's validation metric per epoch (its ``val_history.json``), where one was written."""
    out = {}
    for seed in manifest["seeds"]:
        for n in manifest["n_labeled"]:
            run = manifest["runs"].get(RunLayout.key(seed, n))
            f = RunDirs.of(run).teacher_models / "val_history.json" if run else None
            if f is not None and f.is_file():
                out[(seed, n)] = read_json(f, "not found", "not a teacher validation history")["epochs"]
    return out


# --------------------------------------------------------------------------------------------------- report
def _postprocess_line(rows: list[dict[str, Any]]) -> str:
    """How many evaluations (students' and teachers') chose each post-processing on the validation split."""
    runs = [r for row in rows for r in row["runs"] if r.get("postprocess")]
    chosen = Counter(r["postprocess"] for r in runs)
    if not chosen:
        return ""
    recorded = {POSTPROCESS_DICE_TOLERANCE if r.get("dice_tolerance") is None else r["dice_tolerance"] for r in runs}
    tolerance = " / ".join(f"{t:g}" for t in sorted(recorded))  # a file of bundle 0.4 records none: the default
    return ("Post-processing of each model, chosen on the validation split before the test was scored (the lowest "
            f"validation HD95 among the options within {tolerance} validation Dice of the best): "
            + "; ".join(f"{text} {chosen[c]}" for c, text in POSTPROCESS_CHOICES.items() if chosen[c])
            + f" of {sum(chosen.values())}.")


def _synthesis_section(w: Path, manifest: dict[str, Any], comparisons: list[dict[str, Any]]) -> list[str]:
    """The report's section on the synthetic transfer set: each seed's quality report (``quality.json`` of the
    synthesis stage: Fréchet distance, near-copies) and, per number of labels, whether the synthetic images helped TS-KD
    on the test images (TS-KD minus TS-KD without synthesis, the paired bootstrap interval's verdict in words)."""
    if "tskd" not in manifest["methods"]:
        return []
    lines = []
    seen = set()
    for seed in manifest["seeds"]:
        run = next((r for r in manifest["runs"].values() if r.get("seed") == seed), None)
        if run is None:
            continue
        synthetic = RunDirs.of(run).synthetic_datalist.parent
        if synthetic in seen or not (synthetic / "quality.json").is_file():
            continue
        seen.add(synthetic)
        q = read_json(synthetic / "quality.json", "not found", "not valid JSON")
        grid = synthetic.relative_to(w) / q["grid"]["path"] if q.get("grid") and synthetic.is_relative_to(w) else None
        lines.append(f"- seed {seed}: {quality_summary(q)}" + (f"; [grid]({grid})" if grid else ""))
    verdicts = []
    for c in comparisons:
        if c["method"] != "tskd_no_synth":
            continue
        if c["low"] > 0:
            word = "helped (interval above 0)"
        elif c["high"] < 0:
            word = "hurt (interval below 0): at this schedule, TS-KD without synthesis is the better choice here"
        else:
            word = "made no difference beyond image-sampling noise (interval spans 0)"
        verdicts.append(f"- {c['n_labeled']} labels: TS-KD minus TS-KD without synthesis {c['mean']:+.3f} "
                        f"[{c['low']:+.3f}, {c['high']:+.3f}]: the synthetic images {word}")
    if not lines and not verdicts:
        return []
    return ["## Synthetic transfer set", "",
            "Quality of the synthesis stage's images (`quality.json`, written before any student used them) and whether "
            "they helped TS-KD on the test images (TS-KD's test Dice minus that of the same method distilled without "
            "them, paired bootstrap 95% interval as above):", "", *lines, *verdicts, ""]


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
        per = Counter(x["seed"] for x in r["runs"])  # seed -> its fine-tunings with results
        seeds, fts = len(per), max(per.values(), default=1)
        seeds_col = f"{seeds}/{n_seeds}" + (f" × {fts}" if fts > 1 else "")
        lines.append(f"| {label} | {r['n_labeled']} | {seeds_col} | {dice} | {hd} | {params} | "
                     f"{speed} | {mins} |")
    return "\n".join(lines)


def write_report(workdir: str | Path, print_table: bool = True) -> str:
    """Write ``W/report.md``, ``W/report.json``, ``W/plots/dice_vs_labels.png`` and (when the driver made its
    predictions) ``W/plots/overlays.png`` from what the stages wrote; return the table.

    Args:
        workdir: a folder made by ``tsdk run`` (holds ``run.json``).
        print_table: print the table (and where the report is).
    """
    layout = RunLayout(workdir)
    w = layout.root
    manifest = _manifest(layout)
    rows = collect_results(w, manifest)
    overlay = plot_overlays(manifest, layout.plots / "overlays.png")
    nets = json.loads(layout.networks.read_text()) if layout.networks.is_file() else {}
    plot_dice(rows, manifest, layout.plots / "dice_vs_labels.png", METHOD_LABELS)
    table = _table(rows, nets, len(manifest["seeds"]))
    sizes = manifest["sizes"]
    ft = _finetune_count(manifest)
    ratio = ""
    if "teacher" in nets and "student" in nets:
        ratio = (f"The student runs {nets['teacher']['ms'] / nets['student']['ms']:.1f}x faster than the teacher and has "
                 f"{nets['teacher']['params'] / nets['student']['params']:.1f}x fewer parameters (measured in this run). ")
    stage_rows = ["| stage | minutes |", "|---|---|"]
    for f in sorted(layout.logs.glob("*.stage.json")):
        rec = json.loads(f.read_text())
        if rec.get("state", "done") == "done":
            stage_rows.append(f"| {f.name[:-len('.stage.json')]} | {float(rec.get('seconds', 0)) / 60:.1f} |")
    md = [
        "# TS-KD comparison",
        "",
        f"Data: `{manifest['datalist']}` ({manifest['num_classes']} classes); labelled cases: "
        f"{', '.join(map(str, manifest['n_labeled']))}; seeds: {', '.join(map(str, manifest['seeds']))} (the seed picks "
        "the labelled subset and seeds every stage's training). Test Dice and HD95: mean over the test split of the "
        "foreground classes, then mean ± std over seeds (no ± with one seed)"
        + (f"; a student's row: over its {ft} fine-tunings per seed (seeds column: seeds × fine-tuning seeds; each "
           "fine-tunes the seed's same distilled / pre-trained start with its own seed, s + 1000 k)" if ft > 1 else "")
        + ". Geometry: the teacher at "
        f"{sizes['teacher_size']} px, the students at {sizes['student_size']} px, every image "
        f"{'letterboxed (aspect kept, zero padding)' if sizes.get('keep_aspect') else 'squashed'} to that square; "
        "predictions are resized back to each test image's own size before they are scored.",
        "",
        table,
        "",
        (f"Parameters and CPU ms / image: batch 1 forward at the size shown, median of {nets['threads']['repeats']} "
         f"repeats taken in turns, {nets['threads']['torch_threads']} torch threads, measured by the driver after the "
         f"stages (`networks.json`). {ratio}" if nets else "")+
        "Stage minutes: wall time of every stage the row needs (shared label-free stages and the teacher included), "
        "mean over seeds: the compute budget of the row (every fine-tuning seed included). Test HD95: 95th-percentile "
        "Hausdorff distance in pixels of the original image, mean over the test cases and classes; a class missed in an "
        "image that has it, or predicted in one that has not, counts as the image diagonal (not left out). "
        + _postprocess_line(rows),
        "",
        "## Dice vs number of labels",
        "",
        "![Dice vs labels](plots/dice_vs_labels.png)",
        "",
    ]
    history = _teacher_history(manifest)
    if history:
        plot_teacher(history, layout.plots / "teacher_val_dice.png")
        md += ["## Teacher training", "",
               "Validation Dice of the teacher after each validated epoch (the saved teacher is the best one's):", "",
               "| labels | seed | epochs | validations | first (epoch) | best (epoch) | last |",
               "|---|---|---|---|---|---|---|"]
        for (seed, n), ep in sorted(history.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            best = max(ep, key=lambda e: e["value"])
            md.append(f"| {n} | {seed} | {ep[-1]['epoch']} | {len(ep)} | {ep[0]['value']:.3f} ({ep[0]['epoch']}) | "
                      f"{best['value']:.3f} ({best['epoch']}) | {ep[-1]['value']:.3f} |")
        md += ["", "![teacher validation Dice](plots/teacher_val_dice.png)", ""]
    if overlay is not None:
        key = overlay[1]
        md += ["## Test cases", "",
               f"Predictions of the `{key}` models through each bundle's `inference.json` "
               "(per-image foreground Dice in the titles).", "", "![overlays](plots/overlays.png)", ""]
    comparisons = compare_to(w, manifest=manifest)
    if comparisons:
        md += ["## TS-KD minus each method", "",
               "Mean over the test images of TS-KD's foreground Dice minus the other method's (each image's Dice "
               "averaged over a student's fine-tuning seeds, then over the seeds both ran), with a paired bootstrap 95% "
               "interval (10000 resamples of the test images). An interval above 0: TS-KD is better on these test "
               "images beyond image-sampling noise.", "",
               "| labels | minus | mean Δ Dice | 95% interval | images | seeds |", "|---|---|---|---|---|---|",
               *[f"| {c['n_labeled']} | {METHOD_LABELS.get(c['method'], c['method'])} | {c['mean']:+.3f} | "
                 f"[{c['low']:+.3f}, {c['high']:+.3f}] | {c['n']} | {c['seeds']} |" for c in comparisons], ""]
    md += _synthesis_section(w, manifest, comparisons)
    md += [
        "## Schedule", "",
        "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in sizes.items() if k != "extra"],
        *([f"| extra overrides | `{json.dumps(sizes['extra'])}` |"] if sizes.get("extra") else []),
        "", "## Stage times", "", *stage_rows, "",
        "Every stage's exact `python -m monai.bundle run` command is the first line of its log in `logs/`.", "",
    ]
    atomic_write_bytes(layout.report, "\n".join(md).encode("utf-8"))
    atomic_write_json(layout.report_json, {"rows": rows, "networks": nets, "tskd_minus": comparisons})
    if print_table:
        print(table)
        print(f"\nreport: {layout.report}; plots: {layout.plots}", flush=True)
    return table
