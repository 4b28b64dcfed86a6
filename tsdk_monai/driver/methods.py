"""The method graph: which bundle runs, with which overrides, make each method of the comparison.

Every override is one of the few documented top-level knobs every training bundle has (``epochs``, ``learning_rate``,
``seed``, ``image_size``, ``batch_size``, ``resume``) or a documented knob of that bundle (``teacher_ckpt``,
``synthetic_datalist``, ``init_ckpt``, ...); the driver never writes a bundle's inner keys. Baselines are the same
bundles with other overrides (DESIGN section 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsdk_monai.layout import RunDirs
from tsdk_monai.driver.stages import Stage
from tsdk_monai.utils import TSDKInputError

__all__ = ["METHODS", "Schedule", "finetune_seed", "method_stages", "overlay_stages"]

#: every method of the comparison; ``teacher`` is the reference row, the others are students.
METHODS = ("teacher", "scratch", "task_agnostic_kd", "mae", "mocov3", "tskd_no_synth", "tskd")


@dataclass
class Schedule:
    """Schedule sizes; the defaults fit the demo (tiny data) in minutes on 2 CPU cores.

    ``iterations_like``: when set, ``teacher_epochs`` and ``student_epochs`` are meant for that many labelled cases;
    a run with ``n`` labels gets ``round(iterations_like / n)`` times as many epochs (and validates that much less
    often), so every number of labels trains for about the same number of iterations. ``extra`` maps a bundle name
    (``tsdk_synthesis``, ...) to more overrides for every stage of that bundle; ``method_extra`` maps a method (``tskd``,
    ...) to such a mapping for that method's own stages only (its distillation or pre-training and its student; not
    the teacher or the synthesis, which methods share), on top of ``extra``: a knob chosen per method on the
    validation split (e.g. a distilled student's fine-tuning learning rate). ``keep_aspect``: every stage
    letterboxes its images to its square size (the longer side resized, the shorter padded) instead of squashing them
    (the bundles' ``keep_aspect``; the same geometry for the teacher, the synthesis, the students and their inference).
    ``finetune_seeds``: every student is fine-tuned and evaluated this many times from the same start (its distilled
    or pre-trained network, or scratch), with the fine-tuning seeds :func:`finetune_seed` gives: the spread of the
    few-label fine-tuning at the cost of fine-tunings only (a whole seed reruns the teacher and every label-free stage).
    ``student_epochs_factor``: a student method's fine-tuning runs this many times ``student_epochs`` (chosen on the
    validation split, like ``method_extra``'s knobs: a student that starts from nothing or from label-free features
    needs more fine-tuning than a distilled one), scaled by the number of labels as every student is, and validated
    as many times (``student_epochs``) over its longer run.
    """

    student: str = "unet_small"
    student_size: int = 128
    teacher_size: int = 128
    teacher_epochs: int = 8
    teacher_batch: int = 4
    synth_size: int = 64
    synth_epochs: int = 20
    synth_images: int = 16
    synth_steps: int = 20
    fid_real_images: int = 32
    distill_epochs: int = 10
    ssl_epochs: int = 10
    student_epochs: int = 12
    batch_size: int = 8
    iterations_like: int | None = None
    keep_aspect: bool = False
    finetune_seeds: int = 1
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_extra: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    student_epochs_factor: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.method_extra) - set(METHODS))
        if unknown:
            raise TSDKInputError(f"method_extra: not a method: {', '.join(unknown)} (methods: {', '.join(METHODS)})")
        students = METHODS[1:]
        for m, f in self.student_epochs_factor.items():
            if m not in students:
                raise TSDKInputError(f"student_epochs_factor: not a student method: {m} "
                                     f"(students: {', '.join(students)})")
            _check_count(f"student_epochs_factor[{m!r}]", f)
        _check_count("finetune_seeds", self.finetune_seeds)

    def epoch_scale(self, n_labeled: int) -> int:
        """The factor of the teacher's and the students' fine-tuning epochs for ``n_labeled`` labels."""
        if not self.iterations_like:
            return 1
        return max(1, round(self.iterations_like / max(1, int(n_labeled))))


def _check_count(name: str, value: Any) -> None:
    """Refuse a ``value`` that is not a whole number >= 1 (a bool is not one), naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TSDKInputError(f"{name} must be a whole number >= 1, got {value!r}")


def finetune_seed(seed: int, k: int) -> int:
    """The bundle seed of the ``k``-th fine-tuning of a student in the run of ``seed``: ``seed`` itself for ``k`` 0 (the
    seed of every other stage of the run), then ``seed + 1000 * k`` (apart from the runs' own seeds 0, 1, 2, ...)."""
    return int(seed) + 1000 * int(k)


#: the teacher validates about this many times (or after every epoch if it trains fewer): each pass scores the whole
#: validation split with the 9.5M-parameter teacher, as long as ~20 training iterations at 128 px on 2 CPU cores
TEACHER_VALIDATIONS = 8


def _divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` not above ``cap`` (at least 1), so the last epoch is always validated."""
    return max([d for d in range(1, max(1, cap) + 1) if n % d == 0], default=1)


def method_stages(
    datalist: Path,
    dirs: RunDirs,
    s: Schedule,
    *,
    pool_datalist: Path | None = None,
    seed: int = 0,
    prefix: str = "",
    shared_prefix: str = "",
    epoch_scale: int = 1,
) -> dict[str, list[Stage]]:
    """The stages of each method: method name -> its stages, in order (a stage shared by methods is one object).

    Args:
        datalist: the few-label datalist; the stages that use labels write under ``dirs.labelled``.
        dirs: the run's folders (:class:`~tsdk_monai.layout.RunDirs`).
        pool_datalist: a datalist with the same ``training + unlabeled`` images (default ``datalist``): the stages
            that use no label (synthesis, task-agnostic KD, MAE, MoCo v3) read it and write under ``dirs.shared``,
            so several numbers of labels share them.
        seed: the ``seed`` of every stage's bundle (the training of the teacher, the synthesis, the distillation, the
            pre-training and the students).
        prefix, shared_prefix: stage-name prefixes (logs and skip records of several runs in one folder).
        epoch_scale: factor of the teacher's and the students' fine-tuning epochs and of the students' validation
            interval (:meth:`Schedule.epoch_scale`); the teacher validates :data:`TEACHER_VALIDATIONS` times.
    """
    datalist = Path(datalist).absolute()
    pool = Path(pool_datalist).absolute() if pool_datalist else datalist

    def data(d: Path) -> dict[str, Any]:  # every stage: its data, its seed and the run's geometry
        return {"dataset_dir": str(d.parent), "datalist": str(d), "seed": seed, **geometry_of(s)}

    def extra(bundle: str, method: str | None = None) -> dict[str, Any]:  # the bundle's, then the method's own
        return {**s.extra.get(bundle, {}), **(s.method_extra.get(method, {}).get(bundle, {}) if method else {})}

    teacher_epochs = s.teacher_epochs * epoch_scale
    teacher_every = _divisor_at_most(teacher_epochs, teacher_epochs // TEACHER_VALIDATIONS)
    teacher_models = dirs.teacher_models
    teacher = Stage(f"{prefix}teacher", "tsdk_teacher", ["train.json"], {
        **data(datalist), "ckpt_dir": str(dirs.teacher_ckpt), "output_dir": str(dirs.method("teacher") / "eval"),
        "epochs": teacher_epochs, "batch_size": s.teacher_batch, "image_size": s.teacher_size,
        "progress": False, **({"val_interval": teacher_every} if teacher_every > 1 else {}), **extra("tsdk_teacher"),
    }, [teacher_models / "model.pt"], inputs=[datalist], clean=[dirs.teacher_ckpt, dirs.method("teacher") / "eval"])
    teacher_eval = Stage(f"{prefix}teacher_eval", "tsdk_teacher", ["train.json", "evaluate.json"], {
        **data(datalist), "ckpt_dir": str(dirs.teacher_ckpt), "output_dir": str(dirs.evaluation("teacher")),
        "image_size": s.teacher_size, **extra("tsdk_teacher"),
    }, [dirs.metrics("teacher")], inputs=[datalist, teacher_models], clean=[dirs.evaluation("teacher")])

    syn = dirs.synthesis
    synth_common = {**data(pool), "ckpt_dir": str(syn / "models"), "output_dir": str(syn / "synthetic"),
                    "image_size": s.synth_size}
    synthesis = Stage(f"{shared_prefix}synthesis_train", "tsdk_synthesis", ["train.json"], {
        **synth_common, "epochs": s.synth_epochs, **extra("tsdk_synthesis"),
    }, [syn / "models" / "model.pt"], inputs=[pool], clean=[syn / "models"])
    sampling = Stage(f"{shared_prefix}synthesis_sample", "tsdk_synthesis", ["train.json", "inference.json"], {
        **synth_common, "num_images": s.synth_images, "num_inference_steps": s.synth_steps,
        "fid_real_images": s.fid_real_images, "vfm_image_size": s.teacher_size, **extra("tsdk_synthesis"),
    }, [dirs.synthetic_datalist], inputs=[pool, syn / "models" / "model.pt"], clean=[syn / "synthetic"])

    def distill(name: str, d_list: Path, configs: list[str], over: dict[str, Any], inputs: list[Path],
                shared: bool) -> Stage:
        d = dirs.distill(name, shared)
        return Stage(f"{shared_prefix if shared else prefix}{name}_distill", "tsdk_distill", configs, {
            **data(d_list), "ckpt_dir": str(d / "distill"), "output_dir": str(d / "distill_eval"),
            "student": s.student, "image_size": s.student_size, "teacher_image_size": s.teacher_size,
            "epochs": s.distill_epochs, **over,
            **extra("tsdk_distill", name),
        }, [d / "distill" / "student_distilled.pt"], inputs=[d_list] + inputs, clean=[d / "distill", d / "distill_eval"])

    def ssl(method: str) -> Stage:
        c = dirs.pretrain(method)
        return Stage(f"{shared_prefix}{method}_pretrain", "tsdk_ssl", ["train.json"], {
            **data(pool), "ckpt_dir": str(c), "student": s.student, "image_size": s.student_size, "method": method,
            "epochs": s.ssl_epochs, "use_synthetic": False, "progress": False, **extra("tsdk_ssl", method),
        }, [c / "student_pretrained.pt"], inputs=[pool], clean=[c])

    def student(method: str, init: Path | None) -> list[Stage]:
        factor = s.student_epochs_factor.get(method, 1) * epoch_scale
        epochs = s.student_epochs * factor
        every = factor  # student_epochs validations, the last epoch's included
        stages = []
        for k in range(s.finetune_seeds):  # the same start, another fine-tuning seed: stages ``*_finetune{k}``
            tag = str(k) if k else ""
            common = {**data(datalist), "seed": finetune_seed(seed, k), "ckpt_dir": str(dirs.models(method, k)),
                      "output_dir": str(dirs.evaluation(method, k)), "student": s.student, "image_size": s.student_size}
            train = Stage(f"{prefix}{method}_finetune{tag}", "tsdk_student", ["train.json"], {
                **common, "epochs": epochs, "batch_size": s.batch_size, "init_ckpt": str(init) if init else "",
                **({"val_interval": every} if every > 1 else {}), **extra("tsdk_student", method),
            }, [dirs.model(method, k)], inputs=[datalist] + ([init] if init else []),
                clean=[dirs.models(method, k), dirs.evaluation(method, k)])
            evaluate = Stage(f"{prefix}{method}_evaluate{tag}", "tsdk_student", ["train.json", "evaluate.json"],
                             {**common, **extra("tsdk_student", method)}, [dirs.metrics(method, k)],
                             inputs=[datalist, dirs.model(method, k)])
            stages += [train, evaluate]
        return stages

    # TS-KD and its no-synthesis ablation read the same teacher targets of the same real images: one disk cache
    cache = {"teacher_ckpt": str(dirs.teacher_ckpt), "teacher_cache_mode": "disk",
             "teacher_cache_dir": str(dirs.teacher_ckpt / "distill_cache")}
    tskd = distill("tskd", datalist, ["train.json"], {**cache, "synthetic_datalist": str(dirs.synthetic_datalist)},
                   [teacher_models, dirs.synthetic_datalist.parent], False)
    tskd_no_synth = distill("tskd_no_synth", datalist, ["train.json"], {**cache, "use_synthetic": False},
                            [teacher_models], False)
    ta_kd = distill("task_agnostic_kd", pool, ["train.json", "task_agnostic.json"],
                    {"use_synthetic": False, "vfm_image_size": s.teacher_size}, [], True)
    mae, moco = ssl("mae"), ssl("mocov3")

    def init_of(st: Stage) -> Path:
        return Path(st.outputs[0])

    return {
        "teacher": [teacher, teacher_eval],
        "scratch": student("scratch", None),
        "task_agnostic_kd": [ta_kd] + student("task_agnostic_kd", init_of(ta_kd)),
        "mae": [mae] + student("mae", init_of(mae)),
        "mocov3": [moco] + student("mocov3", init_of(moco)),
        "tskd_no_synth": [teacher, tskd_no_synth] + student("tskd_no_synth", init_of(tskd_no_synth)),
        "tskd": [teacher, synthesis, sampling, tskd] + student("tskd", init_of(tskd)),
    }


def geometry_of(s: Schedule) -> dict[str, Any]:
    """The geometry override of every stage of ``s`` (none for the bundles' default, squashing)."""
    return {"keep_aspect": True} if s.keep_aspect else {}


def overlay_stages(dirs: RunDirs, methods: list[str], s: Schedule, num_classes: int, datalist: Path,
                   prefix: str = "") -> dict[str, Stage]:
    """Inference of the teacher and of each student of one run on ``datalist``'s test split (the report's figure).

    The bundles' own ``inference.json`` with their preprocessing, inferer and postprocessing, and the post-processing
    each model chose on the validation split (its ``postprocess.json``: the figure shows what the test scored);
    predictions are saved as NIfTI in ``dirs.overlay(method)``. Returns method -> stage.
    """
    datalist = Path(datalist).absolute()
    out: dict[str, Stage] = {}
    for m in methods:
        o = dirs.overlay(m)
        common = {"output_dir": str(o), "output_ext": ".nii.gz", "postprocess": str(dirs.postprocess(m)),
                  **geometry_of(s)}
        if m == "teacher":
            out[m] = Stage(f"{prefix}teacher_overlay", "tsdk_teacher", ["inference.json"], {
                "dataset_dir": str(datalist.parent), "datalist": str(datalist), "infer_split": "test",
                "ckpt_dir": str(dirs.teacher_ckpt), **common,
            }, [o], inputs=[datalist, dirs.teacher_models], clean=[o])
        else:
            out[m] = Stage(f"{prefix}{m}_overlay", "tsdk_student", ["inference.json"], {
                "input_datalist": str(datalist), "input_split": "test", "ckpt_dir": str(dirs.models(m)), **common,
                "student": s.student, "image_size": s.student_size, "num_classes": int(num_classes),
            }, [o], inputs=[datalist, dirs.model(m)], clean=[o])
    return out
