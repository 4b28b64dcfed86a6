"""Small helpers shared by the package: atomic file writes, safe weight reading, the package's error type and how an
uncaught one is printed."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "TSDKInputError", "input_error_of", "install_excepthook", "load_error", "atomic_write_bytes", "atomic_write_json",
    "atomic_copy", "dumps_json", "read_state_dict",
]


class TSDKInputError(ValueError):
    """Bad user input: a message that names the file and the problem, meant to be shown as it is."""


def input_error_of(exc: BaseException | None) -> TSDKInputError | None:
    """The :class:`TSDKInputError` behind ``exc``, following ``raise ... from`` causes and implicit contexts.

    MONAI wraps errors raised inside transforms (``applying transform ...``) and config expressions
    (``Failed to evaluate ...``); the user's problem is the innermost input error.
    """
    seen: set[int] = set()
    found = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TSDKInputError):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


def load_error(path: str | os.PathLike, what: str, exc: BaseException) -> TSDKInputError:
    """The error to raise when reading the weights file ``path`` failed with ``exc``: it names the file, and says so
    plainly when the file was refused because it needs pickle to load (``torch.load(..., weights_only=True)``)."""
    import pickle

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = lines[0] if lines else ""
    if isinstance(exc, pickle.UnpicklingError):  # torch's long advice to retry unsafely is not passed on
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        if "GLOBAL" in detail:
            return TSDKInputError(
                f"{path}: refused: the {what} needs pickle to load ({detail}); tsdk loads only plain tensors "
                "(torch.load weights_only=True) because unpickling a file can run code"
            )
    return TSDKInputError(f"{path}: cannot read {what} ({type(exc).__name__}: {detail})")


def _join_pool_threads(timeout: float = 10.0) -> None:
    """Let ``multiprocessing.pool.ThreadPool`` workers finish the task they are in before the interpreter exits.

    When a transform raises inside MONAI's ``CacheDataset``, its pool is terminated but its worker thread may still
    be running the next case in torch code; exiting under it aborts the process ("terminate called without an
    active exception", exit 134) instead of exiting with status 1.
    """
    import threading
    import time

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__name__ == "DummyProcess" and t.is_alive():
            t.join(max(0.0, deadline - time.monotonic()))


def install_excepthook() -> None:
    """Print an uncaught :class:`TSDKInputError` (also one wrapped by MONAI/ignite) as one line, ``tsdk: error: MSG``.

    Installed when ``tsdk_monai`` is imported, so ``python -m monai.bundle run`` on a tsdk bundle ends a bad-input
    run with that line instead of a traceback through MONAI's config resolver (set ``TSDK_TRACEBACK=1`` to get the
    traceback too). Other exceptions go to the previous hook unchanged; the exit status stays 1.
    """
    previous = sys.excepthook
    if getattr(previous, "_tsdk", False):
        return

    def hook(exc_type, exc, tb) -> None:
        err = input_error_of(exc)
        if err is None or os.environ.get("TSDK_TRACEBACK"):
            previous(exc_type, exc, tb)
        if err is not None:
            print(f"tsdk: error: {err}", file=sys.stderr, flush=True)
        _join_pool_threads()

    hook._tsdk = True  # type: ignore[attr-defined]
    sys.excepthook = hook


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
        raise load_error(path, what, exc) from exc
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise TSDKInputError(f"{path}: {what} is not a state dict (got {type(state).__name__})")
    return {str(k): v for k, v in state.items()}
