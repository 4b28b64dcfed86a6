"""Bad input: a corpus generated from the demo phantoms, run through every layer that reads user files.

Each case damages one training case of a copy of the demo data set (or its datalist) and says what must happen:
``None`` = it must work (RGB and 16-bit images are converted to grey, constant images and all-background labels
are valid data), otherwise a regular expression of the problem the error must state; the error must also name the
file. The layers:

- ``tsdk prepare`` through the CLI entry point (``tsdk: error: FILE: PROBLEM`` on stderr, exit status 2);
- the datalist reader as every bundle calls it (``load_split``);
- the preprocessing of every bundle, parsed from its own config files (train, validation, inference);
- end to end (slow): each bundle's ``python -m monai.bundle run`` ends with the one-line error and a non-zero
  status, or trains on the must-work cases with finite weights; ``tsdk run`` passes a stage's error on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import BUNDLES, run_bundle
from tsdk_monai.data import image_stem, load_split
from tsdk_monai.utils import TSDKInputError, input_error_of

NON_UTF8 = os.fsdecode(b"\xff")  # a file name byte that is not UTF-8 (Linux keeps it as a lone surrogate)


# ---------------------------------------------------------------------------------------------- the corpus
def _png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path)


def _nii(arr: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _grey(path: Path) -> np.ndarray:
    """The demo PNG as MONAI reads it (PIL's (W, H) order) so a NIfTI written from it has the same spatial shape."""
    return np.asarray(Image.open(path)).T.copy()


def _swap(path: Path, suffix: str) -> Path:
    """``path`` with another image suffix (``x.png`` -> ``x.nii.gz``); the old file is removed."""
    new = path.with_name(image_stem(path) + suffix)
    path.unlink()
    return new


@dataclass
class Case:
    """One bad (or odd but valid) input. ``damage(image, label)`` returns (image, label, named file)."""

    name: str
    damage: Callable[[Path, Path], tuple[Path, Path, Path]]
    problem: str | None  # regex of the problem in the error; None: must work
    layers: dict[str, str | None] = field(default_factory=dict)  # per-layer exceptions to ``problem``


def _missing(img, lab):
    img.unlink()
    return img, lab, img


def _zero_png(img, lab):
    img.write_bytes(b"")
    return img, lab, img


def _truncated_png(img, lab):
    lab.write_bytes(lab.read_bytes()[: lab.stat().st_size // 2])
    return img, lab, lab


def _zero_nifti(img, lab):
    new = _swap(img, ".nii.gz")
    new.write_bytes(b"")
    return new, lab, new


def _truncated_nifti(img, lab):
    arr = _grey(img).astype(np.float32)
    new = _swap(img, ".nii.gz")
    _nii(arr, new)
    new.write_bytes(new.read_bytes()[: new.stat().st_size // 2])
    return new, lab, new


def _text_png(img, lab):
    img.write_text("this is a text file, not a PNG\n")
    return img, lab, img


def _volume(img, lab):
    """A 3D image and label where the data set (and the 2D stages) hold 2D images."""
    arr, seg = _grey(img), _grey(lab)
    new_img, new_lab = _swap(img, ".nii.gz"), _swap(lab, ".nii.gz")
    _nii(np.stack([arr] * 4, -1).astype(np.float32), new_img)
    _nii(np.stack([seg] * 4, -1).astype(np.uint8), new_lab)
    return new_img, new_lab, new_img


def _volume_flat_label(img, lab):
    """A 3D image with a 2D label (the reverse: a 2D file where a 3D one is expected)."""
    arr = _grey(img)
    new_img = _swap(img, ".nii.gz")
    _nii(np.stack([arr] * 4, -1).astype(np.float32), new_img)
    return new_img, lab, new_img


def _rgb(img, lab):
    arr = np.asarray(Image.open(img))
    _png(np.stack([arr, arr // 2, 255 - arr], -1).astype(np.uint8), img)
    return img, lab, img


def _uint16(img, lab):
    arr = np.asarray(Image.open(img)).astype(np.uint16) * 257  # the same picture on the 16-bit scale
    _png(arr, img)
    assert Image.open(img).mode.startswith("I;16")
    return img, lab, img


def _nonfinite(value: float):
    def damage(img, lab):
        arr = _grey(img).astype(np.float32)
        arr[10, 10] = value
        new = _swap(img, ".nii.gz")
        _nii(arr, new)
        return new, lab, new

    return damage


def _constant(img, lab):
    _png(np.full(np.asarray(Image.open(img)).shape, 128, np.uint8), img)
    return img, lab, img


def _size_mismatch(img, lab):
    _png(np.zeros((40, 48), np.uint8), lab)
    return img, lab, lab


def _label_value(value: float, dtype=np.float32):
    def damage(img, lab):
        seg = _grey(lab).astype(dtype)
        seg[seg > 0] = value
        seg[5, 5] = value
        new = _swap(lab, ".nii.gz")
        _nii(seg, new)
        return img, new, new

    return damage


def _label_out_of_range(img, lab):
    seg = np.asarray(Image.open(lab)).copy()
    seg[seg > 0] = 7
    seg[5, 5] = 7
    _png(seg, lab)
    return img, lab, lab


def _all_background(img, lab):
    _png(np.zeros_like(np.asarray(Image.open(lab))), lab)
    return img, lab, lab


def _non_utf8_name(img, lab):
    new_img = img.with_name(image_stem(img) + NON_UTF8 + ".png")
    new_lab = lab.with_name(image_stem(lab) + NON_UTF8 + ".png")
    img.rename(new_img)
    lab.rename(new_lab)
    return new_img, new_lab, new_img


READ = r"cannot read"
IS_3D = r"is 3D.*expects 2D|is 3D but .* is 2D"
CASES = [
    Case("missing_file", _missing, r"missing file|file not found|no image file with the same name"),
    Case("zero_byte_png", _zero_png, r"empty \(0 bytes\)"),
    Case("truncated_png", _truncated_png, READ),
    Case("zero_byte_nifti", _zero_nifti, r"empty \(0 bytes\)"),
    Case("truncated_nifti", _truncated_nifti, READ),
    Case("text_named_png", _text_png, READ),
    Case("3d_in_2d_data", _volume, IS_3D, {"student_inference": None}),
    Case("2d_label_for_3d_image", _volume_flat_label, IS_3D, {"student_inference": None}),
    Case("rgb_image", _rgb, None),
    Case("uint16_image", _uint16, None),
    Case("nan_image", _nonfinite(np.nan), r"NaN or infinite"),
    Case("inf_image", _nonfinite(np.inf), r"NaN or infinite"),
    Case("constant_image", _constant, None),
    Case("size_mismatch", _size_mismatch, r"does not match"),
    Case("label_out_of_range", _label_out_of_range, r"out of range"),
    Case("label_not_integer", _label_value(0.5), r"fractional"),
    Case("label_negative", _label_value(-1, np.int16), r"negative"),
    Case("all_background_label", _all_background, None),
    Case("non_utf8_file_name", _non_utf8_name, None),
]
CASE_IDS = [c.name for c in CASES]
WORKS = [c for c in CASES if c.problem is None]


def _target(root: Path) -> tuple[dict, Path, Path]:
    data = json.loads((root / "datalist.json").read_text())
    case = data["training"][0]
    return data, root / case["image"], root / case["label"]


def make_case(case: Case, demo: Path, root: Path) -> tuple[Path, Path]:
    """Copy the demo data set to ``root``, damage its first training case; return (datalist, the named file)."""
    shutil.copytree(demo, root)
    data, img, lab = _target(root)
    new_img, new_lab, named = case.damage(img, lab)
    data["training"][0].update(image=str(new_img.relative_to(root)), label=str(new_lab.relative_to(root)))
    (root / "datalist.json").write_text(json.dumps(data))
    return root / "datalist.json", named


def make_works(demo: Path, root: Path) -> Path:
    """One data set holding every must-work case, one per training case (6 training cases in the demo data); the
    other splits are cut to 1-2 cases to keep the bundle runs short."""
    shutil.copytree(demo, root)
    data = json.loads((root / "datalist.json").read_text())
    for split, n in (("validation", 1), ("unlabeled", 2), ("test", 1)):
        data[split] = data[split][:n]
    assert len(data["training"]) >= len(WORKS)
    for case, entry in zip(WORKS, data["training"]):
        new_img, new_lab, _ = case.damage(root / entry["image"], root / entry["label"])
        entry.update(image=str(new_img.relative_to(root)), label=str(new_lab.relative_to(root)))
    (root / "datalist.json").write_text(json.dumps(data))
    return root / "datalist.json"


def expected(case: Case, layer: str) -> str | None:
    return case.layers.get(layer, case.problem)


def assert_names(message: str, named: Path, problem: str) -> None:
    """The message names the file (its stem at least) and states the problem."""
    assert image_stem(named) in message, f"the error does not name {named.name}: {message}"
    assert re.search(problem, message), f"the error does not say /{problem}/: {message}"


@pytest.fixture(scope="module")
def demo(demo_datalist) -> Path:
    return Path(demo_datalist).parent


# ------------------------------------------------------------------------------------------ tsdk prepare
def _tsdk_main(args: list[str], capsys) -> tuple[int, str]:
    from tsdk_monai.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prepare(case, demo, tmp_path, capsys):
    _, named = make_case(case, demo, tmp_path / "src")
    out = tmp_path / "out"
    code, err = _tsdk_main(["prepare", str(tmp_path / "src" / "images"), str(tmp_path / "src" / "labels"), str(out),
                            "--n_labeled", "6", "--num_classes", "2"], capsys)
    problem = expected(case, "prepare")
    if problem is None:
        assert code == 0, err[-2000:]
        dl = load_split(out / "datalist.json", "training")
        assert len(dl) == 6
        return
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("tsdk: error: ") and "Traceback" not in err, err[-2000:]
    assert_names(last, named, problem)
    assert not (out / "datalist.json").exists(), "a failed prepare must not write a datalist"


@pytest.mark.parametrize("n_labeled, problem", [(0, "positive integer"), (1000, "larger than the labelled pool")])
def test_prepare_n_labeled(n_labeled, problem, demo, tmp_path, capsys):
    code, err = _tsdk_main(["prepare", str(demo / "images"), str(demo / "labels"), str(tmp_path / "out"),
                            "--n_labeled", str(n_labeled)], capsys)
    assert code == 2 and re.search(f"n_labeled.*{problem}", err.strip().splitlines()[-1]), err[-2000:]


def test_prepare_2d_file_in_3d_data(demo, tmp_path, capsys):
    """The reverse of 3d_in_2d_data: one 2D pair in a data set of 3D volumes."""
    src = tmp_path / "src"
    shutil.copytree(demo, src)
    pngs = sorted((src / "images").glob("*.png"))
    for img in pngs[1:]:
        _volume(img, src / "labels" / img.name)
    code, err = _tsdk_main(["prepare", str(src / "images"), str(src / "labels"), str(tmp_path / "out"),
                            "--n_labeled", "6"], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert re.search(r"is [23]D but .* is [23]D", last) and image_stem(pngs[0]) in last, last


def test_prepare_cli_process(demo, tmp_path):
    """The real ``tsdk`` process: exit status 2, one line naming the file and the problem, no traceback."""
    _, named = make_case(CASES[CASE_IDS.index("nan_image")], demo, tmp_path / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "tsdk_monai", "prepare", str(tmp_path / "src" / "images"),
         str(tmp_path / "src" / "labels"), str(tmp_path / "out"), "--n_labeled", "6"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_names(proc.stderr.strip().splitlines()[-1], named, "NaN or infinite")


# ------------------------------------------------------------------------------------------- datalists
def _edit(datalist: Path, fn) -> None:
    data = json.loads(datalist.read_text())
    fn(data, datalist.parent)
    datalist.write_text(json.dumps(data))


DATALIST_CASES = {
    "absolute_path": (lambda d, root: d["training"][0].update(image=str(root / d["training"][0]["image"])),
                      r"training\[0\]\.image is an absolute path"),
    "path_escapes_folder": (lambda d, root: (shutil.copy(root / d["training"][0]["image"], root.parent / "outside.png"),
                                             d["training"][0].update(image="../outside.png")),
                            r"training\[0\]\.image \(\.\./outside\.png\) leaves the datalist's folder"),
    "missing_path": (lambda d, root: d["training"][0].update(image="images/nowhere.png"),
                     r"missing file .*nowhere\.png"),
    "duplicated_path": (lambda d, root: d["unlabeled"].append({"image": d["training"][0]["image"]}), r"listed twice"),
    "empty_datalist": (lambda d, root: [d.update({k: []}) for k in ("training", "validation", "unlabeled", "test")],
                       r"the datalist is empty"),
    "no_labelled_case": (lambda d, root: d.update(training=[]), r"split 'training' has no cases"),
    "label_missing_key": (lambda d, root: d["training"][0].pop("label"), r"has no 'label'"),
}


@pytest.mark.parametrize("name", sorted(DATALIST_CASES))
def test_datalist_cases(name, demo, tmp_path, monkeypatch):
    monkeypatch.delenv("TSDK_ALLOW_OUTSIDE", raising=False)
    shutil.copytree(demo, tmp_path / "data")
    datalist = tmp_path / "data" / "datalist.json"
    edit, problem = DATALIST_CASES[name]
    _edit(datalist, edit)
    with pytest.raises(TSDKInputError) as info:
        load_split(datalist, "training")  # what every bundle calls first
    assert str(datalist) in str(info.value) and re.search(problem, str(info.value)), str(info.value)


def test_datalist_outside_paths_only_when_allowed(demo, tmp_path, monkeypatch):
    shutil.copytree(demo, tmp_path / "data")
    datalist = tmp_path / "data" / "datalist.json"
    _edit(datalist, DATALIST_CASES["absolute_path"][0])
    monkeypatch.delenv("TSDK_ALLOW_OUTSIDE", raising=False)
    with pytest.raises(TSDKInputError, match="TSDK_ALLOW_OUTSIDE=1"):
        load_split(datalist, "training")
    assert Path(load_split(datalist, "training", allow_outside=True)[0]["image"]).is_file()
    monkeypatch.setenv("TSDK_ALLOW_OUTSIDE", "1")
    assert len(load_split(datalist, "training")) == 6


@pytest.mark.parametrize("content, problem", [(None, "datalist file not found"), (b"\xff\xfe{", "not a valid JSON")])
def test_datalist_file_itself(content, problem, tmp_path):
    datalist = tmp_path / "datalist.json"
    if content is not None:
        datalist.write_bytes(content)
    with pytest.raises(TSDKInputError, match=f"{re.escape(str(datalist))}: {problem}"):
        load_split(datalist, "training")


# --------------------------------------------------------------------- every bundle's preprocessing
def _pipeline(bundle: str, configs: list[str], item: str, overrides: dict):
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    for k, v in overrides.items():
        parser[k] = v
    t = parser.get_parsed_content(item)
    return t if isinstance(t, Compose) else Compose(t)


# layer -> (bundle, config files, preprocessing id, overrides, keys it reads)
PIPELINES = {
    "teacher_train": ("tsdk_teacher", ["train.json"], "train#preprocessing", {"num_classes": 2, "image_size": 32},
                      ("image", "label")),
    "teacher_inference": ("tsdk_teacher", ["inference.json"], "preprocessing", {}, ("image",)),
    "synthesis_train": ("tsdk_synthesis", ["train.json"], "preprocessing", {"image_size": 32}, ("image",)),
    "distill_train": ("tsdk_distill", ["train.json"], "preprocessing", {"num_classes": 2, "image_size": 32}, ("image",)),
    "distill_validate": ("tsdk_distill", ["train.json"], "validate#preprocessing", {"num_classes": 2, "image_size": 32},
                         ("image", "label")),
    "student_train": ("tsdk_student", ["train.json"], "train#preprocessing", {"num_classes": 2, "image_size": 32},
                      ("image", "label")),
    "student_inference": ("tsdk_student", ["inference.json"], "preprocessing", {}, ("image",)),
}
if (BUNDLES / "tsdk_ssl" / "configs" / "train.json").is_file():
    PIPELINES["ssl_train"] = ("tsdk_ssl", ["train.json"], "train#preprocessing", {"image_size": 32}, ("image",))


@pytest.fixture(scope="module")
def pipelines():
    return {name: _pipeline(*spec[:4]) for name, spec in PIPELINES.items()}


@pytest.mark.parametrize("layer", sorted(PIPELINES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bundle_preprocessing(case, layer, pipelines, demo, tmp_path):
    keys = PIPELINES[layer][4]
    datalist, named = make_case(case, demo, tmp_path / "data")
    entry = json.loads(datalist.read_text())["training"][0]
    item = {k: str(datalist.parent / entry[k]) for k in keys}
    problem = expected(case, layer)
    if problem is not None and not any(Path(item[k]) == named for k in keys):
        problem = None  # the damaged file is one this stage does not read (a label, for an image-only stage)
    transform = pipelines[layer]
    if problem is None:
        out = transform(item)
        out = out[0] if isinstance(out, list) else out  # random crops return lists
        img = out["image"]
        assert img.shape[0] == 1, f"{layer}: {case.name} gives {img.shape[0]} channels, expected grey"
        assert torch.isfinite(torch.as_tensor(img)).all(), f"{layer}: {case.name} gives non-finite values"
        return
    with pytest.raises(Exception) as info:
        transform(item)
    err = input_error_of(info.value)
    assert err is not None, f"{layer}: {case.name} raised no clear error: {info.value!r}"
    assert_names(str(err), named, problem)


def test_16bit_image_reads_as_its_8bit_picture(demo, tmp_path, pipelines):
    """A 16-bit PNG of the same picture gives the same input as the 8-bit PNG, also for the diffusion stage's fixed
    0..255 range (not a saturated white image)."""
    _, img, _ = _target(demo)
    copy = tmp_path / img.name
    shutil.copy(img, copy)
    _png(np.asarray(Image.open(img)).astype(np.uint16) * 257, copy)
    for layer in ("synthesis_train", "distill_train", "student_inference"):
        a = pipelines[layer]({"image": str(img)})["image"]
        b = pipelines[layer]({"image": str(copy)})["image"]
        assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=1e-4), layer


# ---------------------------------------------------------------------------------- end to end (slow)
def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode not in (0, 134, -6), f"exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}"
    assert lines and lines[-1].startswith("tsdk: error: "), (proc.stdout + proc.stderr)[-3000:]
    return lines[-1]


def _finite_state(path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors), f"{path}: non-finite weights"


@pytest.fixture(scope="module")
def works(demo, tmp_path_factory) -> Path:
    return make_works(demo, tmp_path_factory.mktemp("works") / "data")


@pytest.fixture(scope="module")
def student_trained(works, tmp_path_factory) -> Path:
    """The student bundle trained one epoch on the must-work data set (RGB, 16-bit, constant, all-background, non-UTF-8
    name in its training split)."""
    out = tmp_path_factory.mktemp("student_works")
    run_bundle("tsdk_student", ["train.json"], {
        "dataset_dir": str(works.parent), "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"),
        "image_size": 32, "batch_size": 6, "train#trainer#max_epochs": 1})
    _finite_state(out / "models" / "model.pt")
    return out


@pytest.mark.slow
def test_student_inference(student_trained, works, tmp_path):
    """Inference on a folder: RGB, 16-bit, constant, non-UTF-8 name and a 3D volume work; a model.pt that needs
    pickle to load stops the run naming it."""
    data = json.loads(works.read_text())
    inputs = tmp_path / "in"
    inputs.mkdir()
    for entry in data["training"][: len(WORKS)]:
        shutil.copy(works.parent / entry["image"], inputs / Path(entry["image"]).name)
    _volume(Path(shutil.copy(works.parent / data["test"][0]["image"], inputs / "volume.png")),
            Path(shutil.copy(works.parent / data["test"][0]["label"], tmp_path / "volume.png")))
    common = {"ckpt_dir": str(student_trained / "models"), "image_size": 32, "num_classes": 2}
    run_bundle("tsdk_student", ["inference.json"], {**common, "input_dir": str(inputs),
                                                    "output_dir": str(tmp_path / "seg")})
    segs = sorted(os.listdir(tmp_path / "seg"))
    assert len(segs) == len(WORKS) + 1 and any(NON_UTF8 in s for s in segs), segs
    # a model.pt that needs pickle to load is refused, naming it, and its code does not run
    evil = tmp_path / "evil" / "model.pt"
    _evil_checkpoint(evil, tmp_path / "PWNED", torch.load(student_trained / "models" / "model.pt", weights_only=True))
    proc = run_bundle("tsdk_student", ["inference.json"], {**common, "ckpt_dir": str(evil.parent), "input_dir": str(
        inputs), "output_dir": str(tmp_path / "seg2")}, check=False)
    assert_names(_last_error(proc), evil, r"refused: the checkpoint needs pickle to load")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_tsdk_run(demo, tmp_path, capsys):
    """``tsdk run``: a bad datalist stops before any stage; a bad image stops the stage that reads it, and the
    driver passes its one-line error on (exit 2)."""
    shutil.copytree(demo, tmp_path / "data")
    _edit(tmp_path / "data" / "datalist.json", DATALIST_CASES["path_escapes_folder"][0])
    code, err = _tsdk_main(["run", "--datalist", str(tmp_path / "data" / "datalist.json"),
                            "--workdir", str(tmp_path / "w1"), "--methods", "scratch"], capsys)
    assert code == 2 and "leaves the datalist's folder" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "w1" / "logs").exists() or not list((tmp_path / "w1" / "logs").glob("*.log"))

    datalist, named = make_case(CASES[CASE_IDS.index("text_named_png")], demo, tmp_path / "bad")
    code, err = _tsdk_main(["run", "--datalist", str(datalist), "--workdir", str(tmp_path / "w2"), "--methods",
                            "scratch", "--student_size", "32", "--student_epochs", "1"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and re.search(r"\(stage \S*scratch_finetune; log ", last), err[-2000:]
    assert_names(last, named, READ)
    assert not list((tmp_path / "w2").rglob("*.pt")), "a stage stopped by bad input must not write checkpoints"


@pytest.mark.slow
def test_teacher_bundle(works, demo, tmp_path):
    common = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"), "image_size": 64,
              "batch_size": 6, "max_iterations": 1, "progress": False, "train#trainer#max_epochs": 1}
    run_bundle("tsdk_teacher", ["train.json"], {**common, "dataset_dir": str(works.parent)})
    _finite_state(tmp_path / "models" / "teacher" / "model.pt")
    # inference on a test split holding a truncated PNG
    shutil.copytree(demo, tmp_path / "bad")
    datalist = tmp_path / "bad" / "datalist.json"
    test_img = datalist.parent / json.loads(datalist.read_text())["test"][0]["image"]
    test_img.write_bytes(test_img.read_bytes()[:200])
    proc = run_bundle("tsdk_teacher", ["inference.json"], {"dataset_dir": str(datalist.parent), "ckpt_dir": str(
        tmp_path / "models"), "output_dir": str(tmp_path / "infer")}, check=False)
    assert_names(_last_error(proc), test_img, READ)


@pytest.mark.slow
def test_synthesis_bundle(works, demo, tmp_path):
    common = {"ckpt_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "logs"),
              "output_dir": str(tmp_path / "synthetic"), "image_size": 32,
              "network_def#block_out_channels": [8, 16, 16, 16], "batch_size": 16, "train#trainer#max_epochs": 1}
    run_bundle("tsdk_synthesis", ["train.json"], {**common, "dataset_dir": str(works.parent)})
    _finite_state(tmp_path / "models" / "model.pt")


@pytest.mark.slow
def test_distill_bundle(works, demo, tmp_path):
    from tsdk_monai.networks import LoRASegTeacher, save_teacher

    torch.manual_seed(0)
    save_teacher(LoRASegTeacher(num_classes=2, img_size=64), tmp_path / "teacher" / "teacher")
    common = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"), "image_size": 32,
              "teacher_ckpt": str(tmp_path / "teacher"), "use_unlabeled": False, "batch_size": 6,
              "train#trainer#max_epochs": 1}
    run_bundle("tsdk_distill", ["train.json"], {**common, "dataset_dir": str(works.parent)})
    _finite_state(tmp_path / "models" / "student_distilled.pt")
    datalist, named = make_case(CASES[CASE_IDS.index("zero_byte_nifti")], demo, tmp_path / "bad")
    proc = run_bundle("tsdk_distill", ["train.json"], {**common, "dataset_dir": str(datalist.parent),
                                                       "ckpt_dir": str(tmp_path / "bad_models")}, check=False)
    assert_names(_last_error(proc), named, r"empty \(0 bytes\)")



# ------------------------------------------------------------------------------------------ untrusted files
class _RunsCode:
    """Unpickling this object runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path, state: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state or {"w": torch.zeros(2)})
    state["payload"] = _RunsCode(marker)
    torch.save(state, path)
    return path


def _loaders(tmp_path: Path) -> dict[str, Callable[[Path], object]]:
    from ignite.engine import Engine

    from tsdk_monai.engines.diffusion import load_weights
    from tsdk_monai.handlers import CheckedCheckpointLoader
    from tsdk_monai.networks.students import build_student, load_student_weights
    from tsdk_monai.networks.vfm import load_sam_state_dict
    from tsdk_monai.utils import read_state_dict

    def checkpoint_loader(path: Path) -> None:
        engine = Engine(lambda e, b: None)
        CheckedCheckpointLoader(load_path=str(path), load_dict={"model": torch.nn.Linear(2, 2)}).attach(engine)
        engine.run([0], max_epochs=1)

    return {
        "read_state_dict": read_state_dict,
        "student init_ckpt (load_student_weights)":
            lambda p: load_student_weights(build_student("unet_small", img_size=32), p),
        "VFM checkpoint (load_sam_state_dict)": load_sam_state_dict,
        "diffusion model (load_weights)": lambda p: load_weights(torch.nn.Linear(2, 2), p),
        "bundle CheckpointLoader (evaluate, inference)": checkpoint_loader,
    }


LOADERS = list(_loaders(Path(".")))


@pytest.mark.parametrize("loader", LOADERS)
def test_pickle_bearing_checkpoint_is_refused(loader, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(Exception) as info:
        _loaders(tmp_path)[loader](evil)
    err = input_error_of(info.value)
    assert err is not None, f"{loader}: no clear error: {info.value!r}"
    assert str(evil) in str(err) and "refused: the " in str(err) and "weights_only=True" in str(err), str(err)
    assert "weights_only` set to `False`" not in str(err), "never suggest loading it unsafely"
    assert not marker.exists(), f"{loader} ran the checkpoint's code"


def test_pickle_bearing_teacher_is_refused(tmp_path):
    from tsdk_monai.networks import LoRASegTeacher, load_teacher, save_teacher

    folder = save_teacher(LoRASegTeacher(num_classes=2, img_size=64), tmp_path / "teacher")
    _evil_checkpoint(folder / "model.pt", tmp_path / "PWNED", torch.load(folder / "model.pt", weights_only=True))
    with pytest.raises(TSDKInputError, match=re.escape(str(folder / "model.pt")) + ": refused: the teacher weights"):
        load_teacher(folder)
    assert not (tmp_path / "PWNED").exists()


def test_every_torch_load_is_weights_only():
    """Every ``torch.load`` call in the package and the bundle configs passes ``weights_only=True``."""
    repo = Path(__file__).resolve().parents[1]
    files = list((repo / "tsdk_monai").rglob("*.py")) + list((repo / "bundles").rglob("*.json"))
    calls = []
    for f in files:
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f, text[m.start():i]))
    unsafe = [f"{f.relative_to(repo)}: {c}" for f, c in calls if "weights_only=True" not in c]
    assert calls and not unsafe, unsafe
