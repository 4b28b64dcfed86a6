"""The student bundle: train -> evaluate -> inference (2D and 3D), exports, resume, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import run_bundle, verify_metadata

BUNDLE = "tsdk_student"
pytestmark = pytest.mark.slow


def test_student_metadata_verifies(tmp_path):
    verify_metadata(BUNDLE, tmp_path)


@pytest.fixture(scope="module", params=["unet_small", "vit_tiny"])
def trained(request, demo_datalist, tmp_path_factory):
    """A student trained for 2 epochs on the demo data at 64x64, with its evaluation on the test split."""
    work = tmp_path_factory.mktemp(f"student_{request.param}")
    common = {"dataset_dir": str(demo_datalist.parent), "ckpt_dir": str(work / "models"), "output_dir": str(work / "eval"),
              "student": request.param, "image_size": 64, "batch_size": 3}
    run_bundle(BUNDLE, ["train.json"], {**common, "train#trainer#max_epochs": 2})
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], common)
    return request.param, work, common


def test_train_writes_plain_state_dict_and_resumes(trained):
    student, work, common = trained
    state = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    from tsdk_monai.networks.students import build_student

    build_student(student, num_classes=2, img_size=64).load_state_dict(state)  # strict: same keys and shapes
    ckpts = sorted((work / "models").glob("checkpoint*.pt"))
    assert len(ckpts) == 1 and "2" in ckpts[0].stem
    # resume: a run asked for 3 epochs continues from epoch 2 instead of starting over
    proc = run_bundle(BUNDLE, ["train.json"], {**common, "train#trainer#max_epochs": 3})
    log = proc.stdout + proc.stderr
    assert "Epoch[3/3]" in log.replace(" ", "") or "Epoch: 3/3" in log, log[-3000:]
    assert "Epoch: 1/3" not in log and "Epoch[1/3]" not in log.replace(" ", ""), "resume must not restart at epoch 1"


def test_evaluate_writes_metrics_json(trained, demo_datalist):
    _, work, _ = trained
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    n_test = len(json.loads(demo_datalist.read_text())["test"])
    assert len(metrics["cases"]) == n_test
    assert 0.0 <= metrics["mean"]["test_mean_dice"] <= 1.0
    assert set(metrics["per_class_mean"]["test_mean_dice"]) == {"head"}
    for case in metrics["cases"]:
        assert Path(case["image"]).name.endswith(".png")
        assert 0.0 <= case["test_mean_dice"]["head"] <= 1.0
        assert case["test_hd95"]["head"] is not None and case["test_hd95"]["head"] >= 0  # a miss scores the diagonal
    assert metrics["empty_predictions"] >= 0 and metrics["invented"] >= 0
    # the post-processing was chosen on the validation split, before the test was scored
    chosen = json.loads((work / "models" / "postprocess.json").read_text())
    assert chosen["postprocess"] in ("none", "largest_component", "ellipse")
    assert chosen["validation_cases"] == len(json.loads(demo_datalist.read_text())["validation"])
    assert set(chosen["validation_dice"]) == set(chosen["validation_hd95"]) == {"none", "largest_component", "ellipse"}


def test_inference_2d_and_3d_keep_geometry(trained, demo_datalist, tmp_path):
    student, work, _ = trained
    # a 3D NIfTI volume made of demo slices, with a non-trivial affine
    from monai.transforms import LoadImage

    imgs = sorted((demo_datalist.parent / "images").glob("*.png"))[:3]
    vol = np.stack([np.asarray(LoadImage(image_only=True)(str(p))) for p in imgs], axis=-1).astype(np.float32)
    # each slice spans the volume's range, so per-image intensity scaling gives the same slices in 2D and 3D
    assert all(vol[..., i].min() == vol.min() and vol[..., i].max() == vol.max() for i in range(vol.shape[-1]))
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    nib.save(nib.Nifti1Image(vol, affine), in_dir / "volume.nii.gz")
    for p in imgs[:2]:
        (in_dir / p.name).write_bytes(p.read_bytes())
    out_dir = tmp_path / "out"
    run_bundle(BUNDLE, ["inference.json"], {"ckpt_dir": str(work / "models"), "input_dir": str(in_dir),
                                            "output_dir": str(out_dir), "student": student, "image_size": 64})
    seg3d = nib.load(out_dir / "volume_seg.nii.gz")
    assert seg3d.shape == vol.shape
    np.testing.assert_allclose(seg3d.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg3d.dataobj))) <= {0, 1}
    for p in imgs[:2]:
        seg2d = nib.load(out_dir / f"{p.name[:-4]}_seg.nii.gz")
        assert seg2d.shape[:2] == vol.shape[:2]
        # slice-by-slice 3D inference equals the 2D inference of the same slice
        i = imgs.index(p)
        np.testing.assert_array_equal(np.asarray(seg2d.dataobj).squeeze(), np.asarray(seg3d.dataobj)[..., i])


def test_torchscript_and_onnx_exports_match(trained, tmp_path):
    student, work, _ = trained
    from tsdk_monai.networks.students import build_student

    net = build_student(student, num_classes=2, img_size=64).eval()
    net.load_state_dict(torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref = net(x)
    ts = tmp_path / "model.ts"
    run_bundle(BUNDLE, ["train.json"], {"ckpt_file": str(work / "models" / "model.pt"), "filepath": str(ts),
                                       "net_id": "network_def", "student": student, "image_size": 64, "num_classes": 2,
                                       "use_trace": True, "input_shape": [1, 1, 64, 64],
                                       "dataset_dir": str(work)},
               workflow="ckpt_export")
    scripted = torch.jit.load(str(ts))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)
    onnx_path = tmp_path / "model.onnx"
    from tsdk_monai.export import export_onnx

    export_onnx(net, onnx_path, image_size=64)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
