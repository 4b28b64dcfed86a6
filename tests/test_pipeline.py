"""The pipeline driver: bundle runs composed in order over labels x seeds, finished stages skipped, interrupted
stages resumed, and the report (table and plots)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsdk_monai.data import load_datalist, subset_datalist
from helpers import BUNDLES
from tsdk_monai.driver import (METHODS, RunDirs, Schedule, StageRunner, bundle_arg, finetune_seed, method_stages, plan_runs,
                               run_methods)
from tsdk_monai.utils import TSDKInputError

# the tiniest schedule that still runs every stage of every method on the 64x64 demo data
TINY = Schedule(
    student_size=64, teacher_size=64, teacher_epochs=1, teacher_batch=2, synth_size=32, synth_epochs=1,
    synth_images=4, synth_steps=2, fid_real_images=8, distill_epochs=1, ssl_epochs=1, student_epochs=1, batch_size=3,
    # every stage in the letterbox geometry: on the demo's square images it gives the squashed pixels, so the run
    # checks that every bundle's keep_aspect path is wired (the bundles' own tests run the default)
    keep_aspect=True,
    # distillation and pre-training on the labelled pool's pixels only (6 images), not the unlabelled ones too
    extra={"tsdk_synthesis": {"network_def#block_out_channels": [16, 32, 32], "batch_size": 8},
           "tsdk_distill": {"batch_size": 4, "use_unlabeled": False},
           "tsdk_ssl": {"batch_size": 4, "use_unlabeled": False}},
)
N_LABELED = (3, 6)
SHARED = ("synthesis_train", "synthesis_sample", "task_agnostic_kd_distill", "mae_pretrain", "mocov3_pretrain")


def test_bundle_arg_writes_python_literals():
    # monai.bundle's CLI (fire) reads Python literals: JSON's false would arrive as the truthy string "false"
    assert bundle_arg(False) == "False" and bundle_arg(None) == "None" and bundle_arg(True) == "True"
    assert bundle_arg([1, 1, 64, 64]) == "[1, 1, 64, 64]" and bundle_arg("x") == "x" and bundle_arg(3) == "3"


def test_every_method_is_made_of_bundle_runs(tmp_path):
    stages = method_stages(tmp_path / "data" / "datalist.json", RunDirs(tmp_path, tmp_path), Schedule())
    assert set(stages) == set(METHODS)
    tskd = [st.name for st in stages["tskd"]]
    assert tskd == ["teacher", "synthesis_train", "synthesis_sample", "tskd_distill", "tskd_finetune", "tskd_evaluate"]
    assert [st.name for st in stages["mae"]] == ["mae_pretrain", "mae_finetune", "mae_evaluate"]
    assert stages["mocov3"][0].bundle == "tsdk_ssl" and stages["mocov3"][0].overrides["method"] == "mocov3"
    # the pre-trained / distilled student is the fine-tune's init
    for m in ("task_agnostic_kd", "mae", "mocov3", "tskd_no_synth", "tskd"):
        init = {st.name: st for st in stages[m]}[f"{m}_finetune"].overrides["init_ckpt"]
        assert init == str(stages[m][-3].outputs[0])
    assert {st.name: st for st in stages["scratch"]}["scratch_finetune"].overrides["init_ckpt"] == ""
    for st in stages["tskd"]:
        cmd = st.command()
        assert cmd[2:4] == ["monai.bundle", "run"] and "--bundle_root" in cmd
    no_synth = {st.name: st for st in stages["tskd_no_synth"]}["tskd_no_synth_distill"]
    assert no_synth.overrides["use_synthetic"] is False and "--use_synthetic" in no_synth.command()
    assert no_synth.command()[no_synth.command().index("--use_synthetic") + 1] == "False"


def test_method_extra_reaches_only_that_methods_stages(tmp_path):
    """A per-method knob (chosen on validation) goes to that method's own stages, over the bundle-wide one."""
    s = Schedule(extra={"tsdk_student": {"learning_rate": 1e-3}, "tsdk_distill": {"epochs": 3}},
                 method_extra={"tskd": {"tsdk_student": {"learning_rate": 3e-4}, "tsdk_distill": {"epochs": 4}},
                               "mae": {"tsdk_ssl": {"learning_rate": 5e-4}}})
    stages = method_stages(tmp_path / "data" / "datalist.json", RunDirs(tmp_path, tmp_path), s)
    by = {st.name: st.overrides for sts in stages.values() for st in sts}
    assert by["tskd_finetune"]["learning_rate"] == 3e-4 and by["tskd_evaluate"]["learning_rate"] == 3e-4
    assert by["tskd_distill"]["epochs"] == 4 and by["tskd_no_synth_distill"]["epochs"] == 3
    for m in ("scratch", "tskd_no_synth", "task_agnostic_kd", "mae", "mocov3"):
        assert by[f"{m}_finetune"]["learning_rate"] == 1e-3
    assert by["mae_pretrain"]["learning_rate"] == 5e-4 and "learning_rate" not in by["mocov3_pretrain"]
    assert "learning_rate" not in by["teacher"] and by["synthesis_train"]["epochs"] == s.synth_epochs  # shared stages
    with pytest.raises(TSDKInputError, match="method_extra: not a method: tskd2"):
        Schedule(method_extra={"tskd2": {"tsdk_student": {"learning_rate": 3e-4}}})


def test_student_epochs_factor_lengthens_only_that_methods_fine_tuning(tmp_path):
    """A student's fine-tuning length chosen per method: its epochs times the factor, scaled by the number of labels
    like every student's, validated as many times; the other students' commands are unchanged."""
    d, dirs = tmp_path / "data" / "datalist.json", RunDirs(tmp_path, tmp_path)
    base = Schedule(student_epochs=8, iterations_like=80)
    longer = Schedule(student_epochs=8, iterations_like=80, student_epochs_factor={"scratch": 3})
    for n, scale in ((20, 4), (80, 1)):
        one = {st.name: st for sts in method_stages(d, dirs, base, epoch_scale=scale).values() for st in sts}
        three = {st.name: st for sts in method_stages(d, dirs, longer, epoch_scale=scale).values() for st in sts}
        assert three["scratch_finetune"].overrides["epochs"] == 8 * 3 * scale
        assert three["scratch_finetune"].overrides["val_interval"] == 3 * scale  # 8 validations, the last included
        assert one["scratch_finetune"].overrides["epochs"] == 8 * scale
        assert one["scratch_finetune"].overrides.get("val_interval", 1) == scale
        assert [st.command() for k, st in three.items() if k != "scratch_finetune"] == \
               [st.command() for k, st in one.items() if k != "scratch_finetune"]
    with pytest.raises(TSDKInputError, match="not a student method: teacher"):
        Schedule(student_epochs_factor={"teacher": 2})
    with pytest.raises(TSDKInputError, match=r"student_epochs_factor\['mae'\] must be a whole number >= 1"):
        Schedule(student_epochs_factor={"mae": 0})


def test_finetune_seeds_fine_tune_every_student_again_from_the_same_start(tmp_path):
    """``finetune_seeds``: each student's fine-tuning and evaluation again with seeds s + 1000 k, from the same
    distilled / pre-trained start, into their own folders; the first fine-tuning's stages stay as they were, so a
    finished table gains fine-tuning seeds without rerunning anything."""
    d, dirs = tmp_path / "data" / "datalist.json", RunDirs(tmp_path / "seed2" / "n20", tmp_path / "seed2" / "shared")
    one = method_stages(d, dirs, Schedule(), seed=2, prefix="s2_n20_")
    three = method_stages(d, dirs, Schedule(finetune_seeds=3), seed=2, prefix="s2_n20_")
    assert [st.command() for st in three["teacher"]] == [st.command() for st in one["teacher"]]
    for m in METHODS[1:]:
        base = [st.name for st in one[m]]
        assert [st.name for st in three[m]] == base + [f"s2_n20_{m}_{x}{k}" for k in (1, 2)
                                                     for x in ("finetune", "evaluate")]
        assert [st.command() for st in three[m][:len(base)]] == [st.command() for st in one[m]]
        by = {st.name: st for st in three[m]}
        first = by[f"s2_n20_{m}_finetune"].overrides
        for k in (1, 2):
            ft, ev = by[f"s2_n20_{m}_finetune{k}"], by[f"s2_n20_{m}_evaluate{k}"]
            assert ft.overrides["seed"] == ev.overrides["seed"] == 2 + 1000 * k == finetune_seed(2, k)
            assert {x: ft.overrides[x] for x in ("init_ckpt", "datalist", "epochs", "learning_rate")
                    if x in first} == {x: first[x] for x in ("init_ckpt", "datalist", "epochs", "learning_rate")
                                       if x in first}
            own = dirs.method(m) / f"finetune{k}"
            assert ft.overrides["ckpt_dir"] == ev.overrides["ckpt_dir"] == str(own / "models")
            assert ev.overrides["output_dir"] == str(own / "eval") and ev.outputs == [own / "eval" / "metrics.json"]
            assert ft.outputs == [own / "models" / "model.pt"] and Path(ev.inputs[1]) == own / "models" / "model.pt"
    with pytest.raises(ValueError, match="teacher: no fine-tuning seed 1"):
        dirs.metrics("teacher", 1)
    for bad in (0, True, 1.5):
        with pytest.raises(TSDKInputError, match="finetune_seeds must be a whole number >= 1"):
            Schedule(finetune_seeds=bad)


@pytest.mark.parametrize("epochs,scale,every", [(8, 1, None), (8, 4, 4), (24, 1, 3), (24, 4, 12), (50, 1, 5), (7, 1, None)])
def test_teacher_validates_about_eight_times_and_after_its_last_epoch(tmp_path, epochs, scale, every):
    """A longer teacher schedule does not pay for more validation passes (each as long as ~20 training steps), and
    the last epoch, where the decayed learning rate usually leaves the best weights, is always scored."""
    s = Schedule(teacher_epochs=epochs)
    teacher = method_stages(tmp_path / "d.json", RunDirs(tmp_path, tmp_path), s, epoch_scale=scale)["teacher"][0]
    assert teacher.overrides["epochs"] == epochs * scale
    assert teacher.overrides.get("val_interval") == every
    if every:
        assert (epochs * scale) % every == 0 and 8 <= (epochs * scale) // every <= 10


def test_plan_shares_label_free_stages(demo_datalist, tmp_path):
    plan = plan_runs(demo_datalist, tmp_path, list(METHODS), TINY, n_labeled="3,6", seeds=(0, 1))
    names = [st.name for st in plan.stages]
    assert len(names) == len(set(names))
    for seed in (0, 1):
        for shared in SHARED:
            assert names.count(f"s{seed}_{shared}") == 1  # once per seed, for every n
        for n in N_LABELED:
            for m in METHODS[1:]:
                assert f"s{seed}_n{n}_{m}_finetune" in names and f"s{seed}_n{n}_{m}_evaluate" in names
            assert f"s{seed}_n{n}_teacher" in names and f"s{seed}_n{n}_tskd_distill" in names
    by_name = {st.name: st for st in plan.stages}
    # label-free stages read the whole pool; the others the few-label split of their (seed, n)
    assert by_name["s0_mae_pretrain"].overrides["datalist"] == str(Path(demo_datalist).absolute())
    split = by_name["s1_n3_scratch_finetune"].overrides["datalist"]
    assert split == str(tmp_path.absolute() / "splits" / "seed1_n3" / "datalist.json")
    assert len(load_datalist(split)["training"]) == 3
    # the TS-KD distillation of (seed, n) uses that run's teacher and the seed's synthetic images
    tskd = by_name["s1_n6_tskd_distill"].overrides
    assert "seed1/n6/teacher" in tskd["teacher_ckpt"] and "seed1/shared/synthesis" in tskd["synthetic_datalist"]
    assert plan.manifest["stages"]["tskd"]["seed0_n3"][1] == "s0_synthesis_train"
    with pytest.raises(TSDKInputError, match="unknown method"):
        plan_runs(demo_datalist, tmp_path, "scratch,nope", TINY)
    with pytest.raises(TSDKInputError, match="n_labeled=7"):
        plan_runs(demo_datalist, tmp_path, "scratch", TINY, n_labeled="7")


def test_subset_datalist(demo_datalist, tmp_path):
    full = load_datalist(demo_datalist)
    small = subset_datalist(demo_datalist, tmp_path / "a", 2, seed=0)
    large = subset_datalist(demo_datalist, tmp_path / "b", 4, seed=0)
    s, big = load_datalist(small), load_datalist(large)
    assert len(s["training"]) == 2 and len(big["training"]) == 4
    def names(cases):
        return {Path(c["image"]).name for c in cases}

    assert names(s["training"]) < names(big["training"])  # nested for one seed
    pool = {c["image"] for c in full["training"] + full["unlabeled"]}
    for d in (s, big):
        paths = [c["image"] for c in d["training"] + d["unlabeled"]]
        assert len(paths) == len(set(paths)) and {str(Path(p).resolve()) for p in paths} == {
            str(Path(p).resolve()) for p in pool}
        assert [c["image"] for c in d["test"]] != [] and all("label" not in c for c in d["unlabeled"])
        for split in ("validation", "test"):
            assert [Path(c["image"]).resolve() for c in d[split]] == [Path(c["image"]).resolve() for c in full[split]]
    again = small.read_bytes()
    assert subset_datalist(demo_datalist, tmp_path / "a", 2, seed=0).read_bytes() == again  # same bytes
    assert len(names(load_datalist(subset_datalist(demo_datalist, tmp_path / "c", 2, seed=5))["training"])) == 2
    for bad in (0, 7, 2.5):
        with pytest.raises(TSDKInputError, match=re.escape(str(Path(demo_datalist).absolute()))):
            subset_datalist(demo_datalist, tmp_path / "d", bad, seed=0)


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def full_run(demo_datalist, tmp_path_factory):
    """Every method, 2 numbers of labels x 1 seed, tiny schedules: one driver run shared by the tests below."""
    work = tmp_path_factory.mktemp("pipeline")
    t0 = time.time()
    with StageRunner(work) as runner:
        table = run_methods(demo_datalist, work, list(METHODS), TINY, n_labeled=N_LABELED, seeds=0, runner=runner)
    return {"work": work, "runner": runner, "table": table, "seconds": time.time() - t0}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the shared driver run is set up by the first of these tests
def test_every_method_runs_end_to_end(full_run):
    work, runner = full_run["work"], full_run["runner"]
    assert not runner.skipped and not runner.resumed
    for shared in SHARED:
        assert runner.ran.count(f"s0_{shared}") == 1  # shared by both numbers of labels
    for n in N_LABELED:
        run = work / "seed0" / f"n{n}"
        for m in METHODS[1:]:
            metrics = json.loads((run / m / "eval" / "metrics.json").read_text())
            assert 0 <= metrics["mean"]["test_mean_dice"] <= 1, m
            assert (run / m / "models" / "model.pt").is_file()
        assert (run / "teacher" / "test" / "metrics.json").is_file()
        assert len(load_datalist(work / "splits" / f"seed0_n{n}" / "datalist.json")["training"]) == n
    for m in ("mae", "mocov3"):
        assert (work / "seed0" / "shared" / m / "pretrain" / "student_pretrained.pt").is_file()
        log = (work / "logs" / f"s0_n3_{m}_finetune.log").read_text()
        assert "student_pretrained.pt" in log.splitlines()[0]  # the fine-tune starts from the pre-trained student
    log = (work / "logs" / "s0_n3_tskd_finetune.log").read_text()
    assert log.startswith("$ ") and "monai.bundle run" in log.splitlines()[0]  # the command, runnable by hand
    print(f"\nfull driver run (every method, n_labeled {N_LABELED}): {full_run['seconds']:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_second_run_skips_every_stage(full_run, demo_datalist, capsys):
    work = full_run["work"]
    with StageRunner(work) as runner:
        run_methods(demo_datalist, work, list(METHODS), TINY, n_labeled=N_LABELED, seeds=0, runner=runner)
    assert runner.ran == [] and runner.resumed == []
    out = capsys.readouterr().out
    assert "[run ]" not in out and "[skip] (1/" in out
    plan = plan_runs(demo_datalist, work, list(METHODS), TINY, N_LABELED, 0)
    assert len(runner.skipped) == len(plan.stages) and sum(st.name.endswith("_overlay") for st in plan.stages) == len(
        METHODS)  # the overlay figure's predictions are stages of the plan too


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_report_has_every_row_and_plots(full_run):
    """``tsdk report`` rewrites the report from what the stages wrote; it runs no stage."""
    work = full_run["work"]
    markers = {p.name: p.read_bytes() for p in (work / "logs").glob("*.stage.json")}
    proc = subprocess.run([sys.executable, "-m", "tsdk_monai", "report", str(work)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (work / "report.md").read_text()
    from tsdk_monai.report import METHOD_LABELS

    for m in METHODS:
        for n in N_LABELED:
            row = [line for line in report.splitlines() if line.startswith(f"| {METHOD_LABELS[m]} | {n} |")]
            assert len(row) == 1, (m, n, report)
            assert "not run" not in row[0] and re.search(r"\| 0\.\d{3} \|", row[0]), row[0]
    assert "| teacher (LiteMedSAM + LoRA, reference) | 3 |" in proc.stdout  # the table is printed
    assert {p.name: p.read_bytes() for p in (work / "logs").glob("*.stage.json")} == markers  # nothing ran
    assert "## Teacher training" in report and "| best (epoch) |" in report  # from each teacher's val_history.json
    for png in ("dice_vs_labels.png", "overlays.png", "teacher_val_dice.png"):
        data = (work / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    rows = json.loads((work / "report.json").read_text())["rows"]
    assert {(r["method"], r["n_labeled"]) for r in rows} == {(m, n) for m in METHODS for n in N_LABELED}
    teacher = [r for r in rows if r["method"] == "teacher"]
    assert all(r["hd95_mean"] is not None and r["hd95_mean"] >= 0 for r in teacher), teacher  # from its metrics.json
    # TS-KD minus every other method, with a paired bootstrap interval over the test images
    cmp = json.loads((work / "report.json").read_text())["tskd_minus"]
    assert {(c["method"], c["n_labeled"]) for c in cmp} == {(m, n) for m in METHODS if m != "tskd" for n in N_LABELED}
    assert all(c["low"] <= c["mean"] <= c["high"] and c["n"] > 0 for c in cmp), cmp
    assert "## TS-KD minus each method" in (work / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_changed_schedule_reruns_that_stage(full_run, demo_datalist, capsys):
    """A changed schedule is not "done": that stage starts afresh, and the stages reading its output run again."""
    work = full_run["work"]
    longer = dataclasses.replace(TINY, student_epochs=2)
    with StageRunner(work) as runner:
        run_methods(demo_datalist, work, ["scratch"], longer, n_labeled=3, seeds=0, runner=runner)
    # the evaluation's command is unchanged, but its input (the fine-tuned model) is not
    assert runner.ran == ["s0_n3_scratch_finetune", "s0_n3_scratch_evaluate", "s0_n3_scratch_overlay"], runner.ran
    assert "[redo] (1/3) s0_n3_scratch_finetune" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_finetune_seeds_add_their_stages_and_rerun_nothing(full_run, demo_datalist):
    """Fine-tuning seeds added to a finished run: only their stages run (seed 1000 from the same start); the report
    has the row over both fine-tunings."""
    work = full_run["work"]
    longer = dataclasses.replace(TINY, student_epochs=2)  # the previous test's schedule: its stages are done
    with StageRunner(work) as runner:
        run_methods(demo_datalist, work, ["scratch"], longer, n_labeled=3, seeds=0, report=False, runner=runner)
    with StageRunner(work) as runner:
        table = run_methods(demo_datalist, work, ["scratch"], dataclasses.replace(longer, finetune_seeds=2),
                            n_labeled=3, seeds=0, runner=runner)
    assert runner.ran == ["s0_n3_scratch_finetune1", "s0_n3_scratch_evaluate1"], runner.ran
    first = (work / "logs" / "s0_n3_scratch_finetune1.log").read_text().splitlines()[0]
    assert "--seed 1000 " in first and str(work / "seed0" / "n3" / "scratch" / "finetune1" / "models") in first
    metrics = json.loads((work / "seed0" / "n3" / "scratch" / "finetune1" / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["mean"]["test_mean_dice"] <= 1
    assert re.search(r"\| student from scratch \| 3 \| 1/1 × 2 \| 0\.\d{3} ± 0\.\d{3} \|", table), table


@pytest.mark.slow
def test_killed_run_resumes_and_finishes(demo_datalist, tmp_path):
    """SIGKILL the driver (process group) mid-way through a training stage; the rerun resumes that stage."""
    work = tmp_path / "w"
    args = ["--datalist", str(demo_datalist), "--workdir", str(work), "--methods", "scratch", "--n_labeled", "6",
            "--student_size", "64", "--student_epochs", "6", "--batch_size", "3"]
    cmd = [sys.executable, "-m", "tsdk_monai", "run", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stage = "s0_n6_scratch_finetune"
    ckpt_dir = work / "seed0" / "n6" / "scratch" / "models"
    try:
        deadline = time.time() + 400
        while not list(ckpt_dir.glob("checkpoint*.pt")):  # an epoch finished and was saved: mid-stage now
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
            time.sleep(0.02)  # 5 epochs of 2 iterations at 64 px remain: far longer than this poll
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    marker = json.loads((work / "logs" / f"{stage}.stage.json").read_text())
    assert marker["state"] == "running", "the stage finished before the kill; interrupt it earlier"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"[resume] (1/3) {stage}" in done.stdout and "| student from scratch | 6 |" in done.stdout
    log = (work / "logs" / f"{stage}.log").read_text()
    resumed = log.split("--- resumed after an interruption")[1]
    # from the saved checkpoint, not from the start
    assert re.search(r"Restored all variables from .*checkpoint_epoch=\d+\.pt", resumed), resumed[:3000]
    assert "Epoch: 1/6," not in resumed and "Epoch: 6/6," in resumed, resumed[:3000]
    assert json.loads((work / "logs" / f"{stage}.stage.json").read_text())["state"] == "done"
    assert (work / "seed0" / "n6" / "scratch" / "eval" / "metrics.json").is_file()


def _writers_of(log: Path) -> list[int]:
    """The processes whose stdout is ``log`` (a stage's process, forked or not)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and os.readlink(p / "fd" / "1") == str(log):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the stage's process through /proc (Linux)")
@pytest.mark.parametrize("launch", ["fork", "subprocess"])
def test_sigterm_to_the_driver_ends_its_stage(demo_datalist, tmp_path, launch):
    """`kill DRIVER` (SIGTERM to the driver alone, as `pkill -f bench/...` sends it) ends the running stage too; it
    used to train on alone for the rest of the stage, holding the cores of whatever ran next."""
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "tsdk_monai", "run", "--datalist", str(demo_datalist), "--workdir", str(work),
           "--methods", "scratch", "--n_labeled", "6", "--student_size", "64", "--student_epochs", "500",
           "--batch_size", "3"]
    env = dict(os.environ, TSDK_STAGE_LAUNCH=launch)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    log = work / "logs" / "s0_n6_scratch_finetune.log"
    try:
        deadline = time.time() + 300
        while not _writers_of(log):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its stage started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        deadline = time.time() + 20
        while _writers_of(log) and time.time() < deadline:
            time.sleep(0.2)
        assert not _writers_of(log), f"the stage outlived its driver ({launch})"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the forkserver may outlive the driver a moment
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    marker = json.loads((work / "logs" / "s0_n6_scratch_finetune.stage.json").read_text())
    assert marker["state"] == "running"  # the next run resumes it


_DRIVER = """
import sys
from pathlib import Path
from tsdk_monai.driver import Stage, StageRunner
work, data = Path(sys.argv[1]), Path(sys.argv[2])
stage = Stage("scratch_finetune", "tsdk_student", ["train.json"], {
    "dataset_dir": str(data.parent), "datalist": str(data), "ckpt_dir": str(work / "models"),
    "output_dir": str(work / "eval"), "image_size": 32, "batch_size": 3, "train#trainer#max_epochs": 1},
    [work / "models" / "model.pt"], inputs=[data], clean=[work / "models", work / "eval"])
with StageRunner(work) as runner:
    runner.run(stage)
print("RAN" if runner.ran else "SKIPPED")
"""


@pytest.mark.slow
def test_changed_package_code_reruns_the_stage(demo_datalist, tmp_path):
    """A finished stage is not current once the package's code changes (here a loss, in a copy of the package that
    the driver and its stages import): the next run does it again instead of reporting the old code's results."""
    import shutil

    import tsdk_monai

    pkg = tmp_path / "pkg"
    shutil.copytree(Path(tsdk_monai.__file__).parent, pkg / "tsdk_monai", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(pkg), PYTHONWARNINGS="ignore", TSDK_BUNDLES=str(BUNDLES))

    def drive() -> str:
        proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / "w"), str(demo_datalist)],
                              capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    assert drive().strip().endswith("RAN")
    assert drive().strip().endswith("SKIPPED")  # nothing changed
    (tmp_path / "w" / "models" / "model.pt").unlink()  # an output gone: the stage runs again, and says why
    out = drive()
    assert "[redo] scratch_finetune: outputs missing; starting afresh" in out and out.strip().endswith("RAN"), out
    loss = pkg / "tsdk_monai" / "losses" / "kd.py"
    loss.write_text(loss.read_text().replace("kl.mean() * t * t", "kl.mean() * (t * t)"))
    out = drive()
    assert "[redo] scratch_finetune: command, configs, inputs or code changed" in out and out.strip().endswith("RAN"), out


def _bench_module():
    """``bench/hc18_table.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hc18_table", Path(__file__).parents[1] / "bench" / "hc18_table.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_presets_are_the_bench_schedules(demo_datalist, tmp_path, capsys):
    """`tsdk run --preset cpu` plans the bench's stages (same commands, so the same hashes); flags override it."""
    from tsdk_monai.cli import main
    from tsdk_monai.driver import PRESETS, schedule_of

    bench = _bench_module()
    for name, sched in (("cpu", bench.CPU), ("full", bench.FULL), ("smoke", bench.SMOKE)):
        a = plan_runs(demo_datalist, tmp_path / name, "teacher,tskd", schedule_of(name), n_labeled="3,6")
        b = plan_runs(demo_datalist, tmp_path / name, "teacher,tskd", Schedule(**sched), n_labeled="3,6")
        assert [(s.name, s.command()) for s in a.stages] == [(s.name, s.command()) for s in b.stages]
    assert schedule_of("cpu", student_epochs=3, batch_size=None) == Schedule(**{**PRESETS["cpu"], "student_epochs": 3})
    assert schedule_of("cpu").iterations_like == 80 and schedule_of().student_size == 256
    with pytest.raises(SystemExit) as exc:
        main(["run", "--datalist", str(demo_datalist), "--workdir", str(tmp_path / "x"), "--preset", "gpu"])
    assert exc.value.code == 2 and "--preset 'gpu': not a preset; choose one of cpu, full, smoke" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert schedule_of("cpu").finetune_seeds == 3 and schedule_of("cpu", finetune_seeds=1).finetune_seeds == 1
    with pytest.raises(SystemExit) as exc:
        main(["run", "--datalist", str(demo_datalist), "--workdir", str(tmp_path / "x"), "--finetune_seeds", "0"])
    assert exc.value.code == 2 and "finetune_seeds must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bench_labels_the_same_cases_whatever_numbers_of_labels_run(demo_datalist, tmp_path):
    """`bench/hc18_table.py --n-labeled 2` labels the same 2 cases as the whole table's `--n-labeled 2,6` (one pool)."""
    from tsdk_monai.data import prepare

    bench = _bench_module()
    assert bench.labelled_pool([20], "20,80") == bench.labelled_pool([20, 80], "20,80") == 80
    assert bench.labelled_pool([120], "20,80") == 120
    data = Path(demo_datalist).parent

    def labelled(ns: list[int], default_n: str, out: str) -> set[str]:
        pool = prepare(str(data / "images"), str(data / "labels"), str(tmp_path / out),
                       n_labeled=bench.labelled_pool(ns, default_n), seed=0)
        subset = load_datalist(subset_datalist(pool, tmp_path / out / "n2", 2))
        return {Path(c["image"]).name for c in subset["training"]}

    assert labelled([2], "2,6", "alone") == labelled([2, 6], "2,6", "table")
    assert labelled([2], "2", "pool_of_2") != labelled([2, 6], "2,6", "table")  # what a pool of max(ns) did
