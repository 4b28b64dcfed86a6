"""The pipeline driver: bundle runs composed in order, finished stages skipped, the comparison table."""

from __future__ import annotations

import json

import pytest

from tsdk_monai.pipeline import DemoSizes, bundle_arg, run_methods, tskd_stages


def test_bundle_arg_writes_python_literals():
    # monai.bundle's CLI (fire) reads Python literals: JSON's false would arrive as the truthy string "false"
    assert bundle_arg(False) == "False" and bundle_arg(None) == "None" and bundle_arg(True) == "True"
    assert bundle_arg([1, 1, 64, 64]) == "[1, 1, 64, 64]" and bundle_arg("x") == "x" and bundle_arg(3) == "3"


def test_every_method_is_made_of_bundle_runs(tmp_path):
    stages = tskd_stages(tmp_path / "data" / "datalist.json", tmp_path, DemoSizes())
    assert set(stages) == {"teacher", "scratch", "task_agnostic_kd", "tskd_no_synth", "tskd"}
    tskd = [st.name for st in stages["tskd"]]
    assert tskd == ["teacher", "synthesis_train", "synthesis_sample", "tskd_distill", "tskd_finetune", "tskd_evaluate"]
    for st in stages["tskd"]:
        cmd = st.command()
        assert cmd[2:4] == ["monai.bundle", "run"] and "--bundle_root" in cmd
    no_synth = {st.name: st for st in stages["tskd_no_synth"]}["tskd_no_synth_distill"]
    assert no_synth.overrides["use_synthetic"] is False and "--use_synthetic" in no_synth.command()
    assert no_synth.command()[no_synth.command().index("--use_synthetic") + 1] == "False"


@pytest.mark.slow
def test_driver_runs_skips_and_reports(demo_datalist, tmp_path, capsys):
    sizes = DemoSizes(student_size=64, student_epochs=2, batch_size=3)
    table = run_methods(demo_datalist, tmp_path, ["scratch"], sizes)
    assert "| scratch |" in table and "not run" not in table
    metrics = json.loads((tmp_path / "scratch" / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["mean"]["test_mean_dice"] <= 1
    log = (tmp_path / "logs" / "scratch_finetune.log").read_text()
    assert log.startswith("$ ") and "monai.bundle run" in log.splitlines()[0]  # the command, runnable by hand
    capsys.readouterr()
    run_methods(demo_datalist, tmp_path, ["scratch"], sizes)
    out = capsys.readouterr().out
    assert "[skip] scratch_finetune" in out and "[skip] scratch_evaluate" in out and "[run ]" not in out
    # a changed schedule is not "done": the stage runs again
    run_methods(demo_datalist, tmp_path, ["scratch"], DemoSizes(student_size=64, student_epochs=3, batch_size=3))
    assert "[run ] scratch_finetune" in capsys.readouterr().out
