"""Sharing a trained student: the zoo's own checks on the shipped and the exported bundle, and a download round trip
from a local HTTP server on loopback."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import BUNDLES, _env, run_bundle, verify_metadata

pytestmark = pytest.mark.slow


def _verify_net_in_out(bundle: Path) -> None:
    """The model zoo's check: the network built from ``inference.json`` takes and gives what metadata.json says."""
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
           str(bundle / "configs" / "metadata.json"), "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(bundle), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "data shape of network is verified with no error" in out, out[-3000:]


def test_shipped_student_bundle_passes_the_zoo_checks(tmp_path):
    _verify_net_in_out(BUNDLES / "tsdk_student")
    verify_metadata("tsdk_student", tmp_path)


def test_exported_bundle_is_self_contained(exported_bundle, tmp_path):
    b = exported_bundle
    assert sorted(p.name for p in b.iterdir()) == ["LICENSE", "configs", "docs", "large_files.yml", "models"]
    _verify_net_in_out(b)
    verify_metadata(b, tmp_path)
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    run = b.parents[1]
    measured = json.loads((run / "seed0" / "n6" / "scratch" / "eval" / "metrics.json").read_text())["mean"]
    assert meta["eval_metrics"]["mean_dice"] == round(measured["test_mean_dice"], 4)  # measured, not typed
    assert meta["version"] == "1.0.0" and "1.0.0" in meta["changelog"] and meta["tsdk"]["method"] == "scratch"
    assert meta["tsdk"]["n_labeled"] == 6 and len(meta["tsdk"]["labelled_images"]) == 6
    assert "tsdk-monai" in meta["required_packages_version"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "head"}
    inference = json.loads((b / "configs" / "inference.json").read_text())
    assert (inference["student"], inference["num_classes"], inference["image_size"]) == ("unet_small", 2, 64)
    assert inference["keep_aspect"] is True and meta["tsdk"]["schedule"]["keep_aspect"] is True  # the run's geometry
    chosen = json.loads((run / "seed0" / "n6" / "scratch" / "models" / "postprocess.json").read_text())
    assert inference["postprocess"] == chosen["postprocess"] == meta["tsdk"]["postprocess"]  # chosen on validation
    assert "keep_largest_component" not in inference
    train = json.loads((b / "configs" / "train.json").read_text())
    assert train["num_classes"] == 2 and train["image_size"] == 64 and train["resume"] is False
    # weights: a plain state dict (weights_only) and TorchScript giving the same logits
    state = torch.load(b / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    from tsdk_monai.networks import build_student

    net = build_student("unet_small", num_classes=2, img_size=64).eval()
    net.load_state_dict(state)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(b / "models" / "model.ts"))(x), net(x))
    # large_files.yml declares every weight file by its hash
    large = yaml.safe_load((b / "large_files.yml").read_text())["large_files"]
    assert {f["path"] for f in large} == {"models/model.pt", "models/model.ts"}
    for f in large:
        assert f["hash_type"] == "sha256" and f["hash_val"] == hashlib.sha256((b / f["path"]).read_bytes()).hexdigest()
    card = (b / "docs" / "README.md").read_text()
    for part in ("## Intended use", "## Data", "## Results", "## Limitations", "## How to run", "## Licence",
                 f"{measured['test_mean_dice']:.3f}", "synthetic demo phantoms"):
        assert part in card, part
    archive = b.parent / "tsdk_scratch_unet_small_v1.0.0.zip"
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600: others may read it
    assert "tsdk_scratch_unet_small/configs/metadata.json" in names and "tsdk_scratch_unet_small/models/model.pt" in names
    # the zoo's TorchScript export of the exported bundle itself
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "m.ts"),
           "--ckpt_file", str(b / "models" / "model.pt"), "--meta_file", str(b / "configs" / "metadata.json"),
           "--config_file", str(b / "configs" / "inference.json"), "--bundle_root", str(b), "--use_trace", "True",
           "--input_shape", "[1, 1, 64, 64]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0 and (tmp_path / "m.ts").is_file(), (proc.stdout + proc.stderr)[-3000:]


def test_download_from_loopback_round_trip(exported_bundle, demo_datalist, tmp_path):
    """Serve the zip from a local HTTP server, download it with MONAI, load it, run its inference: same output."""
    name, version = exported_bundle.name, "1.0.0"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(exported_bundle.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{name}_v{version}.zip"
        cmd = [sys.executable, "-m", "monai.bundle", "download", "--name", name, "--version", version, "--url", url,
               "--bundle_dir", str(tmp_path / "hub")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    finally:
        server.shutdown()
    copy = tmp_path / "hub" / name
    assert (copy / "configs" / "inference.json").is_file() and (copy / "models" / "model.pt").is_file()
    from monai.bundle import load

    state = load(name=name, bundle_dir=str(tmp_path / "hub"))  # the local copy: no download
    state = state.state_dict() if isinstance(state, torch.nn.Module) else state
    original = torch.load(exported_bundle / "models" / "model.pt", weights_only=True)
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    # inference from the downloaded copy equals the original bundle's
    image = demo_datalist.parent / json.loads(demo_datalist.read_text())["test"][0]["image"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / image.name).write_bytes(image.read_bytes())
    outputs = {}
    for label, bundle in (("original", exported_bundle), ("downloaded", copy)):
        run_bundle(bundle, ["inference.json"], {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / label)})
        from monai.transforms import LoadImage

        outputs[label] = np.asarray(LoadImage(image_only=True)(str(tmp_path / label / f"{image.stem}_seg.nii.gz")))
    np.testing.assert_array_equal(outputs["original"], outputs["downloaded"])
