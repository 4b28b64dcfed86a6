"""The student bundle served by a real MONAI Label 0.8.5 server on 127.0.0.1 (its own virtual environment)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, run_bundle

pytestmark = pytest.mark.slow
VENV = REPO / ".venv-monailabel"
CONSTRAINTS = REPO / "tests" / "monailabel-constraints.txt"


@pytest.fixture(scope="module")
def monailabel_python() -> Path:
    """Create (or reuse) the MONAI Label virtual environment with tsdk-monai installed in it (~5 min the first time)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".tsdk-stamp"
    want = CONSTRAINTS.read_text() + (REPO / "setup.cfg").read_text()
    if not (python.exists() and stamp.exists() and stamp.read_text() == want):
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]
        proc = subprocess.run(pip + ["monailabel==0.8.5", "-e", str(REPO)], capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stderr[-4000:]
        stamp.write_text(want)
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_file(url: str, path: Path) -> tuple[bytes, str]:
    """POST ``path`` as a multipart upload; return the response body and the file name the server gave it."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read(), r.headers.get_filename() or "label.nii.gz"


def _post(url: str, body: bytes, content_type: str) -> bytes:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=900) as r:
        return r.read()


def _labelled_studies(datalist: Path, studies: Path, n: int) -> list[str]:
    """``n`` labelled training cases of the datalist as MONAI Label studies: NIfTI images (the datastore's default
    extensions) and their labels in ``labels/final``."""
    import nibabel as nib
    from PIL import Image

    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    ids = []
    for case in json.loads(datalist.read_text())["training"][:n]:
        stem = Path(case["image"]).stem
        for key, folder, dtype in (("image", studies, np.float32), ("label", final, np.uint8)):
            arr = np.asarray(Image.open(datalist.parent / case[key])).astype(dtype).T  # MONAI's PNG orientation
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(folder / f"{stem}.nii.gz"))
        ids.append(stem)
    return ids


def _own_inference(bundle: Path, image: Path, tmp_path: Path, tag: str) -> np.ndarray:
    from monai.transforms import LoadImage

    in_dir = tmp_path / f"in_{tag}"
    in_dir.mkdir()
    shutil.copy(image, in_dir / image.name)
    run_bundle(bundle, ["inference.json"], {"input_dir": str(in_dir), "output_dir": str(tmp_path / f"own_{tag}")})
    return np.asarray(LoadImage(image_only=True)(str(tmp_path / f"own_{tag}" / f"{image.stem}_seg.nii.gz")))


def _served(port: int, name: str, image: Path, tmp_path: Path, log: Path) -> np.ndarray:
    from monai.transforms import LoadImage

    try:
        label_bytes, label_name = _post_file(f"http://127.0.0.1:{port}/infer/{name}?output=image", image)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-6000:]}") from exc
    assert label_name.endswith(".png"), f"MONAI Label answers a PNG input with a PNG label, got {label_name}"
    got_path = tmp_path / f"served_{uuid.uuid4().hex}.png"
    got_path.write_bytes(label_bytes)
    return np.asarray(LoadImage(image_only=True)(str(got_path)))


def test_monailabel_serves_and_trains_the_exported_bundle(monailabel_python, exported_bundle, demo_datalist, tmp_path):
    """The bundle ``tsdk export`` wrote, used as it is: MONAI Label infers what the bundle infers, refuses a corrupt
    upload with a clear HTTP error and keeps serving, trains it for one epoch on labelled studies, then infers with
    the new weights."""
    name = exported_bundle.name
    bundle = tmp_path / "app" / "model" / name
    shutil.copytree(exported_bundle, bundle)  # no config edits
    sample_app = VENV / "monailabel" / "sample-apps" / "monaibundle"
    assert sample_app.is_dir(), f"MONAI Label's monaibundle sample app not found at {sample_app}"
    shutil.copytree(sample_app, tmp_path / "app", dirs_exist_ok=True)
    studies = tmp_path / "studies"
    studies.mkdir()
    _labelled_studies(demo_datalist, studies, 4)
    image = demo_datalist.parent / json.loads(demo_datalist.read_text())["test"][0]["image"]
    expected = _own_inference(bundle, image, tmp_path, "before")

    port = _free_port()
    log_path = tmp_path / "monailabel.log"
    log = log_path.open("w")
    env = dict(os.environ, PYTHONWARNINGS="ignore", MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
    server = subprocess.Popen(
        [str(monailabel_python), "-m", "monailabel.main", "start_server", "--app", str(tmp_path / "app"),
         "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
         "--conf", "models", name, "--conf", "zoo_source", "github", "--conf", "sam2", "false"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), start_new_session=True,
    )
    try:
        info = None
        deadline = time.time() + 300
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=10) as r:
                    info = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        assert info is not None, f"MONAI Label did not start:\n{log_path.read_text()[-5000:]}"
        assert name in info["models"] and name in info["trainers"], (info["models"], info.get("trainers"))
        channel_def = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
        assert info["models"][name]["labels"] == {v: int(k) for k, v in channel_def.items() if k != "0"}

        # 1. the label MONAI Label returns equals the bundle's own output
        got = _served(port, name, image, tmp_path, log_path)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        np.testing.assert_array_equal(got, expected)
        assert expected.any(), "the trained student found no foreground at all: the comparison would be vacuous"

        # 2. a corrupt upload: a clear HTTP error, and the server goes on serving
        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(image.read_bytes()[:200])
        with pytest.raises(urllib.error.HTTPError) as err:
            _post_file(f"http://127.0.0.1:{port}/infer/{name}?output=image", corrupt)
        assert err.value.code >= 400
        detail = err.value.read().decode(errors="replace")
        # MONAI Label answers an exception of the infer task with 500 and logs it; ours names the problem (the file
        # is MONAI Label's temporary copy of the upload, so its name is not the client's)
        named = re.compile(r"TSDKInputError: \S+\.png: cannot read image \(OSError: image file is truncated\)")
        deadline = time.time() + 30  # the server writes the traceback to its log after it answered
        while not named.search(log_path.read_text()) and time.time() < deadline:
            time.sleep(0.5)
        assert named.search(log_path.read_text()), detail[-2000:] + log_path.read_text()[-3000:]
        np.testing.assert_array_equal(_served(port, name, image, tmp_path, log_path), expected)

        # 3. one epoch of training through MONAI Label's /train on the bundle's train.json, from models/model.pt
        before = (bundle / "models" / "model.pt").read_bytes()
        params = json.dumps({"max_epochs": 1, "val_split": 0.25, "device": "cpu", "multi_gpu": False}).encode()
        try:
            _post(f"http://127.0.0.1:{port}/train/{name}?run_sync=true", params, "application/json")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-8000:]}") from exc
        after = (bundle / "models" / "model.pt").read_bytes()
        assert after != before, f"training wrote no new model.pt:\n{log_path.read_text()[-6000:]}"
        import torch

        torch.load(bundle / "models" / "model.pt", weights_only=True)  # still a plain, safe state dict
        # 4. inference with the new weights: MONAI Label's label equals the bundle's own inference with them
        retrained = _own_inference(bundle, image, tmp_path, "after")
        np.testing.assert_array_equal(_served(port, name, image, tmp_path, log_path), retrained)
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()
