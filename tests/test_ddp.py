"""Every training bundle under ``torchrun --nproc_per_node=2`` (gloo on the CPU), for a few iterations on the demo data.

Each run checks what data-parallel training promises:

- both ranks end with identical weights (``RankWeightsSaver`` writes ``rank0.pt`` and ``rank1.pt``; every tensor
  is compared with ``torch.equal``);
- only rank 0 writes checkpoints, models and TensorBoard logs: rank 1's own log (torchrun ``--tee`` prefixes every
  line with its rank) never reports a save, the output folders hold exactly the expected files, and all TensorBoard
  event files come from one process.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_bundle

pytestmark = pytest.mark.slow

# what a bundle logs when it writes a checkpoint or a model (MONAI CheckpointSaver, TeacherSaver, save_student)
SAVE_LOGS = ("Saved checkpoint at", "saved final checkpoint", "saved teacher to", "saved the distilled student")


@pytest.fixture(autouse=True)
def _one_thread_per_rank(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores


def _torchrun() -> list[str]:
    with socket.socket() as s:  # a free port: other tests may run torchrun at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    # --tee=3: every line of rank R's stdout/stderr is echoed with the prefix "[defaultR]:"
    return [str(torchrun), "--nproc_per_node=2", f"--master_port={port}", "--tee=3", "-m"]


def _run_ddp(bundle: str, overrides: dict, rank_dir: Path) -> dict[int, str]:
    """Run ``train.json`` + ``multi_gpu_train.json`` under torchrun; return each rank's log."""
    proc = run_bundle(bundle, ["train.json", "multi_gpu_train.json"], {**overrides, "rank_weights_dir": str(rank_dir)},
                      launcher=_torchrun(), timeout=600)
    logs: dict[int, list[str]] = {0: [], 1: []}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"\[default(\d)\]:(.*)", line)
        if m:
            logs[int(m.group(1))].append(m.group(2))
    return {r: "\n".join(lines) for r, lines in logs.items()}


def _check_ranks(logs: dict[int, str], rank_dir: Path, saves: tuple[str, ...]) -> None:
    """Identical weights on both ranks; every message of ``saves`` in rank 0's log and no save in rank 1's."""
    assert sorted(p.name for p in rank_dir.iterdir()) == ["rank0.pt", "rank1.pt"]
    w0, w1 = (torch.load(rank_dir / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and len(w0) > 0
    differ = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not differ, f"{len(differ)} of {len(w0)} tensors differ between the ranks, e.g. {differ[:5]}"
    assert logs[0] and logs[1], "torchrun --tee gave no per-rank log"
    for msg in saves:
        assert msg in logs[0], f"rank 0 did not log {msg!r}:\n{logs[0][-3000:]}"
    written = [line for line in logs[1].splitlines() if any(s in line for s in SAVE_LOGS)]
    assert not written, f"rank 1 saved: {written}"


def _event_pids(folder: Path) -> set[str]:
    """The process ids in the TensorBoard event file names (``events.out.tfevents.<time>.<host>.<pid>.<n>``)."""
    return {f.name.split(".")[-2] for f in folder.rglob("events.out.tfevents.*")}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_teacher_ddp(demo_datalist, tmp_path):
    o = {"dataset_dir": str(demo_datalist.parent), "ckpt_dir": str(tmp_path / "models"),
         "output_dir": str(tmp_path / "eval"), "image_size": 64, "batch_size": 1, "max_iterations": 2,
         "progress": False, "train#trainer#max_epochs": 1}
    logs = _run_ddp("tsdk_teacher", o, tmp_path / "ranks")
    _check_ranks(logs, tmp_path / "ranks", ("Saved checkpoint at epoch: 1", "saved teacher to"))
    files = _files(tmp_path / "models")
    resume = [f for f in files if not f.startswith("teacher/")]
    assert len(resume) == 1 and resume[0].startswith("train/") and resume[0].endswith("epoch=1.pt"), files
    assert {"teacher/model.pt", "teacher/teacher.json", "teacher/decoder.safetensors"} <= set(files)
    assert len(_event_pids(tmp_path / "eval")) == 1


def test_synthesis_ddp(demo_datalist, tmp_path):
    o = {"dataset_dir": str(demo_datalist.parent), "ckpt_dir": str(tmp_path / "models"),
         "log_dir": str(tmp_path / "logs"), "output_dir": str(tmp_path / "synthetic"), "image_size": 32,
         "network_def#block_out_channels": [16, 32, 32], "batch_size": 4, "train#trainer#max_epochs": 1}
    logs = _run_ddp("tsdk_synthesis", o, tmp_path / "ranks")
    _check_ranks(logs, tmp_path / "ranks", ("Saved checkpoint at epoch: 1", "saved final checkpoint"))
    assert _files(tmp_path / "models") == ["checkpoint_epoch=1.pt", "model.pt"]
    assert len(_event_pids(tmp_path / "logs")) == 1


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A teacher stage's ckpt_dir: LiteMedSAM + LoRA at 64x64 (untrained decoder: the DDP logic is the same)."""
    from tsdk_monai.networks import LoRASegTeacher, save_teacher

    torch.manual_seed(0)
    ckpt_dir = tmp_path_factory.mktemp("ddp_teacher") / "models"
    save_teacher(LoRASegTeacher(num_classes=2, img_size=64), ckpt_dir / "teacher")
    return ckpt_dir


def test_distill_ddp(demo_datalist, teacher_ckpt, tmp_path):
    """The KD loss's projection is DDP-wrapped with the student, so it must agree across ranks too."""
    o = {"dataset_dir": str(demo_datalist.parent), "ckpt_dir": str(tmp_path / "models"),
         "output_dir": str(tmp_path / "eval"), "teacher_ckpt": str(teacher_ckpt / "teacher" / "model.pt"),
         "image_size": 64, "batch_size": 2, "train#trainer#max_epochs": 1, "use_unlabeled": False}
    logs = _run_ddp("tsdk_distill", o, tmp_path / "ranks")
    _check_ranks(logs, tmp_path / "ranks", ("Saved checkpoint at epoch: 1", "saved the distilled student"))
    w = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)
    assert any(k.startswith("loss.") for k in w), "the KD loss's projection is not among the compared weights"
    assert _files(tmp_path / "models") == ["distill/checkpoint_epoch=1.pt", "student_distilled.pt"]
    student = torch.load(tmp_path / "models" / "student_distilled.pt", weights_only=True)
    assert all(torch.equal(v, w[f"network.{k}"]) for k, v in student.items())  # rank 0's final weights were saved


def test_student_ddp(demo_datalist, tmp_path):
    o = {"dataset_dir": str(demo_datalist.parent), "ckpt_dir": str(tmp_path / "models"),
         "output_dir": str(tmp_path / "eval"), "image_size": 64, "batch_size": 2, "train#trainer#max_epochs": 1}
    logs = _run_ddp("tsdk_student", o, tmp_path / "ranks")
    _check_ranks(logs, tmp_path / "ranks", ("Saved checkpoint at epoch: 1",))
    assert _files(tmp_path / "models") == ["checkpoint_epoch=1.pt", "model.pt"]
    assert len(_event_pids(tmp_path / "eval")) == 1
