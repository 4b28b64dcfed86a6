"""The student bundle served by a real MONAI Label 0.8.5 server on 127.0.0.1 (its own virtual environment)."""

from __future__ import annotations

import json
import os
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

from helpers import BUNDLES, REPO, run_bundle

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


def test_monailabel_serves_the_student_bundle(monailabel_python, demo_datalist, tmp_path):
    # 1. a trained student bundle, as a clinician would import it
    bundle = tmp_path / "app" / "model" / "tsdk_student"
    shutil.copytree(BUNDLES / "tsdk_student", bundle, ignore=shutil.ignore_patterns("models", "eval"))
    run_bundle("tsdk_student", ["train.json"], {
        "dataset_dir": str(demo_datalist.parent), "ckpt_dir": str(bundle / "models"), "output_dir": str(tmp_path / "eval"),
        "image_size": 64, "batch_size": 3, "train#trainer#max_epochs": 1})
    inf_cfg = bundle / "configs" / "inference.json"
    cfg = json.loads(inf_cfg.read_text())
    cfg["image_size"] = 64  # the size it was trained at
    inf_cfg.write_text(json.dumps(cfg, indent=4))
    sample_app = VENV / "monailabel" / "sample-apps" / "monaibundle"
    assert sample_app.is_dir(), f"MONAI Label's monaibundle sample app not found at {sample_app}"
    shutil.copytree(sample_app, tmp_path / "app", dirs_exist_ok=True)
    studies = tmp_path / "studies"
    studies.mkdir()
    image = Path(json.loads(demo_datalist.read_text())["test"][0]["image"])
    image = demo_datalist.parent / image

    # 2. the bundle's own inference of that image
    own = tmp_path / "own"
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    shutil.copy(image, in_dir / image.name)
    run_bundle(bundle, ["inference.json"], {"input_dir": str(in_dir), "output_dir": str(own)})
    from monai.transforms import LoadImage

    expected = np.asarray(LoadImage(image_only=True)(str(own / f"{image.stem}_seg.nii.gz")))

    # 3. MONAI Label on loopback, offline
    port = _free_port()
    log = (tmp_path / "monailabel.log").open("w")
    env = dict(os.environ, PYTHONWARNINGS="ignore", MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
    server = subprocess.Popen(
        [str(monailabel_python), "-m", "monailabel.main", "start_server", "--app", str(tmp_path / "app"),
         "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
         "--conf", "models", "tsdk_student", "--conf", "zoo_source", "github", "--conf", "sam2", "false"],
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
        assert info is not None, f"MONAI Label did not start:\n{(tmp_path / 'monailabel.log').read_text()[-5000:]}"
        assert "tsdk_student" in info["models"], info["models"]
        channel_def = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
        assert info["models"]["tsdk_student"]["labels"] == {v: int(k) for k, v in channel_def.items() if k != "0"}

        # 4. the label MONAI Label returns equals the bundle's own output
        try:
            label_bytes, label_name = _post_file(f"http://127.0.0.1:{port}/infer/tsdk_student?output=image", image)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{exc}\n{(tmp_path / 'monailabel.log').read_text()[-6000:]}") from exc
        assert label_name.endswith(".png"), f"MONAI Label answers a PNG input with a PNG label, got {label_name}"
        got_path = tmp_path / "monailabel_label.png"
        got_path.write_bytes(label_bytes)
        got = np.asarray(LoadImage(image_only=True)(str(got_path)))
        assert got.shape == expected.shape, (got.shape, expected.shape)
        np.testing.assert_array_equal(got, expected)
        assert expected.any(), "the trained student found no foreground at all: the comparison would be vacuous"
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()
