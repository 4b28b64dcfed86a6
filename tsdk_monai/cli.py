"""The ``tsdk`` command (also ``python -m tsdk_monai``).

    tsdk demo-data OUT [--n 40] [--size 128] [--num_classes 2] [--n_labeled 8] [--seed 0]
        write the embedded ultrasound-like demo phantoms and their datalist to OUT
    tsdk prepare IMAGES LABELS OUT [--n_labeled 80] [--seed 0] [--test_fraction 0.2] [--val_fraction 0.1]
        check an images/labels folder pair and write OUT/datalist.json with a grouped, seeded split
    tsdk demo [--workdir tsdk_demo] [--methods teacher,scratch,...]
        run the teacher, synthesis, distillation and student bundles on the demo data; print the comparison table

    tsdk run --datalist D/datalist.json --workdir W [--n_labeled 20,40,80] [--seeds 0,1,2] [--methods ...]
             [--preset cpu|full|smoke] [--finetune_seeds 3]
        run the stage bundles of each method (teacher, scratch, task_agnostic_kd, mae, mocov3, tskd_no_synth, tskd)
        for each number of labels and seed; skip finished stages; write W/report.md and print the table
    tsdk report W
        (re)write W/report.md and the plots W/plots/dice_vs_labels.png, W/plots/overlays.png; print the table
    tsdk export W OUT [--method tskd] [--n_labeled 80] [--seed 0] [--version 1.0.0] [--onnx]
        write a trained student of W as a zoo-ready bundle OUT/<name>/ and OUT/<name>_v<version>.zip

Run ``tsdk COMMAND --help`` for every option. Bad input stops with one line naming the file and the problem.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["main", "demo", "run", "report"]


def demo(workdir: str = "tsdk_demo", methods: str = "teacher,scratch,task_agnostic_kd,mae,mocov3,tskd_no_synth,tskd") -> None:
    """Run the whole TS-KD pipeline and its baselines on the embedded demo data; print the comparison table.

    Args:
        workdir: folder for the demo data, every stage's output and logs (a re-run skips finished stages).
        methods: comma-separated methods among teacher, scratch, task_agnostic_kd, mae, mocov3, tskd_no_synth, tskd.
    """
    from tsdk_monai.driver import run_demo

    run_demo(Path(workdir), [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods))


def run(
    datalist: str,
    workdir: str,
    n_labeled: str | int | None = None,
    seeds: str | int = "0",
    methods: str = "teacher,scratch,task_agnostic_kd,mae,mocov3,tskd_no_synth,tskd",
    preset: str | None = None,
    student: str | None = None,
    student_size: int | None = None,
    teacher_size: int | None = None,
    teacher_epochs: int | None = None,
    teacher_batch: int | None = None,
    synth_size: int | None = None,
    synth_epochs: int | None = None,
    synth_images: int | None = None,
    synth_steps: int | None = None,
    fid_real_images: int | None = None,
    distill_epochs: int | None = None,
    ssl_epochs: int | None = None,
    student_epochs: int | None = None,
    batch_size: int | None = None,
    keep_aspect: bool | None = None,
    finetune_seeds: int | None = None,
) -> None:
    """Run the stage bundles of each method for each number of labels and seed; write and print the report.

    For each (seed, n) the labelled subset is WORKDIR/splits/seed{s}_n{n}/datalist.json (n cases of DATALIST's
    'training' pool picked with the seed; the rest become unlabelled). Label-free stages (synthesis, task-agnostic KD,
    MAE, MoCo v3) run once per seed and are shared by every n. Finished stages (outputs present, same command,
    configs, inputs and package code) are skipped; interrupted ones resume from their checkpoints. Each stage's exact
    `python -m monai.bundle run` command and output are in WORKDIR/logs; the report is WORKDIR/report.md.

    Args:
        datalist: a datalist made by `tsdk prepare` (its 'training' split is the labelled pool).
        workdir: output folder of every stage.
        n_labeled: comma-separated numbers of labelled cases, e.g. 20,40,80 (default: the whole pool).
        seeds: comma-separated seeds, e.g. 0,1,2.
        methods: comma-separated among teacher, scratch, task_agnostic_kd, mae, mocov3, tskd_no_synth, tskd.
        preset: a named schedule: cpu (the measured CPU schedule of bench/, within 2 hours on 2 cores for 7 methods
            x 2 numbers of labels), full (paper scale, a GPU), smoke (wiring only); the flags below override it.
            Without one: 256 px, long schedules.
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
        keep_aspect: letterbox every image to the square sizes above (longer side resized, shorter side padded)
            instead of squashing it: for non-square images whose shapes matter; the exported student keeps it.
        finetune_seeds: fine-tune (and evaluate) every student this many times per seed from the same distilled or
            pre-trained start, with fine-tuning seeds s, s + 1000, s + 2000, ...: the report's mean ± std and TS-KD's
            intervals then average the fine-tuning's noise (the cpu preset: 3); cheaper than more --seeds, which
            rerun the teacher and every label-free stage too.
    """
    from tsdk_monai.driver import run_methods, schedule_of

    sizes = schedule_of(preset, student=student, student_size=student_size, teacher_size=teacher_size,
                        teacher_epochs=teacher_epochs, teacher_batch=teacher_batch, synth_size=synth_size,
                        synth_epochs=synth_epochs, synth_images=synth_images, synth_steps=synth_steps,
                        fid_real_images=fid_real_images, distill_epochs=distill_epochs, ssl_epochs=ssl_epochs,
                        student_epochs=student_epochs, batch_size=batch_size, keep_aspect=keep_aspect,
                        finetune_seeds=finetune_seeds)
    print(run_methods(Path(datalist), Path(workdir), methods, sizes, n_labeled=n_labeled, seeds=seeds))
    print(f"\nreport: {Path(workdir) / 'report.md'}; plots: {Path(workdir) / 'plots'}")


def report(workdir: str) -> None:
    """Write WORKDIR/report.md (method x labels: Dice and HD95 mean +- std over seeds, parameters, CPU ms/image,
    stage minutes) and the plots WORKDIR/plots/dice_vs_labels.png and overlays.png from what `tsdk run` wrote there
    (it runs nothing); print the table.

    Args:
        workdir: a folder made by `tsdk run` or `tsdk demo`.
    """
    from tsdk_monai.report import write_report

    write_report(Path(workdir))


def main(argv: list[str] | None = None) -> None:
    import fire

    from tsdk_monai.utils import input_error_of

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tsdk_monai.data import prepare, write_demo_data  # the library's own functions are the commands
    from tsdk_monai.export import export_bundle

    commands = {"demo-data": write_demo_data, "prepare": prepare, "demo": demo, "run": run, "report": report,
                "export": export_bundle}
    try:
        fire.Fire(commands, command=argv, name="tsdk")
    except Exception as exc:  # bad input (also wrapped by a library): one line naming the file and the problem
        err = input_error_of(exc)
        if err is None:
            raise
        print(f"tsdk: error: {err}", file=sys.stderr)
        sys.exit(2)
