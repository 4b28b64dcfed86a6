"""The ``tsdk`` command (also ``python -m tsdk_monai``).

    tsdk demo-data OUT [--n 40] [--size 128] [--num_classes 2] [--n_labeled 8] [--seed 0]
        write the embedded ultrasound-like demo phantoms and their datalist to OUT
    tsdk prepare IMAGES LABELS OUT [--n_labeled 80] [--seed 0] [--test_fraction 0.2] [--val_fraction 0.1]
        check an images/labels folder pair and write OUT/datalist.json with a grouped, seeded split
    tsdk demo [--workdir tsdk_demo] [--methods teacher,scratch,task_agnostic_kd,tskd]
        run the teacher, synthesis, distillation and student bundles on the demo data; print the comparison table

    tsdk run --datalist D/datalist.json --workdir W [--n_labeled 20,40,80] [--seeds 0,1,2] [--methods ...]
        run the stage bundles of each method (teacher, scratch, task_agnostic_kd, mae, mocov3, tskd_no_synth, tskd)
        for each number of labels and seed; skip finished stages; write W/report.md and print the table
    tsdk report W
        (re)write W/report.md and the plots W/plots/dice_vs_labels.png, W/plots/overlays.png; print the table

Run ``tsdk COMMAND --help`` for every option. Bad input stops with one line naming the file and the problem.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["main", "demo_data", "prepare", "demo", "run", "report"]


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


def demo(workdir: str = "tsdk_demo", methods: str = "teacher,scratch,task_agnostic_kd,tskd") -> None:
    """Run the whole TS-KD pipeline and its baselines on the embedded demo data; print the comparison table.

    Args:
        workdir: folder for the demo data, every stage's output and logs (a re-run skips finished stages).
        methods: comma-separated methods among teacher, scratch, task_agnostic_kd, mae, mocov3, tskd_no_synth, tskd.
    """
    from tsdk_monai.pipeline import run_demo

    run_demo(Path(workdir), [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods))


def run(
    datalist: str,
    workdir: str,
    n_labeled: str | int | None = None,
    seeds: str | int = "0",
    methods: str = "teacher,scratch,task_agnostic_kd,mae,mocov3,tskd_no_synth,tskd",
    student: str = "unet_small",
    student_size: int = 256,
    teacher_size: int = 256,
    teacher_epochs: int = 20,
    teacher_batch: int = 4,
    synth_size: int = 128,
    synth_epochs: int = 100,
    synth_images: int = 500,
    synth_steps: int = 50,
    fid_real_images: int = 256,
    distill_epochs: int = 50,
    ssl_epochs: int = 50,
    student_epochs: int = 100,
    batch_size: int = 8,
) -> None:
    """Run the stage bundles of each method for each number of labels and seed; write and print the report.

    For each (seed, n) the labelled subset is WORKDIR/splits/seed{s}_n{n}/datalist.json (n cases of DATALIST's
    'training' pool picked with the seed; the rest become unlabelled). Label-free stages (synthesis, task-agnostic KD,
    MAE, MoCo v3) run once per seed and are shared by every n. Finished stages (outputs present, same command,
    configs and inputs) are skipped; interrupted ones resume from their checkpoints. Each stage's exact
    `python -m monai.bundle run` command and output are in WORKDIR/logs; the report is WORKDIR/report.md.

    Args:
        datalist: a datalist made by `tsdk prepare` (its 'training' split is the labelled pool).
        workdir: output folder of every stage.
        n_labeled: comma-separated numbers of labelled cases, e.g. 20,40,80 (default: the whole pool).
        seeds: comma-separated seeds, e.g. 0,1,2.
        methods: comma-separated among teacher, scratch, task_agnostic_kd, mae, mocov3, tskd_no_synth, tskd.
        student: unet_small or vit_tiny.
        student_size: image side the student is trained at.
        teacher_size: image side the VFM teacher runs at (a multiple of 64 for LiteMedSAM).
        teacher_epochs, synth_epochs, distill_epochs, ssl_epochs, student_epochs: schedule lengths.
        teacher_batch: teacher batch size.
        synth_size: image side of the diffusion model.
        synth_images: number of synthetic images sampled.
        synth_steps: DDIM sampling steps.
        fid_real_images: real images in the synthetic images' Frechet distance.
        batch_size: student batch size.
    """
    from tsdk_monai.pipeline import DemoSizes, run_methods

    sizes = DemoSizes(student=student, student_size=student_size, teacher_size=teacher_size,
                      teacher_epochs=teacher_epochs, teacher_batch=teacher_batch, synth_size=synth_size,
                      synth_epochs=synth_epochs, synth_images=synth_images, synth_steps=synth_steps,
                      fid_real_images=fid_real_images, distill_epochs=distill_epochs, ssl_epochs=ssl_epochs,
                      student_epochs=student_epochs, batch_size=batch_size)
    print(run_methods(Path(datalist), Path(workdir), methods, sizes, n_labeled=n_labeled, seeds=seeds))
    print(f"\nreport: {Path(workdir) / 'report.md'}; plots: {Path(workdir) / 'plots'}")


def report(workdir: str, overlay_cases: int = 3) -> None:
    """Write WORKDIR/report.md (method x labels: Dice and HD95 mean +- std over seeds, parameters, CPU ms/image,
    stage minutes) and the plots WORKDIR/plots/dice_vs_labels.png and overlays.png; print the table.

    Args:
        workdir: a folder made by `tsdk run` or `tsdk demo`.
        overlay_cases: test cases in the overlay figure (predicted by each bundle's inference.json, once).
    """
    from tsdk_monai.report import write_report

    write_report(Path(workdir), overlay_cases=overlay_cases)


def main(argv: list[str] | None = None) -> None:
    import fire

    from tsdk_monai.utils import input_error_of

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire({"demo-data": demo_data, "prepare": prepare, "demo": demo, "run": run, "report": report}, command=argv, name="tsdk")
    except Exception as exc:  # bad input (also wrapped by a library): one line naming the file and the problem
        err = input_error_of(exc)
        if err is None:
            raise
        print(f"tsdk: error: {err}", file=sys.stderr)
        sys.exit(2)
