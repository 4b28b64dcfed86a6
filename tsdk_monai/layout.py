"""The folder layout of a ``tsdk run``: the one place that spells it, for the driver that writes it and the report
that reads it.

::

    W/run.json, W/report.md, W/report.json      the plan (:class:`RunLayout.manifest`), the report
    W/networks.json, W/plots/                   parameters and CPU speed of the networks, the figures
    W/logs/<stage>.log, <stage>.stage.json      each stage's output and its skip/resume marker
    W/splits/seed{s}_n{n}/datalist.json         the few-label split of seed s with n labels
    W/seed{s}/shared/...                        stages that use no label (synthesis, task-agnostic KD, MAE, MoCo v3)
    W/seed{s}/n{n}/<method>/...                 the teacher, TS-KD distillation, each student's fine-tune, evaluation
                                                and overlay predictions (:class:`RunDirs`)
    W/seed{s}/n{n}/<method>/finetune{k}/...     a student's k-th extra fine-tuning seed (``models/``, ``eval/``)

Stage names: ``s{s}_<stage>`` for shared stages, ``s{s}_n{n}_<stage>`` for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDirs", "RunLayout"]


@dataclass(frozen=True)
class RunDirs:
    """The folders of one (seed, n) run: ``labelled`` holds the stages that use its labels, ``shared`` the label-free
    stages it shares with the other numbers of labels of its seed (the same folder for a single run)."""

    labelled: Path
    shared: Path

    @classmethod
    def of(cls, run: dict) -> "RunDirs":
        """The folders of a run as ``run.json`` records it (``{"dir": ..., "shared": ...}``)."""
        return cls(Path(run["dir"]), Path(run.get("shared", run["dir"])))

    def method(self, method: str) -> Path:
        """The folder of a method's labelled stages (``teacher`` for the teacher)."""
        return self.labelled / method

    @property
    def teacher_ckpt(self) -> Path:
        """The teacher stage's ``ckpt_dir`` (what the distillation takes as ``teacher_ckpt``)."""
        return self.labelled / "teacher" / "models"

    @property
    def teacher_models(self) -> Path:
        """The saved teacher (``teacher.json``, adapter, decoder, merged ``model.pt``)."""
        return self.teacher_ckpt / "teacher"

    def _finetune(self, method: str, k: int) -> Path:
        """The folder of a method's ``k``-th fine-tuning seed: the method's own folder for ``k`` 0 (the teacher has no
        other), ``finetune{k}/`` in it for a student's extra fine-tuning seeds."""
        if k == 0:
            return self.method(method)
        if method == "teacher" or k < 0:
            raise ValueError(f"{method}: no fine-tuning seed {k}")
        return self.method(method) / f"finetune{k}"

    def models(self, method: str, k: int = 0) -> Path:
        """The ``ckpt_dir`` of a method's training stage (teacher or student fine-tune; ``k``: its fine-tuning seed)."""
        return self._finetune(method, k) / "models"

    def model(self, method: str, k: int = 0) -> Path:
        """The trained network of a method: the teacher's merged ``model.pt`` or the student's best ``model.pt``."""
        return (self.teacher_models if method == "teacher" else self.models(method, k)) / "model.pt"

    def evaluation(self, method: str, k: int = 0) -> Path:
        """The ``output_dir`` of a method's test evaluation."""
        return self._finetune(method, k) / ("test" if method == "teacher" else "eval")

    def metrics(self, method: str, k: int = 0) -> Path:
        """The test ``metrics.json`` of a method (``tsdk_teacher`` and ``tsdk_student`` evaluate write one layout)."""
        return self.evaluation(method, k) / "metrics.json"

    def postprocess(self, method: str, k: int = 0) -> Path:
        """The ``postprocess.json`` of a method's evaluation (the post-processing it chose on the validation split): a
        student's beside its ``model.pt`` (its ``inference.json`` reads it), the teacher's in its test folder (its
        model folder feeds the distillation's teacher cache, whose key must not change when it is evaluated)."""
        return (self.evaluation(method) if method == "teacher" else self.models(method, k)) / "postprocess.json"

    def overlay(self, method: str) -> Path:
        """The predictions of a method on the overlay figure's test cases."""
        return self.method(method) / "overlay"

    @property
    def synthesis(self) -> Path:
        return self.shared / "synthesis"

    @property
    def synthetic_datalist(self) -> Path:
        return self.synthesis / "synthetic" / "synthetic_datalist.json"

    def pretrain(self, method: str) -> Path:
        """The ``ckpt_dir`` of a label-free pre-training (``mae``, ``mocov3``)."""
        return self.shared / method / "pretrain"

    def distill(self, name: str, shared: bool = False) -> Path:
        """The folder of a distillation (``tskd``, ``tskd_no_synth``; ``task_agnostic_kd`` is ``shared``)."""
        return (self.shared if shared else self.labelled) / name


@dataclass(frozen=True)
class RunLayout:
    """The files and folders of a run folder ``root`` (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def networks(self) -> Path:
        return self.root / "networks.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"

    def marker(self, stage: str) -> Path:
        return self.logs / f"{stage}.stage.json"

    @staticmethod
    def key(seed: int, n: int) -> str:
        """The name of the (seed, n) run in ``run.json``."""
        return f"seed{seed}_n{n}"

    def split(self, seed: int, n: int) -> Path:
        """The folder of the few-label split of (seed, n) (its ``datalist.json`` and links to the data)."""
        return self.root / "splits" / self.key(seed, n)

    def run(self, seed: int, n: int) -> RunDirs:
        return RunDirs(self.root / f"seed{seed}" / f"n{n}", self.root / f"seed{seed}" / "shared")

    @staticmethod
    def prefix(seed: int, n: int | None = None) -> str:
        """The stage-name prefix of (seed, n), or of a seed's shared stages when ``n`` is None."""
        return f"s{seed}_" if n is None else f"s{seed}_n{n}_"
