"""Small helpers shared by the package: the package's error type and how an uncaught one is printed, atomic file writes,
the one safe weight reader, saver and strict loader, and the data-parallel plumbing (unwrapping, process group)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "TSDKInputError", "input_error_of", "report_uncaught", "install_excepthook", "load_error", "atomic_write_bytes", "atomic_write_json",
    "atomic_copy", "replacing", "dumps_json", "read_json", "read_checkpoint", "read_state_dict", "save_state_dict", "check_state_dict", "load_state_dict_strict", "unwrap",
    "distributed_device", "rank_of", "file_sha256",
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
    if isinstance(exc, pickle.UnpicklingError):  # raised by weights_only=True for anything but plain tensors and data
        # shown: the unpickler's reason (torch's advice to retry unsafely around it is not passed on)
        why = next((ln.split("error:", 1)[1].split(". ")[0].strip() for ln in lines if "error:" in ln),
                   "it holds more than plain tensors")
        return TSDKInputError(
            f"{path}: refused: the {what} needs pickle to load ({why}); tsdk loads only plain tensors "
            "(torch.load weights_only=True) because unpickling a file can run code"
        )
    return TSDKInputError(f"{path}: cannot read {what} ({type(exc).__name__}: {lines[0] if lines else ''})")


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


def report_uncaught(exc: BaseException, previous: Any = None) -> None:
    """Print an uncaught exception as ``python`` would (``previous``: the excepthook to print with, default the
    interpreter's), except that a :class:`TSDKInputError` behind it (also one wrapped by MONAI/ignite) is one line,
    ``tsdk: error: MSG``, without the traceback unless ``TSDK_TRACEBACK`` is set."""
    err = input_error_of(exc)
    if err is None or os.environ.get("TSDK_TRACEBACK"):
        (previous or sys.__excepthook__)(type(exc), exc, exc.__traceback__)
    if err is not None:
        print(f"tsdk: error: {err}", file=sys.stderr, flush=True)
    _join_pool_threads()


def install_excepthook() -> None:
    """Make :func:`report_uncaught` the interpreter's excepthook (once; the previous hook prints other exceptions).

    Every tsdk bundle calls it first in its ``initialize`` list, so ``python -m monai.bundle run`` on a tsdk bundle ends
    a bad-input run with one line naming the file and the problem instead of a traceback through MONAI's config
    resolver. Importing the package changes nothing. The exit status stays 1.
    """
    previous = sys.excepthook
    if getattr(previous, "_tsdk", False):
        return

    def hook(exc_type, exc, tb) -> None:
        report_uncaught(exc, previous)

    hook._tsdk = True  # type: ignore[attr-defined]
    sys.excepthook = hook


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Write a file through a temporary name: yields an empty temporary file ``.NAME.XXXXXXXX<suffix>`` beside
    ``path``; when the block ends, the file is flushed to disk and renamed over ``path``; when the block raises (or
    the rename fails), it is removed. A crash leaves either the old ``path`` or the new one, never a half-written one.

    The temporary file is created with mode 0666 for the kernel to apply the process's umask (usually 0644), as
    ``open()`` would, not ``mkstemp``'s 0600: renamed into place, a report or an exported bundle stays readable by the
    other users of a shared machine.

        with replacing(out / "model.onnx", suffix=".onnx") as tmp:
            torch.onnx.export(net, args, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file, flushed to disk and renamed (:func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def dumps_json(obj: Any) -> str:
    """The one JSON text form the package writes: sorted keys, 2-space indent, trailing newline (stable bytes)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def read_json(path: str | os.PathLike, missing: str, invalid: str) -> Any:
    """The JSON document in ``path``, or a :class:`TSDKInputError` ``"PATH: MISSING"`` when the file is not there and
    ``"PATH: INVALID (reason)"`` when it is not valid JSON (UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise TSDKInputError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TSDKInputError(f"{path}: {invalid} ({exc})") from exc


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, dumps_json(obj).encode("utf-8"))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file, flushed to disk and renamed (:func:`replacing`)."""
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (safetensors for ``*.safetensors``), with errors
    that name the file: missing, refused because it needs pickle to load (unpickling can run code), or not a complete
    file (a truncated save, or not a ``torch.save`` file at all).

    Raises:
        TSDKInputError: as above.
    """
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise TSDKInputError(f"{path}: {what} file not found")
    safetensors = path.name.endswith(".safetensors")
    if not safetensors and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise TSDKInputError(f"{path}: not a complete {what} file (a save cut short, or not written by torch.save)")
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling (refused), zip, safetensors and storage errors of many types
        raise load_error(path, what, exc) from exc


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """A state dict from ``path`` (:func:`read_checkpoint`); one wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``
    (MONAI's ``CheckpointSaver``) is unwrapped, and a ``module.`` prefix (saved from ``DistributedDataParallel``) is
    removed.

    Raises:
        TSDKInputError: the file is missing or unreadable, or holds no state dict.
    """
    from collections.abc import Mapping

    state = read_checkpoint(path, what)
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise TSDKInputError(f"{path}: {what} is not a state dict (got {type(state).__name__})")
    return {(str(k)[7:] if str(k).startswith("module.") else str(k)): v for k, v in state.items()}


def save_state_dict(module: Any, path: str | os.PathLike, what: str | None = None) -> Path:
    """Save a module's plain state dict (``DistributedDataParallel`` unwrapped, tensors on the CPU), or a dict of
    tensors as it is, with ``torch.save`` to a temporary file renamed to ``path`` (:func:`atomic_write_bytes`);
    ``what`` (e.g. ``"the distilled student"``) logs ``saved WHAT to PATH``.

    The file loads with ``torch.load(path, weights_only=True)``.
    """
    import io
    import logging

    import torch

    state = unwrap(module).state_dict() if isinstance(module, torch.nn.Module) else module
    buf = io.BytesIO()
    torch.save({k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}, buf)
    out = atomic_write_bytes(path, buf.getvalue())
    if what:
        logging.getLogger("tsdk_monai").info("saved %s to %s", what, out)
    return out


def check_state_dict(module: Any, state: Any, source: str | os.PathLike, what: str = "the") -> None:
    """Raise a :class:`TSDKInputError` naming ``source`` and the first differing keys unless ``state`` has exactly the
    names and shapes of ``module``'s state dict (``module`` unwrapped)."""
    inner = unwrap(module)
    own = inner.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"] if unexpected else []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise TSDKInputError(f"{source}: {what} weights do not fit {type(inner).__name__}: " + "; ".join(parts))


def load_state_dict_strict(module: Any, state: Any, source: str | os.PathLike, what: str = "the") -> Any:
    """``module.load_state_dict(state, strict=True)`` (``module`` unwrapped) after :func:`check_state_dict`, so a
    mismatch names ``source``; returns ``module``."""
    check_state_dict(module, state, source, what)
    unwrap(module).load_state_dict(state, strict=True)
    return module


def unwrap(module: Any) -> Any:
    """The module inside ``DataParallel``/``DistributedDataParallel`` (or the module itself)."""
    from torch import nn

    return module.module if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else module


def distributed_device(backend: str | None = None) -> Any:
    """Join the process group of a ``torchrun`` launch (once) and return this process's device.

    The one set-up of every bundle's ``multi_gpu_train.json`` (``"device": "$tsdk_monai.utils.distributed_device()"``):
    everything that uses the device (the network, its ``DistributedDataParallel`` wrapper, the data samplers) comes
    after the process group, and ignite's distributed context is synced on every rank. Backend default: ``nccl`` with CUDA, ``gloo`` on the CPU; the device is
    ``cuda:LOCAL_RANK`` with CUDA, else the CPU.
    """
    import torch
    import torch.distributed as dist

    import ignite.distributed as idist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    # ignite builds its view of the group (a collective new_group) on its first idist call; make that call here on
    # every rank, or a handler created on rank 0 only (a CheckpointSaver's DiskSaver) waits for the others forever
    idist.sync()
    if not cuda:
        return torch.device("cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.cuda.set_device(device)
    return device


def rank_of(device: Any = None) -> int:
    """This process's rank in the process group (0 without one). ``device`` (e.g. ``@device`` in a config) is only
    there to order the call after :func:`distributed_device`."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
