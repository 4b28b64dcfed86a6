"""Helpers every bundle test uses: offline metadata verification and ``python -m monai.bundle run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SHARED = REPO.parent / "shared"
SCHEMA = SHARED / "monai" / "meta_schema_20240725.json"
HC18 = SHARED / "data" / "hc18"
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    return env


def verify_metadata(bundle: str | Path, tmp_path: Path) -> None:
    """``python -m monai.bundle verify_metadata`` against the shared schema (offline); the URL only without it."""
    bundle = BUNDLES / bundle if isinstance(bundle, str) else bundle
    meta = bundle / "configs" / "metadata.json"
    schema = SCHEMA if SCHEMA.is_file() else tmp_path / "meta_schema_20240725.json"  # absent: MONAI downloads it
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta), "--filepath", str(schema)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "metadata is verified with no error" in out, out[-4000:]
    # the schema key must name the schema file we verified against
    assert json.loads(meta.read_text())["schema"].endswith(SCHEMA.name)


def _arg(value: Any) -> str:
    """A command-line value for ``monai.bundle`` (fire parses Python literals: ``False``, not JSON's ``false``)."""
    from tsdk_monai.driver import bundle_arg

    return bundle_arg(value)


def run_bundle(
    bundle: str | Path,
    configs: Sequence[str],
    overrides: dict[str, Any] | None = None,
    workflow: str = "run",
    check: bool = True,
    timeout: float = 900,
    launcher: Sequence[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <workflow>`` on ``bundles/<bundle>/configs/<configs...>`` with ``--key value``.

    ``launcher`` replaces ``python -m`` (for ``torchrun --nproc_per_node=2 -m``). Raises with the log tail on failure.
    """
    bundle = BUNDLES / bundle if isinstance(bundle, str) else bundle
    cfg = [str(bundle / "configs" / c) for c in configs]
    cmd = list(launcher or [sys.executable, "-m"]) + [
        "monai.bundle", workflow,
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--config_file", json.dumps(cfg) if len(cfg) > 1 else cfg[0],
        "--logging_file", str(bundle / "configs" / "logging.conf"),
        "--bundle_root", str(bundle),
    ]
    for k, v in (overrides or {}).items():
        cmd += [f"--{k}", _arg(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="backslashreplace", env=_env(), timeout=timeout,
                          cwd=str(REPO))  # backslashreplace: file names need not be UTF-8
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc
