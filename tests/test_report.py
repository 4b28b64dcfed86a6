"""The report of a run folder with several fine-tuning seeds per student: read from the evaluations' metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsdk_monai.layout import RunLayout
from tsdk_monai.report import collect_results, compare_to, write_report

IMAGES = [f"img{i}.png" for i in range(6)]


def _metrics(f: Path, dice: list[float], hd95: float) -> None:
    f.parent.mkdir(parents=True, exist_ok=True)
    cases = [{"image": f"/data/{name}", "test_mean_dice": {"a": d, "b": d}, "test_hd95": {"a": hd95, "b": hd95}}
             for name, d in zip(IMAGES, dice)]
    f.write_text(json.dumps({"mean": {"test_mean_dice": sum(dice) / len(dice), "test_hd95": hd95}, "cases": cases,
                             "per_class_mean": {}, "empty_predictions": 0}))


@pytest.fixture()
def work(tmp_path):
    """One seed, 20 labels: the teacher once, scratch and TS-KD fine-tuned with 3 seeds each (per-image Dice known)."""
    layout = RunLayout(tmp_path)
    dirs = layout.run(0, 20)
    methods = ["teacher", "scratch", "tskd"]
    manifest = {
        "datalist": "/data/datalist.json", "methods": methods, "n_labeled": [20], "seeds": [0], "num_classes": 3,
        "sizes": {"finetune_seeds": 3, "teacher_size": 128, "student_size": 128, "keep_aspect": False},
        "runs": {layout.key(0, 20): {"seed": 0, "n_labeled": 20, "dir": str(dirs.labelled), "shared": str(dirs.shared)}},
        "stages": {m: {layout.key(0, 20): []} for m in methods},
    }
    layout.manifest.write_text(json.dumps(manifest))
    _metrics(dirs.metrics("teacher"), [0.9] * 6, 5.0)
    for k, (scratch, tskd) in enumerate([(0.5, 0.8), (0.6, 0.8), (0.7, 0.9)]):
        _metrics(dirs.metrics("scratch", k), [scratch] * 3 + [scratch - 0.1] * 3, 20.0 + k)
        _metrics(dirs.metrics("tskd", k), [tskd] * 6, 10.0)
    return tmp_path


def test_rows_are_over_every_fine_tuning_seed(work):
    rows = {r["method"]: r for r in collect_results(work)}
    assert [x["finetune"] for x in rows["scratch"]["runs"]] == [0, 1, 2] and len(rows["teacher"]["runs"]) == 1
    assert rows["scratch"]["dice_mean"] == pytest.approx(0.55) and rows["scratch"]["dice_std"] == pytest.approx(0.1)
    assert rows["scratch"]["hd95_mean"] == pytest.approx(21.0) and rows["teacher"]["dice_std"] is None
    assert rows["tskd"]["dice_mean"] == pytest.approx(0.8333333)
    table = write_report(work, print_table=False)
    assert "| student from scratch | 20 | 1/1 × 3 | 0.550 ± 0.100 | 21.0 ± 1.0 |" in table, table
    assert "| teacher (LiteMedSAM + LoRA, reference) | 20 | 1/1 | 0.900 | 5.0 |" in table, table
    assert "over its 3 fine-tunings per seed" in (work / "report.md").read_text()


def test_tskd_minus_each_method_pairs_images_averaged_over_fine_tuning_seeds(work):
    by = {c["method"]: c for c in compare_to(work)}
    # each image: TS-KD's 3 fine-tunings average 0.8333; scratch's 0.6 on the first 3 images, 0.5 on the others
    assert by["scratch"]["mean"] == pytest.approx(0.8333333 - 0.55) and by["scratch"]["n"] == 6
    assert 0.8333333 - 0.6 - 1e-9 <= by["scratch"]["low"] < by["scratch"]["mean"] < by["scratch"]["high"] <= 0.3333334
    assert by["teacher"]["mean"] == pytest.approx(0.8333333 - 0.9) and by["teacher"]["seeds"] == 1
    # a fine-tuning seed not (yet) evaluated is left out, not counted as 0
    (RunLayout(work).run(0, 20).metrics("scratch", 2)).unlink()
    assert {c["method"]: c for c in compare_to(work)}["scratch"]["mean"] == pytest.approx(0.8333333 - 0.5)


def test_report_says_whether_the_synthetic_images_helped(work):
    layout = RunLayout(work)
    dirs = layout.run(0, 20)
    manifest = json.loads(layout.manifest.read_text())
    manifest["methods"].append("tskd_no_synth")
    layout.manifest.write_text(json.dumps(manifest))
    for k in range(3):  # without synthesis: 0.1 lower on every image, so the interval is above 0
        _metrics(dirs.metrics("tskd_no_synth", k), [d - 0.1 for d in (0.8, 0.8, 0.9)[k:k + 1] * 6], 12.0)
    synthetic = dirs.synthetic_datalist.parent
    synthetic.mkdir(parents=True)
    (synthetic / "quality.json").write_text(json.dumps({
        "num_synthetic": 16, "image_size": 64, "num_real_fid": 8, "feature_extractor": "VFMEncoder",
        "frechet_distance": 0.25, "noise_baseline": {"frechet_distance": 2.5},
        "memorisation": {"num_copies": 1, "copy_threshold": 0.95}, "grid": {"path": "quality_grid.png"}}))
    write_report(work, print_table=False)
    md = (work / "report.md").read_text()
    section = md[md.index("## Synthetic transfer set"):md.index("## Schedule")]
    assert "- seed 0: 16 synthetic images at 64 px; Fréchet distance to 8 real images in the VFMEncoder space 0.250 " \
           "(Gaussian noise: 2.500); near-copies of a real image (pixel correlation ≥ 0.95): 1;" in section, section
    assert "(seed0/shared/synthesis/synthetic/quality_grid.png)" in section
    assert "- 20 labels: TS-KD minus TS-KD without synthesis +0.100 [+0.100, +0.100]: the synthetic images helped" \
           in section, section
    # the same images 0.1 better without synthesis: the report says they hurt
    for k in range(3):
        _metrics(dirs.metrics("tskd_no_synth", k), [d + 0.1 for d in (0.8, 0.8, 0.9)[k:k + 1] * 6], 12.0)
    write_report(work, print_table=False)
    assert "the synthetic images hurt (interval below 0)" in (work / "report.md").read_text()


def test_report_words_the_tolerance_each_choice_was_made_with(work):
    """The post-processing line counts the choices and states the Dice tolerance recorded in each postprocess.json."""
    dirs = RunLayout(work).run(0, 20)
    for m, k, choice, tolerance in [("teacher", 0, "ellipse", 0.01), ("scratch", 0, "none", 0.01),
                                    ("scratch", 1, "largest_component", 0.02), ("scratch", 2, "ellipse", None)]:
        record = {"postprocess": choice, **({"dice_tolerance": tolerance} if tolerance is not None else {})}
        dirs.postprocess(m, k).parent.mkdir(parents=True, exist_ok=True)
        dirs.postprocess(m, k).write_text(json.dumps(record))  # tskd: no file, read as none (evaluated before 0.5)
    write_report(work, print_table=False)
    md = (work / "report.md").read_text()
    # a file without the record is a tolerance of the default (0.005)
    assert ("(the lowest validation HD95 among the options within 0.005 / 0.01 / 0.02 validation Dice of the best): "
            "none 4; each class's largest connected component 1; the moment ellipse of each class's largest connected "
            "component 2 of 7.") in md, md
