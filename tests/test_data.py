"""The data layer: demo phantoms, grouped splits, prepare, datalist validation, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from helpers import REPO
from tsdk_monai.data import group_of, load_datalist, load_split, make_phantom, prepare, split_groups, write_demo_data
from tsdk_monai.utils import TSDKInputError

OUTPUT = REPO / "tests" / "output"  # pictures worth looking at (git-ignored)


def _pairs(folder: Path, n: int = 12, size: int = 32) -> tuple[Path, Path]:
    """``n`` tiny image/label PNG pairs with HC18-style names (case 3k+1 is a second view of case 3k)."""
    img_dir, lab_dir = folder / "images", folder / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i in range(n):
        stem = f"{i - 1:03d}_2HC" if i % 3 == 1 else f"{i:03d}_HC"
        img, lab = make_phantom(np.random.default_rng(i), size=size)
        Image.fromarray(img).save(img_dir / f"{stem}.png")
        Image.fromarray(lab).save(lab_dir / f"{stem}.png")
    return img_dir, lab_dir


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- demo phantoms


def test_phantoms_look_like_ultrasound():
    """Speckle, a dark background outside the fan, a bright rim: not flat shapes. Saves a grid to look at."""
    tiles = []
    for i in range(8):
        img, lab = make_phantom(np.random.default_rng([0, i]), size=128, num_classes=2 if i < 4 else 3)
        assert img.dtype == np.uint8 and lab.shape == img.shape
        assert set(np.unique(lab)) <= ({0, 1} if i < 4 else {0, 1, 2})
        fan = img > 0
        assert 0.4 < fan.mean() < 0.9, "a sector-shaped field of view with black corners"
        assert img[0, 0] == 0 and img[0, -1] == 0
        assert len(np.unique(img[fan])) > 100, "speckle gives a continuum of grey levels"
        # speckle: neighbouring pixels differ a lot in the tissue (coefficient of variation of a patch)
        tissue = img[fan & (lab == 0)].astype(float)
        assert tissue.std() / tissue.mean() > 0.3
        # the organ is visible: its rim is brighter than the tissue on average
        from scipy import ndimage

        rim = ndimage.binary_dilation(lab > 0, iterations=1) & ~ndimage.binary_erosion(lab > 0, iterations=3)
        assert img[rim].mean() > tissue.mean() * 1.2
        if i >= 4:  # the inner structure (class 2) stands out from the rest of the head
            core = ndimage.binary_erosion(lab > 0, iterations=4) & (lab == 1)
            assert img[lab == 2].mean() > 1.3 * img[core].mean()
        tiles.append(np.concatenate([img, (lab * 120).astype(np.uint8)], axis=0))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(OUTPUT / "demo_phantoms_grid.png")


def test_demo_data_is_deterministic(tmp_path):
    a = write_demo_data(tmp_path / "a", n=10, size=32, n_labeled=3)
    b = write_demo_data(tmp_path / "b", n=10, size=32, n_labeled=3)
    assert _snapshot(a.parent) == _snapshot(b.parent)
    dl = load_datalist(a)
    assert len(dl["training"]) == 3 and dl["num_classes"] == 2
    assert sum(len(dl[s]) for s in ("training", "validation", "unlabeled", "test")) == 10
    # re-running into the same folder is a no-op
    assert write_demo_data(tmp_path / "a", n=10, size=32, n_labeled=3).read_bytes() == a.read_bytes()


# ---------------------------------------------------------------- splits


def test_group_of():
    assert group_of("010_HC") == "010" and group_of("010_2HC") == "010"
    assert group_of("abc") == "abc"
    assert group_of("case-7_slice3", r"case-(\d+)") == "7"


def test_split_groups_is_grouped_exact_and_seeded():
    groups = {f"{g:03d}": [f"{g:03d}_a", f"{g:03d}_b"][: 1 + g % 2] for g in range(50)}
    s0 = split_groups(groups, n_labeled=10, seed=0)
    assert len(s0["training"]) == 10
    where = {}
    for split, stems in s0.items():
        for stem in stems:
            where.setdefault(stem[:3], set()).add(split)
    assert all(len(v) == 1 for v in where.values()), "a group straddles two splits"
    assert sorted(sum(s0.values(), [])) == sorted(sum(groups.values(), []))
    assert split_groups(groups, n_labeled=10, seed=0) == s0
    assert split_groups(groups, n_labeled=10, seed=1) != s0


@pytest.mark.parametrize("n_labeled", [0, -1, 2.5])
def test_split_groups_rejects_bad_n_labeled(n_labeled):
    with pytest.raises(TSDKInputError, match="n_labeled"):
        split_groups({str(i): [str(i)] for i in range(10)}, n_labeled=n_labeled)


# ---------------------------------------------------------------- prepare


def test_prepare_writes_self_contained_grouped_datalist(tmp_path):
    img_dir, lab_dir = _pairs(tmp_path / "src")
    dl_path = prepare(str(img_dir), str(lab_dir), str(tmp_path / "out"), n_labeled=3, seed=0, test_fraction=0.2)
    dl = load_datalist(dl_path)
    groups = {s: {c["group"] for c in dl[s]} for s in ("training", "validation", "unlabeled", "test")}
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], f"{a} and {b} share a group"
    assert len(dl["training"]) == 3
    assert all("label" not in c for c in json.loads(dl_path.read_text())["unlabeled"])
    for c in dl["training"]:
        assert Path(c["image"]).is_relative_to(tmp_path / "out")
    # same seed, another folder: same bytes
    again = prepare(str(img_dir), str(lab_dir), str(tmp_path / "out2"), n_labeled=3, seed=0, test_fraction=0.2)
    assert again.read_bytes() == dl_path.read_bytes()


def test_prepare_reads_nifti(tmp_path):
    img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
    img_dir.mkdir()
    lab_dir.mkdir()
    for i in range(8):
        img, lab = make_phantom(np.random.default_rng(i), size=24)
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), img_dir / f"{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), np.eye(4)), lab_dir / f"{i:03d}.nii.gz")
    dl = load_datalist(prepare(str(img_dir), str(lab_dir), str(tmp_path / "out"), n_labeled=2))
    assert dl["training"][0]["image"].endswith(".nii.gz")


# ---------------------------------------------------------------- bad input


def _break(kind: str, img_dir: Path, lab_dir: Path) -> str:
    """Damage a valid folder pair in one way; return a fragment the error message must contain."""
    if kind == "corrupt_png":
        (img_dir / "002_HC.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        return "002_HC.png"
    if kind == "text_named_png":
        (img_dir / "002_HC.png").write_text("this is not an image")
        return "002_HC.png"
    if kind == "empty_file":
        (lab_dir / "003_HC.png").write_bytes(b"")
        return "003_HC.png"
    if kind == "size_mismatch":
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(lab_dir / "005_HC.png")
        return "005_HC.png"
    if kind == "label_out_of_range":
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(lab_dir / "008_HC.png")
        return "out of range"
    if kind == "label_not_integer":
        for f in list(img_dir.iterdir()) + list(lab_dir.iterdir()):
            f.unlink()
        for i in range(8):
            nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), img_dir / f"{i:03d}.nii.gz")
            nib.save(nib.Nifti1Image(np.full((8, 8), 0.5 if i == 5 else 0, np.float32), np.eye(4)), lab_dir / f"{i:03d}.nii.gz")
        return "005.nii.gz"
    if kind == "image_without_label":
        (lab_dir / "011_HC.png").unlink()
        return "011_HC.png"
    if kind == "label_without_image":
        (img_dir / "009_2HC.png").unlink()
        return "009_2HC.png"
    if kind == "empty_folder":
        for f in img_dir.iterdir():
            f.unlink()
        return "no image files"
    raise ValueError(kind)


BAD = ["corrupt_png", "text_named_png", "empty_file", "size_mismatch", "label_out_of_range", "label_not_integer",
       "image_without_label", "label_without_image", "empty_folder"]


@pytest.mark.parametrize("kind", BAD)
def test_prepare_bad_input_names_the_file_and_writes_nothing(tmp_path, kind):
    img_dir, lab_dir = _pairs(tmp_path / "src")
    fragment = _break(kind, img_dir, lab_dir)
    out = tmp_path / "out"
    with pytest.raises(TSDKInputError, match=fragment.replace(".", r"\.")):
        prepare(str(img_dir), str(lab_dir), str(out), n_labeled=2, num_classes=2)
    assert not (out / "datalist.json").exists()


def test_prepare_n_labeled_larger_than_pool(tmp_path):
    img_dir, lab_dir = _pairs(tmp_path / "src")
    with pytest.raises(TSDKInputError, match="n_labeled=50 is larger than the labelled pool"):
        prepare(str(img_dir), str(lab_dir), str(tmp_path / "out"), n_labeled=50)


def test_prepare_refuses_a_different_existing_datalist(tmp_path):
    img_dir, lab_dir = _pairs(tmp_path / "src")
    out = tmp_path / "out"
    prepare(str(img_dir), str(lab_dir), str(out), n_labeled=2, seed=0)
    before = _snapshot(out)
    with pytest.raises(TSDKInputError, match="already holds a different datalist"):
        prepare(str(img_dir), str(lab_dir), str(out), n_labeled=2, seed=1)
    assert _snapshot(out) == before, "nothing already written may change"


def test_prepare_refuses_to_overwrite_other_files(tmp_path):
    img_dir, lab_dir = _pairs(tmp_path / "src")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "000_HC.png").write_bytes(b"someone else's file")
    with pytest.raises(TSDKInputError, match="000_HC.png: already exists"):
        prepare(str(img_dir), str(lab_dir), str(out), n_labeled=2)
    assert (out / "images" / "000_HC.png").read_bytes() == b"someone else's file"
    assert not (out / "datalist.json").exists()


# ---------------------------------------------------------------- datalist validation


@pytest.fixture()
def small_datalist(tmp_path) -> Path:
    img_dir, lab_dir = _pairs(tmp_path / "src")
    return prepare(str(img_dir), str(lab_dir), str(tmp_path / "out"), n_labeled=2)


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_datalist_missing_file(small_datalist):
    missing = small_datalist.parent / json.loads(small_datalist.read_text())["training"][0]["image"]
    missing.unlink()
    with pytest.raises(TSDKInputError, match=f"missing file {missing}"):
        load_datalist(small_datalist)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d["training"][0].update(image="/etc/passwd"), "absolute path"),
        (lambda d: d["training"][0].update(image="../../../etc/passwd"), "leaves the datalist's folder"),
        (lambda d: d["test"].append(dict(d["training"][0])), "listed twice"),
        (lambda d: d["training"][0].pop("label"), "has no 'label'"),
        (lambda d: [d.update({k: []}) for k in ("training", "validation", "unlabeled", "test")], "datalist is empty"),
    ],
)
def test_datalist_validation(small_datalist, edit, fragment):
    _edit(small_datalist, edit)
    with pytest.raises(TSDKInputError, match=fragment):
        load_datalist(small_datalist)


def test_datalist_not_json(tmp_path):
    p = tmp_path / "datalist.json"
    p.write_bytes(b"\xff\xfe not json")
    with pytest.raises(TSDKInputError, match="not a valid JSON datalist"):
        load_datalist(p)


def test_load_split_empty_split(small_datalist):
    _edit(small_datalist, lambda d: d.update(unlabeled=[]))
    with pytest.raises(TSDKInputError, match="split 'unlabeled' has no cases"):
        load_split(small_datalist, "unlabeled")
    assert load_split(small_datalist, "unlabeled", allow_empty=True) == []


# ---------------------------------------------------------------- CLI


def _tsdk(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "tsdk_monai", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_prepare_and_bad_input(tmp_path):
    img_dir, lab_dir = _pairs(tmp_path / "src")
    ok = _tsdk("prepare", str(img_dir), str(lab_dir), str(tmp_path / "out"), "--n_labeled", "2", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "datalist.json").is_file()
    (img_dir / "003_HC.png").write_text("not a png")
    bad = _tsdk("prepare", str(img_dir), str(lab_dir), str(tmp_path / "out3"), "--n_labeled", "2", cwd=tmp_path)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("tsdk: error:") and "003_HC.png" in last and "Traceback" not in bad.stderr
    helptext = _tsdk("prepare", "--help", cwd=tmp_path)
    assert "n_labeled" in helptext.stdout + helptext.stderr


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_prepare_hc18_grouped_and_reproducible(hc18, tmp_path):
    a = prepare(str(hc18 / "images"), str(hc18 / "labels"), str(tmp_path / "a"), n_labeled=80, seed=0)
    dl = load_datalist(a)
    assert len(dl["training"]) == 80
    assert sum(len(dl[s]) for s in ("training", "validation", "unlabeled", "test")) == 999
    seen = {}
    for split in ("training", "validation", "unlabeled", "test"):
        for c in dl[split]:
            assert seen.setdefault(c["group"], split) == split, f"group {c['group']} straddles splits"
    shutil.rmtree(tmp_path / "a" / "images")  # the second run must not depend on the first's copies
    b = prepare(str(hc18 / "images"), str(hc18 / "labels"), str(tmp_path / "b"), n_labeled=80, seed=0)
    assert a.read_bytes() == b.read_bytes()
