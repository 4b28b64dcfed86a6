"""Benchmark: the full method table on HC18 fetal-head ultrasound (issue 9 acceptance).

Every number comes from the stage bundles, composed by the driver (``tsdk_monai.driver.run_methods``, the code of
``tsdk run``), so a row of the table is what ``tsdk run`` gives:

1. ``tsdk prepare`` HC18 into a grouped split with seed 0 (test 20%, validation 10% of the exam groups) and a labelled
   pool of the largest ``--n-labeled`` cases;
2. ``tsdk run``: for each seed and number of labels, the few-label subset of the pool, then every method (teacher,
   scratch, task-agnostic KD, MAE, MoCo v3, TS-KD without synthesis, TS-KD), label-free stages shared by every n;
3. ``tsdk report``: ``WORK/report.md`` (method x labels: test Dice and HD95, parameters, CPU ms/image, stage minutes)
   and ``WORK/plots/dice_vs_labels.png``, ``WORK/plots/overlays.png``.

    python bench/hc18_table.py                    # default: CPU schedule, ~104 min on 2 cores (< 2 h)
    python bench/hc18_table.py --full             # paper-scale schedule for a GPU machine (n 20,40,80 x seeds 0,1,2)
    python bench/hc18_table.py --smoke --limit 60 --work /tmp/hc18_smoke   # minutes: the bench end to end, tiny

A re-run skips finished stages and resumes an interrupted one (kill it any time). The default schedule (``CPU``,
``tsdk run --preset cpu``) at 128 px, for HC18's ~800-image pool (80 labelled + 721 unlabelled), ~100 validation and
198 test images, measured on 2 cores (2026-12-07, bfloat16 teacher with LoRA of rank 16 on every encoder linear layer,
distillation and students; 61.5 stage minutes for the 44 stages with one fine-tuning of each student, 104.2 with the
preset's 3: 24 more fine-tunings and evaluations, ~1.8 minutes each; since the baselines fine-tune twice as long,
~1.5 instead of ~1.2 minutes per baseline fine-tuning + evaluation, 99 stage minutes summed from the stage records,
the teachers' evaluations, post-processing now chosen on validation, not re-timed):

    stage (count)                                   minutes each   total
    teacher LoRA (480 iterations of 4, val x8)       ~12.0-12.6    24.6   (x2: n = 20, 80)
    teacher test evaluation (198 images)             ~0.6           1.2
    synthesis train (64 px, 8 epochs, 352 it.)       ~4.6           4.6
      + sample (128 DDIM-20, FID on 48 real)         ~1.3           1.3
    task-agnostic KD distill (frozen VFM targets     ~2.6           2.6
      on ~800 images, 4 student epochs)
    MAE / MoCo v3 pre-training (1 epoch each)        ~0.5           1.0
    TS-KD distill without synthesis (teacher         ~3.4-3.5       6.9
      targets on ~800 images, 4 epochs)
    TS-KD distill (+128 synthetic images, 4 ep.)     ~2.2-2.3       4.5
    student fine-tune (80 iterations of 8;          ~0.9          10.8   (x12: 6 students x 2 n)
      the 4 baselines 160: ~1.2-1.3)
    student test evaluation (198 images, HD95,       ~0.3           3.2
      post-processing chosen on ~100 validation)
    2 more fine-tunings + evaluations of each        ~1.8          42.7   (x24; finetune_seeds 3)
    overlays, report                                                ~0.5

(Equal iterations for every n: the teacher's and students' epochs are given for 80 labels and scaled by 80/n.) Under
other load everything is slower: the stage minutes of each row are in the report, beside its Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the data sets the bench knows: folder under ../shared/data and how `tsdk prepare` splits it
DATASETS = {
    "hc18": dict(prepare=dict(name="hc18")),
    # PSFHS (intrapartum ultrasound, 2 classes, no patient ids): groups of 10 consecutive image ids, so near-duplicate
    # frames of one acquisition session are unlikely to straddle splits (see bench/psfhs_table.py)
    "psfhs": dict(prepare=dict(name="psfhs", group_pattern=r"img(\d{4})",
                               class_names="background,pubic_symphysis,fetal_head")),
}
sys.path.insert(0, str(REPO))

from tsdk_monai.driver import METHODS, PRESETS, Schedule, run_methods  # noqa: E402

#: the schedules are the package's named presets (``tsdk run --preset cpu|full|smoke`` gives the same stages)
CPU, FULL, SMOKE = PRESETS["cpu"], PRESETS["full"], PRESETS["smoke"]


def labelled_pool(ns: list[int], default_n: str) -> int:
    """How many cases the split labels, the pool that every number of labels draws its cases from: the largest of
    ``ns`` and of the schedule's default numbers ``default_n``, so that ``--n-labeled 20`` labels the same 20 cases as
    the table's ``--n-labeled 20,80`` (the subsets of one pool are nested; a pool of 20 would be drawn anew)."""
    return max([*ns, *(int(n) for n in default_n.split(","))])


def _subset(data: Path, work: Path, limit: int) -> tuple[Path, Path]:
    """Links to the first ``limit`` image/label pairs of HC18 (by file name), for smoke runs."""
    out = work / "source"
    for kind in ("images", "labels"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (data / "images").iterdir() if p.suffix.lower() == ".png")[:limit]
    for name in names:
        for kind in ("images", "labels"):
            link, target = out / kind / name, (data / kind / name).resolve()
            if not target.is_file():
                raise SystemExit(f"{target}: missing ({kind[:-1]} of {name})")
            if not link.is_symlink():
                link.symlink_to(target)
    return out / "images", out / "labels"


def _stage_minutes(work: Path) -> list[tuple[str, float]]:
    rows = []
    for f in sorted((work / "logs").glob("*.stage.json")):
        rec = json.loads(f.read_text())
        if rec.get("state") == "done":
            rows.append((f.name[: -len(".stage.json")], float(rec.get("seconds", 0.0)) / 60))
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="hc18")
    ap.add_argument("--data", type=Path, default=None, help="the data folder with images/ and labels/ "
                    "(default ../shared/data/DATASET)")
    ap.add_argument("--work", type=Path, default=None, help="default bench/out/DATASET_table")
    ap.add_argument("--n-labeled", default=None, help="comma-separated (default 20,80; --full 20,40,80; --smoke 4,8)")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0; --full 0,1,2)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--student", default=None, help="unet_small (default) or vit_tiny")
    ap.add_argument("--extra", type=json.loads, default=None, help="more bundle overrides, as JSON: bundle name -> "
                    "{knob: value} (an ablation, e.g. '{\"tsdk_teacher\": {\"lr_cosine_cycles\": 0}}')")
    ap.add_argument("--schedule", type=json.loads, default=None, help="schedule settings over the preset's, as JSON "
                    "(an ablation, e.g. '{\"teacher_size\": 256}'; the fields of tsdk_monai.driver.Schedule)")
    grp = ap.add_mutually_exclusive_group()
    grp.add_argument("--full", action="store_true", help="paper-scale schedule for a GPU machine")
    grp.add_argument("--smoke", action="store_true", help="tiny schedule: the bench end to end in minutes")
    ap.add_argument("--keep-aspect", action="store_true", help="letterbox the images (aspect kept) instead of "
                    "squashing them to the square sizes")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N HC18 pairs (smoke runs)")
    args = ap.parse_args(argv)
    args.data = args.data or REPO.parent / "shared" / "data" / args.dataset
    args.work = args.work or REPO / "bench" / "out" / f"{args.dataset}_table"

    preset = FULL if args.full else SMOKE if args.smoke else CPU
    sizes = Schedule(**{**preset, **(args.schedule or {})})
    if args.student:
        sizes.student = args.student
    sizes.keep_aspect = args.keep_aspect
    for bundle, knobs in (args.extra or {}).items():
        sizes.extra = {**sizes.extra, bundle: {**sizes.extra.get(bundle, {}), **knobs}}
    default_n = "20,40,80" if args.full else "4,8" if args.smoke else "20,80"
    n_labeled = args.n_labeled or default_n
    seeds = args.seeds or ("0,1,2" if args.full else "0")
    ns = [int(n) for n in str(n_labeled).split(",")]
    if not (args.data / "images").is_dir():
        raise SystemExit(f"{args.data}: {args.dataset} not found (expected images/ and labels/ in it; see --data)")

    from tsdk_monai.data import prepare

    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, labels = (args.data / "images", args.data / "labels") if args.limit is None else _subset(args.data, work, args.limit)
    datalist = prepare(str(images), str(labels), str(work / "data"), n_labeled=labelled_pool(ns, default_n),
                       seed=0, **DATASETS[args.dataset]["prepare"])
    print(f"split: {datalist} ({time.time() - t0:.0f} s); schedule: "
          f"{'full (GPU)' if args.full else 'smoke' if args.smoke else 'CPU default'}; n_labeled {n_labeled}; "
          f"seeds {seeds}; threads {os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    table = run_methods(datalist, work, args.methods, sizes, n_labeled=n_labeled, seeds=seeds)
    total = time.time() - t0
    stages = _stage_minutes(work)
    print("\nstage minutes (this folder's finished stages, including ones skipped in this run):")
    for name, mins in stages:
        print(f"  {name:<44s} {mins:7.2f}")
    print(f"  {'sum':<44s} {sum(m for _, m in stages):7.2f}")
    print(f"\n{args.dataset} method table ({len(ns)} numbers of labels x {len(seeds.split(','))} seed(s)); wall time "
          f"of this invocation {total / 60:.1f} min\n")
    print(table)
    print(f"\nreport: {work / 'report.md'}; plots: {work / 'plots'}")
    return table


if __name__ == "__main__":
    main()
