"""How a stage's ``python -m monai.bundle ...`` command runs: in a child of a warm forkserver, or as a new process.

- ``"fork"`` (default on POSIX machines without CUDA): :mod:`multiprocessing`'s forkserver, started once with torch,
  MONAI and the package imported (:data:`PRELOAD`), forks one child per stage, which runs the bundle command exactly as
  ``python -m`` would, minus the ~10 s of imports. The forkserver never runs a tensor operation, so every child starts
  with fresh thread pools. A child whose preloaded package is stale (its source files changed since the forkserver
  imported them) replaces itself with a fresh interpreter (``os.execv``) running the same command.
- ``"subprocess"``: a new Python process per stage (``python -m tsdk_monai.driver.launch ERROR_FILE -- monai.bundle
  ...``), the default with CUDA (a forked child must not inherit an initialised CUDA context).

Both run :func:`child_main`: stdout and stderr go to the stage's log, and a bad-input error
(:class:`~tsdk_monai.utils.TSDKInputError`) is written to ``ERROR_FILE`` as JSON, so the driver receives it as a
typed error instead of reading the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PRELOAD", "default_launch", "launch", "child_main", "read_error"]


def _source_stamp() -> tuple[int, int]:
    """(count, newest modification time) of the package's source files."""
    files = list(Path(__file__).resolve().parents[1].rglob("*.py"))
    return len(files), max((f.stat().st_mtime_ns for f in files), default=0)


_IMPORTED = _source_stamp()  # in the forkserver: taken before the rest of the package is preloaded

#: imported once by the forkserver (this module first, so its stamp precedes the package's other modules)
PRELOAD = ["tsdk_monai.driver.launch", "torch", "monai", "monai.bundle.scripts", "tsdk_monai.data",
           "tsdk_monai.networks", "tsdk_monai.engines", "tsdk_monai.transforms", "tsdk_monai.handlers",
           "tsdk_monai.losses", "tsdk_monai.inferers", "tsdk_monai.ssl"]

_ENV = {"PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def default_launch() -> str:
    """``TSDK_STAGE_LAUNCH`` (``fork`` or ``subprocess``) if set, else ``fork`` on POSIX machines without CUDA."""
    mode = os.environ.get("TSDK_STAGE_LAUNCH", "auto")
    if mode in ("fork", "subprocess"):
        return mode
    return "fork" if hasattr(os, "fork") and not Path("/dev/nvidiactl").exists() else "subprocess"


def _watch_parent() -> None:
    """End this process when its parent goes (the forkserver exits with the driver): a stage never outlives it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(143)

    threading.Thread(target=watch, name="tsdk-parent-watch", daemon=True).start()


def child_main(argv: Sequence[str], log: str | None, error_file: str, forked: bool = False) -> None:
    """Run ``python -m argv...`` in this process (output appended to ``log`` when given), as the command line would;
    a :class:`TSDKInputError` behind the failure is written to ``error_file``. Exits with the command's status."""
    import runpy
    import warnings

    from tsdk_monai.utils import atomic_write_json, input_error_of, report_uncaught

    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    os.environ.update(_ENV)
    if forked:
        if _source_stamp() != _IMPORTED:  # the package changed since the forkserver imported it: a fresh interpreter
            os.execv(sys.executable, [sys.executable, "-m", __name__, error_file, "--", *argv])
        _watch_parent()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    warnings.simplefilter("ignore")
    sys.argv = list(argv)
    code: Any = 0
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:
        err = input_error_of(exc)
        if err is not None:
            atomic_write_json(error_file, {"type": type(err).__name__, "message": str(err)})
        report_uncaught(exc)  # as `python -m` prints it; bad input as one line
        code = 1
    finally:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def _context():
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a stage runs, SIGTERM to the driver (``kill``, ``pkill -f bench/...``) raises SystemExit(143) like Ctrl-C
    raises KeyboardInterrupt, so :func:`launch` takes the stage down before the driver goes; by default SIGTERM ends
    the driver at once and the stage's process trained on alone. Only the main thread may set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def launch(cmd: Sequence[str], log: Path, error_file: Path, mode: str) -> int:
    """Run ``cmd`` (``[python, "-m", module, args...]``) as a stage: its output appended to ``log``; returns its exit
    status (negative: killed by that signal). A bad-input error lands in ``error_file`` (:func:`read_error`). A
    SIGTERM or Ctrl-C to the driver ends the stage too (its marker stays ``running``: the next run resumes it)."""
    argv = list(cmd[2:])
    if mode == "fork":
        proc = _context().Process(target=child_main, args=(argv, str(log), str(error_file), True), name=log.stem)
        with _sigterm_unwinds():
            proc.start()
            try:
                proc.join()
            finally:
                if proc.is_alive():  # the driver is being interrupted: take the stage down with it
                    proc.terminate()
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
                        proc.join()
        return int(proc.exitcode)
    import subprocess

    child = [cmd[0], "-m", __name__, str(error_file), "--", *argv]
    with log.open("a") as f, _sigterm_unwinds():  # subprocess.run kills the child when interrupted
        return subprocess.run(child, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **_ENV)).returncode


def read_error(error_file: Path) -> dict[str, str] | None:
    """The bad-input error a stage's child wrote (``{"type", "message"}``), or None."""
    try:
        return json.loads(Path(error_file).read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":  # python -m tsdk_monai.driver.launch ERROR_FILE -- MODULE ARGS...
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit("usage: python -m tsdk_monai.driver.launch ERROR_FILE -- MODULE [ARGS...]")
    child_main(sys.argv[3:], None, sys.argv[1])
