"""Small helpers shared by the package: atomic file writes and the package's error type."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TSDKInputError", "atomic_write_bytes", "atomic_write_json", "atomic_copy", "dumps_json", "read_state_dict"]


class TSDKInputError(ValueError):
    """Bad user input: a message that names the file and the problem, meant to be shown as it is."""


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def dumps_json(obj: Any) -> str:
    """The one JSON text form the package writes: sorted keys, 2-space indent, trailing newline (stable bytes)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, dumps_json(obj).encode("utf-8"))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file and a rename."""
    dst = Path(dst)
    fd, tmp = _atomic_target(dst)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst



def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """Read a state dict from ``path`` the safe way and name the file in every error.

    ``.safetensors`` files are read with safetensors, anything else with ``torch.load(..., weights_only=True)``
    (a pickle-bearing file is refused). A state dict wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``
    (MONAI's ``CheckpointSaver``) is unwrapped.

    Raises:
        TSDKInputError: the file is missing or unreadable, or holds no state dict.
    """
    from collections.abc import Mapping

    import torch

    path = Path(path)
    if not path.is_file():
        raise TSDKInputError(f"{path}: {what} file not found")
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip/safetensors errors of many types: the user needs the file and the reason
        raise TSDKInputError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise TSDKInputError(f"{path}: {what} is not a state dict (got {type(state).__name__})")
    return {str(k): v for k, v in state.items()}
