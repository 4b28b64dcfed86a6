"""Interruption and determinism.

Each training stage is started as ``python -m monai.bundle run``, killed (SIGTERM or SIGKILL, to its whole process
group) a seeded random number of iterations after its first checkpoint, and run again with the same command: the
second run must restore the newest checkpoint, not repeat finished epochs, and finish the schedule. After the kill,
every file in the stage's output folders must be complete (it loads) or carry a temporary name
(``.NAME.XXXX.tmp``): a kill never leaves a file that looks complete but is not. The same seed gives the same split
and, on the CPU, the same trained weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import BUNDLES, REPO, _arg, _env, run_bundle
from tsdk_monai.handlers import AtomicCheckpointSaver, latest_checkpoint

ITERATION = re.compile(r"Epoch: \d+/\d+, Iter: \d+/\d+ -- train_loss")
TRAINER_EPOCH = re.compile(r"Trainer - INFO - Epoch\[(\d+)\] Complete")


# ------------------------------------------------------------------------------------- what a kill leaves
def _is_temporary(path: Path, root: Path) -> bool:
    return any(p.startswith(".") and p.endswith(".tmp") for p in path.relative_to(root).parts)


def assert_complete(root: Path) -> list[Path]:
    """Every file under ``root`` is complete (it loads) or has a temporary name; return the temporary ones."""
    from safetensors.torch import load_file

    temporary = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if _is_temporary(f, root):
            temporary.append(f)
        elif f.suffix in (".pt", ".pth"):
            torch.load(f, map_location="cpu", weights_only=True)
        elif f.suffix == ".safetensors":
            load_file(str(f))
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".png" or f.name.endswith(".nii.gz"):
            from tsdk_monai.data import read_array

            read_array(f)
        else:  # logs and TensorBoard event files are appended to as they go
            assert "tfevents" in f.name or f.suffix in (".log", ".txt", ".csv", ".md"), f"unexpected file {f}"
    return temporary


# --------------------------------------------------------------------------------------- the stages
def _teacher_dir(tmp_path: Path) -> Path:
    from tsdk_monai.networks import LoRASegTeacher, save_teacher

    torch.manual_seed(0)
    save_teacher(LoRASegTeacher(num_classes=2, img_size=64), tmp_path / "teacher" / "teacher")
    return tmp_path / "teacher"


@pytest.fixture(scope="module")
def tiny_data(demo_datalist, tmp_path_factory) -> Path:
    """The demo data set cut to 4 labelled, 1 validation, 2 unlabelled and 1 test case: 2 iterations per epoch."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    shutil.copytree(Path(demo_datalist).parent, root)
    data = json.loads((root / "datalist.json").read_text())
    for split, n in (("training", 4), ("validation", 1), ("unlabeled", 2), ("test", 1)):
        data[split] = data[split][:n]
    (root / "datalist.json").write_text(json.dumps(data))
    return root


def _stages(data: Path, w: Path) -> dict[str, dict]:
    """stage -> bundle, overrides, checkpoint folder and file prefix, final output, epochs, signal (2 iterations
    per epoch on ``tiny_data``)."""
    d = {"dataset_dir": str(data)}
    stages = {
        "teacher": dict(bundle="tsdk_teacher", overrides={
            **d, "ckpt_dir": str(w / "models"), "output_dir": str(w / "eval"), "image_size": 64, "batch_size": 2,
            "progress": False}, ckpt=(w / "models" / "train", ""),
            final=w / "models" / "teacher" / "model.pt", epochs=2, signal=signal.SIGTERM),
        "synthesis": dict(bundle="tsdk_synthesis", overrides={
            **d, "ckpt_dir": str(w / "models"), "log_dir": str(w / "logs"), "output_dir": str(w / "synthetic"),
            "image_size": 32, "network_def#block_out_channels": [8, 16, 16, 16], "batch_size": 2,
            "train#log_every": 1, "train#splits": ["training"]}, ckpt=(w / "models", "checkpoint"),
            final=w / "models" / "model.pt", epochs=3, signal=signal.SIGKILL),
        "distill": dict(bundle="tsdk_distill", overrides={
            **d, "ckpt_dir": str(w / "models"), "output_dir": str(w / "eval"), "image_size": 32, "use_unlabeled": False,
            "batch_size": 2, "teacher_ckpt": "TEACHER"}, ckpt=(w / "models" / "distill", ""),
            final=w / "models" / "student_distilled.pt", epochs=3, signal=signal.SIGTERM),
        "student": dict(bundle="tsdk_student", overrides={
            **d, "ckpt_dir": str(w / "models"), "output_dir": str(w / "eval"), "image_size": 32, "batch_size": 2},
            ckpt=(w / "models", "checkpoint"), final=w / "models" / "model.pt", epochs=3, signal=signal.SIGKILL),
    }
    if (BUNDLES / "tsdk_ssl" / "configs" / "train.json").is_file():
        stages["ssl"] = dict(bundle="tsdk_ssl", overrides={
            **d, "ckpt_dir": str(w / "models"), "image_size": 32, "batch_size": 2, "use_unlabeled": False,
            "use_synthetic": False, "progress": False, "mae#patch_size": 8}, ckpt=(w / "models" / "ssl", ""),
            final=w / "models" / "student_pretrained.pt", epochs=3, signal=signal.SIGKILL)
    return stages


STAGE_NAMES = list(_stages(Path("."), Path(".")))


def _command(bundle: str, overrides: dict) -> list[str]:
    root = BUNDLES / bundle
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", str(root / "configs" / "metadata.json"),
           "--config_file", str(root / "configs" / "train.json"), "--logging_file",
           str(root / "configs" / "logging.conf"), "--bundle_root", str(root)]
    for k, v in overrides.items():
        cmd += [f"--{k}", _arg(v)]
    return cmd


# The killed run sleeps after each iteration (after the iteration's log line), so the kill lands in the iteration the
# test aimed at: without it, an epoch of cached teacher outputs at 32 px is faster than the 50 ms poll, and the run
# could finish before the signal (seen in CI: "killed after epoch 3 of 3"). Prepended to the bundle's own "run" list.
PACE = "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, lambda e: time.sleep(0.25))"


def _paced(bundle: str, overrides: dict) -> dict:
    config = _config(bundle)
    return dict(overrides, imports=config["imports"] + ["$import ignite", "$import time"], run=[PACE] + config["run"])


def _config(bundle: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())


def _kill_after_checkpoint(cmd: list[str], log: Path, ckpt: tuple[Path, str], sig: int, extra_iterations: int,
                           timeout: float = 400) -> tuple[str, float]:
    """Run ``cmd``; once a checkpoint exists, wait ``extra_iterations`` more iterations and send ``sig`` to its
    process group. Returns the newest checkpoint when the signal was sent, and the seconds the run lasted."""
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=str(REPO),
                                start_new_session=True)
    try:
        first = target = None
        while proc.poll() is None and time.time() - t0 < timeout:
            n = len(ITERATION.findall(log.read_text(errors="replace")))
            if first is None and latest_checkpoint(*ckpt):
                first = latest_checkpoint(*ckpt)
                target = n + extra_iterations
            if target is not None and n >= target:
                os.killpg(proc.pid, sig)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -sig, (
        f"the run was to be killed by signal {sig} after its first checkpoint (exit {proc.returncode})\n"
        + log.read_text(errors="replace")[-3000:])
    return first, time.time() - t0


def _epoch(checkpoint: str) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["trainer"]
    return int(state["iteration"]) // int(state["epoch_length"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_kill_and_resume(stage, tiny_data, tmp_path):
    spec = _stages(tiny_data, tmp_path)[stage]
    overrides = dict(spec["overrides"], **{"train#trainer#max_epochs": spec["epochs"]})
    if overrides.get("teacher_ckpt") == "TEACHER":
        overrides["teacher_ckpt"] = str(_teacher_dir(tmp_path))
    cmd = _command(spec["bundle"], _paced(spec["bundle"], overrides))
    rng = np.random.default_rng(STAGE_NAMES.index(stage))
    extra = int(rng.integers(1, 2 * (spec["epochs"] - 1)))  # iterations after the first checkpoint, before the end
    _, seconds = _kill_after_checkpoint(cmd, tmp_path / "killed.log", spec["ckpt"], spec["signal"], extra)

    temporary = assert_complete(tmp_path)
    resume_from = latest_checkpoint(*spec["ckpt"])
    done = _epoch(resume_from)
    assert 1 <= done < spec["epochs"], f"killed after epoch {done} of {spec['epochs']}: too late to test resuming"

    proc = run_bundle(spec["bundle"], ["train.json"], overrides, timeout=600)
    log = proc.stdout + proc.stderr
    assert f"Restored all variables from {resume_from}" in log, log[-3000:]
    epochs = [int(e) for e in TRAINER_EPOCH.findall(log)]
    assert epochs == list(range(done + 1, spec["epochs"] + 1)), f"epochs run after resuming: {epochs} (done: {done})"
    final = latest_checkpoint(*spec["ckpt"])
    assert _epoch(final) == spec["epochs"]
    # n_saved=1: the killed run's checkpoints are gone too, not only those the resumed run wrote
    assert sorted(p.name for p in spec["ckpt"][0].glob("*epoch=*.pt")) == [Path(final).name]
    assert spec["final"].is_file()
    assert assert_complete(tmp_path) == [], "the resumed run removes temporaries left by the kill"
    print(f"{stage}: {signal.Signals(spec['signal']).name} after {seconds:.0f} s, {extra} iterations after the first "
          f"checkpoint; resumed from epoch {done}; temporaries left by the kill: {[p.name for p in temporary]}")


# ------------------------------------------------------------------------- a kill in the middle of a save
_SAVER_SCRIPT = """
import sys, torch
from ignite.engine import Engine
from tsdk_monai.handlers import AtomicCheckpointSaver
big = torch.nn.Linear(4096, 4096)  # 64 MiB of weights: each save takes a while
e = Engine(lambda e, b: None)
AtomicCheckpointSaver(save_dir=sys.argv[1], save_dict={"model": big, "trainer": e}, save_interval=1, n_saved=1,
                      save_final=True, final_filename="model.pt").attach(e)
e.run([0], max_epochs=1000)
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_save(tmp_path):
    """SIGKILL while a checkpoint is being written: the half-written file has a temporary name, the previous
    checkpoint is still there and complete, and the next run's saver removes the temporary file."""
    proc = subprocess.Popen([sys.executable, "-c", _SAVER_SCRIPT, str(tmp_path)], env=_env(), start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 300 and proc.poll() is None:
            complete = [p for p in tmp_path.glob("checkpoint_epoch=*.pt")]
            if complete and list(tmp_path.glob(".checkpoint_epoch=*.tmp")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    temporary = assert_complete(tmp_path)
    assert temporary, "the kill was to land during a save"
    assert latest_checkpoint(tmp_path, "checkpoint"), "the previous checkpoint must survive a kill during the next save"
    from ignite.engine import Engine

    AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": torch.nn.Linear(1, 1)}, save_interval=1).attach(
        Engine(lambda e, b: None))
    assert assert_complete(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    """A save that fails half-way (an object that cannot be pickled, after 4 MiB of tensors were written) leaves the
    previous checkpoint in place and no file under the new name."""
    from ignite.engine import Engine, Events

    class Poisoned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1024, 1024))
            self.poison = False

        def state_dict(self, *args, **kwargs):
            state = super().state_dict(*args, **kwargs)
            if self.poison:
                state["x"] = lambda: None  # torch.save fails on it after writing the tensors
            return state

    net = Poisoned()
    e = Engine(lambda e, b: None)
    AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_interval=1, n_saved=1).attach(e)
    e.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda _: setattr(net, "poison", True))
    with pytest.raises(Exception):
        e.run([0], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_epoch=2.pt"]
    torch.load(tmp_path / "model_epoch=2.pt", weights_only=True)


def test_resumed_run_keeps_the_best_model(tmp_path):
    """The best-model saver's record (score, file) travels in the resume checkpoint, as the student bundle wires it:
    after resuming, a worse validation leaves ``model.pt`` alone and a better one replaces it. A resume checkpoint
    without that record (an older bundle version) is refused with an error naming the file."""
    from ignite.engine import Engine, Events

    from tsdk_monai.handlers import CheckedCheckpointLoader
    from tsdk_monai.utils import TSDKInputError

    scores = [0.5, 0.9, 0.6, 0.95]  # validation Dice of epochs 1..4; the network's weight is set to the epoch

    def run(max_epochs: int, resume: str | None) -> None:
        net = torch.nn.Linear(1, 1, bias=False)
        engine = Engine(lambda e, b: None)

        @engine.on(Events.EPOCH_COMPLETED)
        def validate(e):
            net.weight.data.fill_(e.state.epoch)
            e.state.metrics["dice"] = scores[e.state.epoch - 1]

        best = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
                                     key_metric_name="dice", key_metric_filename="model.pt")
        best.attach(engine)
        state = {"model": net, "trainer": engine, "best_saver": best}
        if resume:
            CheckedCheckpointLoader(load_path=resume, load_dict=state).attach(engine)
        AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict=state, file_prefix="", save_interval=1,
                              n_saved=1).attach(engine)
        engine.run([0], max_epochs=max_epochs)

    def best_weight() -> float:
        return torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item()

    run(2, None)
    assert best_weight() == 2
    run(3, str(tmp_path / "checkpoint_epoch=2.pt"))  # 0.6 < 0.9: without the record this run's first save would win
    assert best_weight() == 2
    run(4, latest_checkpoint(tmp_path, "checkpoint"))
    assert best_weight() == 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_epoch=4.pt"]  # n_saved=1

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "checkpoint_epoch=4.pt", old / "checkpoint_epoch=4.pt")
    ckpt = torch.load(old / "checkpoint_epoch=4.pt", weights_only=True)
    del ckpt["best_saver"]
    torch.save(ckpt, old / "checkpoint_epoch=4.pt")
    with pytest.raises(TSDKInputError, match=r"checkpoint_epoch=4\.pt: .*best_saver"):
        run(5, str(old / "checkpoint_epoch=4.pt"))
    with pytest.raises(ValueError, match="no key-metric checkpoint"):
        AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": torch.nn.Linear(1, 1)}).state_dict()


def test_resumed_schedule_follows_the_config():
    """Resumed with more epochs, the LR schedule is the configured one (the checkpoint gives only the step): MONAI's
    own WarmupCosineSchedule would keep the old length from its state dict and climb back to the full LR."""
    from monai.optimizers import WarmupCosineSchedule

    from tsdk_monai.schedules import WarmupCosine

    def lrs(cls, t_first: int, t_resumed: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = cls(opt, warmup_steps=1, t_total=t_first)
        for _ in range(t_first):
            opt.step()
            sched.step()
        state = sched.state_dict()
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = cls(opt, warmup_steps=2, t_total=t_resumed)
        sched.load_state_dict(state)
        out = []
        for _ in range(t_resumed - t_first):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    ours = lrs(WarmupCosine, 4, 8)
    assert ours == sorted(ours, reverse=True) and ours[-1] == pytest.approx(0.0, abs=1e-12)
    assert ours[0] == pytest.approx(0.5 * (1 + np.cos(np.pi * 3 / 6)))  # step 5 of 8, 2 warm-up steps
    theirs = lrs(WarmupCosineSchedule, 4, 8)  # why ours exists: past its old end the cosine climbs again
    assert theirs[-1] > theirs[0] > 0


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_split(tmp_path):
    from tsdk_monai.data import prepare, write_demo_data

    src = write_demo_data(tmp_path / "src", n=24, size=32, n_labeled=6).parent
    runs = [prepare(str(src / "images"), str(src / "labels"), str(tmp_path / name), n_labeled=6, seed=seed)
            for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    assert runs[0].read_bytes() == runs[1].read_bytes()
    split = [{c["image"] for c in json.loads(r.read_text())["training"]} for r in runs]
    assert split[0] != split[2], "another seed picks other labelled cases"


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_seed_sets_the_weights(stage, tiny_data, tmp_path):
    """Every training bundle takes ``seed``: two runs with one seed give bit-identical weights on the CPU
    (initialisation, shuffling, augmentation and optimiser all play), another seed gives other weights."""
    from tsdk_monai.utils import read_state_dict

    teacher = str(_teacher_dir(tmp_path))
    states = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        spec = _stages(tiny_data, tmp_path / name)[stage]
        overrides = dict(spec["overrides"], seed=seed, **{"train#trainer#max_epochs": 1})
        if overrides.get("teacher_ckpt") == "TEACHER":
            overrides["teacher_ckpt"] = teacher
        run_bundle(spec["bundle"], ["train.json"], overrides)
        states.append(read_state_dict(spec["final"]))
    assert states[0].keys() == states[1].keys() == states[2].keys()
    different = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not different, f"weights differ between two runs with the same seed: {different[:5]}"
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0]), "seed 1 gave the weights of seed 0"
