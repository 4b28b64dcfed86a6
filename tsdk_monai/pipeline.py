"""The pipeline driver: composes ``python -m monai.bundle run`` calls of the stage bundles.

It holds no method logic of its own: every stage is one bundle run with overrides, runnable by hand with the same
command (each stage's command is written to its log). A stage whose outputs exist and whose command is unchanged is
skipped (``stage.json`` holds the command's hash); an interrupted stage resumes through its bundle's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tsdk_monai.utils import atomic_write_json

__all__ = ["BUNDLES_DIR", "bundle_arg", "Stage", "StageRunner", "DemoSizes", "tskd_stages", "run_methods", "run_demo"]

logger = logging.getLogger(__name__)

BUNDLES_DIR = Path(os.environ.get("TSDK_BUNDLES", Path(__file__).resolve().parents[1] / "bundles"))


def bundle_arg(value: Any) -> str:
    """Format an override for ``python -m monai.bundle run --key value``.

    The bundle CLI (fire) parses Python literals: JSON's ``false``/``null`` would arrive as the truthy strings
    ``"false"``/``"null"``, so booleans and None are written as ``False``/``True``/``None``.
    """
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(repr(v) if not isinstance(v, str) else json.dumps(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Stage:
    """One bundle run: ``bundle`` with ``configs`` and ``overrides``; ``outputs`` must exist when it is done."""

    name: str
    bundle: str
    configs: Sequence[str]
    overrides: dict[str, Any]
    outputs: Sequence[Path]
    launcher: Sequence[str] = field(default_factory=lambda: [sys.executable, "-m"])

    def command(self) -> list[str]:
        root = BUNDLES_DIR / self.bundle
        cfg = [str(root / "configs" / c) for c in self.configs]
        cmd = list(self.launcher) + [
            "monai.bundle", "run", "--bundle_root", str(root),
            "--meta_file", str(root / "configs" / "metadata.json"),
            "--config_file", cfg[0] if len(cfg) == 1 else json.dumps(cfg),
            "--logging_file", str(root / "configs" / "logging.conf"),
        ]
        for k, v in self.overrides.items():
            cmd += [f"--{k}", bundle_arg(v)]
        return cmd


class StageRunner:
    """Run stages in order with logs in ``workdir/logs`` and skip those already done with the same command."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def run(self, stage: Stage) -> bool:
        """Run ``stage`` unless done; return True if it ran. Raises RuntimeError with the log tail on failure."""
        cmd = stage.command()
        digest = hashlib.sha256(json.dumps(cmd[2:]).encode()).hexdigest()[:16]
        marker = self.logs / f"{stage.name}.stage.json"
        if marker.is_file() and all(Path(p).exists() for p in stage.outputs):
            if json.loads(marker.read_text()).get("hash") == digest:
                print(f"[skip] {stage.name}: outputs present and command unchanged", flush=True)
                self.seconds[stage.name] = json.loads(marker.read_text()).get("seconds", 0.0)
                return False
        log = self.logs / f"{stage.name}.log"
        print(f"[run ] {stage.name} ... (log: {log})", flush=True)
        t0 = time.time()
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
        with log.open("w") as f:
            f.write("$ " + shlex.join(cmd) + "\n\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        secs = time.time() - t0
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"stage {stage.name} failed (exit {proc.returncode}); see {log}\n{tail}")
        missing = [str(p) for p in stage.outputs if not Path(p).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name} finished but did not write {', '.join(missing)}; see {log}")
        self.seconds[stage.name] = secs
        atomic_write_json(marker, {"hash": digest, "seconds": round(secs, 1), "command": cmd})
        print(f"[done] {stage.name} in {secs:.0f} s", flush=True)
        return True


@dataclass
class DemoSizes:
    """Schedule sizes; the defaults fit the demo (tiny data) in minutes on 2 CPU cores."""

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
    student_epochs: int = 12
    batch_size: int = 8


def tskd_stages(datalist: Path, workdir: Path, s: DemoSizes) -> dict[str, list[Stage]]:
    """The stages of each method on one datalist: method name -> its stages (shared ones appear under each)."""
    data = {"dataset_dir": str(Path(datalist).parent)}
    w = Path(workdir)
    teacher = Stage("teacher", "tsdk_teacher", ["train.json"], {
        **data, "ckpt_dir": str(w / "teacher" / "models"), "output_dir": str(w / "teacher" / "eval"),
        "train#trainer#max_epochs": s.teacher_epochs, "batch_size": s.teacher_batch, "progress": False,
        "image_size": s.teacher_size,
    }, [w / "teacher" / "models" / "teacher" / "model.pt"])
    teacher_eval = Stage("teacher_eval", "tsdk_teacher", ["train.json", "evaluate.json"], {
        **data, "ckpt_dir": str(w / "teacher" / "models"), "output_dir": str(w / "teacher" / "test"),
        "image_size": s.teacher_size,
    }, [w / "teacher" / "test" / "metrics.csv"])
    synth_common = {**data, "ckpt_dir": str(w / "synthesis" / "models"), "output_dir": str(w / "synthesis" / "synthetic"),
                    "image_size": s.synth_size}
    synthesis = Stage("synthesis_train", "tsdk_synthesis", ["train.json"], {
        **synth_common, "train#trainer#max_epochs": s.synth_epochs,
    }, [w / "synthesis" / "models" / "model.pt"])
    sampling = Stage("synthesis_sample", "tsdk_synthesis", ["train.json", "inference.json"], {
        **synth_common, "num_images": s.synth_images, "num_inference_steps": s.synth_steps,
        "quality#report#max_real_for_fid": s.fid_real_images, "quality#feature_extractor#img_size": s.teacher_size,
    }, [w / "synthesis" / "synthetic" / "synthetic_datalist.json"])

    def distill(name: str, configs: list[str], extra: dict[str, Any]) -> Stage:
        d = w / name
        return Stage(name, "tsdk_distill", configs, {
            **data, "ckpt_dir": str(d / "models"), "output_dir": str(d / "eval"), "student": s.student,
            "img_size": s.student_size, "train#trainer#max_epochs": s.distill_epochs, **extra,
        }, [d / "models" / "student_distilled.pt"])

    def student(name: str, init: Path | None) -> list[Stage]:
        d = w / name
        common = {**data, "ckpt_dir": str(d / "models"), "output_dir": str(d / "eval"), "student": s.student,
                  "image_size": s.student_size}
        train = Stage(f"{name}_finetune", "tsdk_student", ["train.json"], {
            **common, "train#trainer#max_epochs": s.student_epochs, "batch_size": s.batch_size,
            "init_ckpt": str(init) if init else "",
        }, [d / "models" / "model.pt"])
        evaluate = Stage(f"{name}_evaluate", "tsdk_student", ["train.json", "evaluate.json"], common,
                         [d / "eval" / "metrics.json"])
        return [train, evaluate]

    teacher_models = str(w / "teacher" / "models" / "teacher")
    tskd = distill("tskd_distill", ["train.json"], {
        "teacher_ckpt": teacher_models,
        "synthetic_datalist": str(w / "synthesis" / "synthetic" / "synthetic_datalist.json"),
    })
    tskd_no_synth = distill("tskd_no_synth_distill", ["train.json"], {"teacher_ckpt": teacher_models, "use_synthetic": False})
    ta_kd = distill("task_agnostic_kd_distill", ["train.json", "task_agnostic.json"],
                    {"use_synthetic": False, "vfm_img_size": s.teacher_size})
    return {
        "teacher": [teacher, teacher_eval],
        "scratch": student("scratch", None),
        "task_agnostic_kd": [ta_kd] + student("task_agnostic_kd", w / "task_agnostic_kd_distill" / "models" / "student_distilled.pt"),
        "tskd_no_synth": [teacher, tskd_no_synth] + student("tskd_no_synth", w / "tskd_no_synth_distill" / "models" / "student_distilled.pt"),
        "tskd": [teacher, synthesis, sampling, tskd] + student("tskd", w / "tskd_distill" / "models" / "student_distilled.pt"),
    }


def _teacher_test_dice(workdir: Path) -> float | None:
    f = workdir / "teacher" / "test" / "metrics.csv"
    if not f.is_file():
        return None
    for line in f.read_text().splitlines():
        parts = line.replace(",", "\t").split("\t")
        if parts and parts[0].endswith("mean_dice"):
            return float(parts[1])
    return None


def results_table(workdir: Path, methods: Sequence[str], runner: StageRunner) -> str:
    """A Markdown table: method, test mean Dice, HD95 and the CPU seconds its own stages took."""
    rows = ["| method | test Dice | test HD95 (px) | stage seconds |", "|---|---|---|---|"]
    for m in methods:
        secs = sum(v for k, v in runner.seconds.items() if k.startswith(m + "_") or k == m)
        if m == "teacher":
            dice = _teacher_test_dice(workdir)
            rows.append(f"| teacher (LiteMedSAM + LoRA, reference) | {dice:.3f} | - | {secs:.0f} |" if dice is not None
                        else "| teacher | n/a | - | - |")
            continue
        f = workdir / m / "eval" / "metrics.json"
        if not f.is_file():
            rows.append(f"| {m} | not run | | |")
            continue
        mean = json.loads(f.read_text())["mean"]
        hd = mean.get("test_hd95")
        rows.append(f"| {m} | {mean['test_mean_dice']:.3f} | {hd:.1f} | {secs:.0f} |" if hd is not None
                    else f"| {m} | {mean['test_mean_dice']:.3f} | n/a | {secs:.0f} |")
    return "\n".join(rows)


def run_methods(datalist: Path, workdir: Path, methods: Sequence[str], sizes: DemoSizes) -> str:
    """Run every stage of ``methods`` on ``datalist`` in ``workdir`` (skipping finished ones); return the table."""
    workdir = Path(workdir)
    stages = tskd_stages(datalist, workdir, sizes)
    unknown = [m for m in methods if m not in stages]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(stages)}")
    runner = StageRunner(workdir)
    done: set[str] = set()
    for m in methods:
        for st in stages[m]:
            if st.name not in done:
                runner.run(st)
                done.add(st.name)
    table = results_table(workdir, methods, runner)
    atomic_write_json(workdir / "results.json", {"sizes": sizes.__dict__, "seconds": runner.seconds})
    (workdir / "results.md").write_text(table + "\n")
    return table


def run_demo(workdir: Path, methods: Sequence[str] = ("teacher", "scratch", "task_agnostic_kd", "tskd"),
             sizes: DemoSizes | None = None) -> str:
    """Write the demo data, run every method's stages, print and return the comparison table."""
    from tsdk_monai.data import write_demo_data

    workdir = Path(workdir)
    sizes = sizes or DemoSizes()
    datalist = write_demo_data(workdir / "data", n=48, size=sizes.student_size, n_labeled=8)
    t0 = time.time()
    table = run_methods(datalist, workdir, methods, sizes)
    print()
    print(table)
    print(f"\nall stages: {time.time() - t0:.0f} s. This is a CPU demo on {len(json.loads(datalist.read_text())['training'])} "
          "labelled phantoms with minutes-long schedules: it shows the pipeline working end to end, not the method at full "
          "strength; for that, run `tsdk run --datalist DATA/datalist.json --workdir W` on real data.")
    return table
