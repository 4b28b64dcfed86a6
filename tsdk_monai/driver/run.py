"""``tsdk run`` and ``tsdk demo``: plan every (seed, n_labeled) run, run its stages in order, measure the networks,
then write the report (which only reads what the stages wrote)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from tsdk_monai.layout import RunDirs, RunLayout
from tsdk_monai.driver.methods import METHODS, Schedule, method_stages, overlay_stages
from tsdk_monai.driver.stages import Stage, StageRunner
from tsdk_monai.utils import TSDKInputError, atomic_write_json

__all__ = ["RunPlan", "plan_runs", "measure_networks", "run_methods", "run_demo"]


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


def _overlay_datalist(split: Path, k: int) -> Path:
    """``overlay_datalist.json`` beside the split's datalist: its test split cut to ``k`` evenly spaced cases."""
    raw = json.loads(Path(split).read_text())
    test = raw.get("test", [])
    if not test:
        raise TSDKInputError(f"{split}: no test cases for the overlay figure")
    idx = sorted({round(i * (len(test) - 1) / max(1, k - 1)) for i in range(min(k, len(test)))})
    out = dict(raw, test=[test[i] for i in idx], description=f"{len(idx)} test cases of {split} for the report figures")
    return atomic_write_json(Path(split).parent / "overlay_datalist.json", out)


@dataclass
class RunPlan:
    """The stages of every (seed, n_labeled) run, in order and each once (the overlay predictions last), and the
    manifest ``W/run.json``."""

    layout: RunLayout
    stages: list[Stage]
    manifest: dict[str, Any]


def plan_runs(datalist: Path, workdir: Path, methods: Sequence[str] | str, schedule: Schedule, n_labeled: Any = None,
              seeds: Any = 0, overlay_cases: int = 3) -> RunPlan:
    """Write the few-label split of each (seed, n) and list the stages of every method (shared ones once), then the
    inference stages of the overlay figure (``overlay_cases`` test cases of the first seed and the fewest labels).

    ``n_labeled`` (default: the whole labelled pool) and ``seeds`` are an int, a list or a comma-separated string.
    """
    from tsdk_monai.data import labelled_pool_size, num_classes_of, subset_datalist

    datalist, layout = Path(datalist).absolute(), RunLayout(workdir)
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
            key = layout.key(seed, n)
            split = subset_datalist(datalist, layout.split(seed, n), n, seed)
            dirs = layout.run(seed, n)
            stages = method_stages(split, dirs, schedule, pool_datalist=datalist, seed=seed,
                                   prefix=layout.prefix(seed, n), shared_prefix=layout.prefix(seed),
                                   epoch_scale=schedule.epoch_scale(n))
            runs[key] = {"seed": seed, "n_labeled": n, "datalist": str(split), "dir": str(dirs.labelled),
                         "shared": str(dirs.shared)}
            for m in ms:
                per_method[m][key] = [st.name for st in stages[m]]
                for st in stages[m]:
                    if st.name in names:
                        if names[st.name].command() != st.command():
                            raise AssertionError(f"two different stages named {st.name}")
                        continue
                    names[st.name] = st
                    ordered.append(st)
    seed, n = seed_list[0], min(ns)
    figure = _overlay_datalist(Path(runs[layout.key(seed, n)]["datalist"]), overlay_cases)
    num_classes = num_classes_of(datalist)
    overlays = overlay_stages(layout.run(seed, n), ms, schedule, num_classes, figure, prefix=layout.prefix(seed, n))
    ordered += list(overlays.values())
    manifest = {
        "datalist": str(datalist), "methods": ms, "n_labeled": ns, "seeds": seed_list, "sizes": asdict(schedule),
        "num_classes": num_classes, "runs": runs, "stages": per_method,
        "overlay": {"key": layout.key(seed, n), "datalist": str(figure),
                    "dirs": {m: str(st.outputs[0]) for m, st in overlays.items()}},
    }
    return RunPlan(layout, ordered, manifest)


def _time_interleaved(nets: dict[str, tuple[Any, Sequence[int]]], repeats: int) -> dict[str, float]:
    """Median ms of one forward per network; the networks take turns, so a change of machine load hits them alike."""
    import torch

    inputs = {k: torch.rand(*shape) for k, (_, shape) in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        for k, (net, _) in nets.items():
            net(inputs[k])  # warm-up
        for _ in range(repeats):
            for k, (net, _) in nets.items():
                t0 = time.perf_counter()
                net(inputs[k])
                times[k].append(time.perf_counter() - t0)
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}


def measure_networks(manifest: dict[str, Any], repeats: int = 5) -> dict[str, Any]:
    """Parameters and CPU inference ms per image (batch 1, at the run's input size) of the student and the teacher,
    measured in this process in turns (the same machine, the same load): ``W/networks.json``."""
    import torch

    from tsdk_monai.networks import build_student, load_teacher

    sizes = manifest["sizes"]
    nets: dict[str, tuple[Any, Sequence[int]]] = {}
    if any(m != "teacher" for m in manifest["methods"]):
        net = build_student(sizes["student"], in_channels=1, num_classes=manifest["num_classes"],
                            img_size=sizes["student_size"]).eval()
        nets["student"] = (net, (1, 1, sizes["student_size"], sizes["student_size"]))
    if "teacher" in manifest["methods"]:
        for run in manifest["runs"].values():
            tdir = RunDirs.of(run).teacher_models
            if (tdir / "model.pt").is_file():
                nets["teacher"] = (load_teacher(tdir, merged=True).eval(),
                                   (1, 1, sizes["teacher_size"], sizes["teacher_size"]))
                break
    ms = _time_interleaved(nets, repeats) if nets else {}
    out: dict[str, Any] = {
        k: {"name": sizes["student"] if k == "student" else "teacher", "params": sum(p.numel() for p in net.parameters()),
            "ms": ms[k], "size": shape[-1]}
        for k, (net, shape) in nets.items()
    }
    out["threads"] = {"torch_threads": torch.get_num_threads(), "repeats": repeats}
    return out


def run_methods(datalist: Path, workdir: Path, methods: Sequence[str] | str, schedule: Schedule, n_labeled: Any = None,
                seeds: Any = 0, report: bool = True, runner: StageRunner | None = None) -> str:
    """Run every stage of ``methods`` for each (seed, n_labeled) (skipping finished ones), measure the networks and
    write the report. Returns the report's table (Markdown), also in ``W/report.md``."""
    plan = plan_runs(datalist, workdir, methods, schedule, n_labeled, seeds)
    layout = plan.layout
    atomic_write_json(layout.manifest, plan.manifest)
    runner = runner or StageRunner(layout.root)
    t0 = time.time()
    total = len(plan.stages)
    for i, st in enumerate(plan.stages, 1):
        runner.run(st, progress=f"({i}/{total})")
    print(f"[stages] {len(runner.ran)} ran, {len(runner.resumed)} of them resumed, {len(runner.skipped)} skipped, "
          f"in {time.time() - t0:.0f} s", flush=True)
    if not report:
        return ""
    atomic_write_json(layout.networks, measure_networks(plan.manifest))
    from tsdk_monai.report import write_report

    return write_report(layout.root, print_table=False)


def run_demo(workdir: Path, methods: Sequence[str] = METHODS, schedule: Schedule | None = None) -> str:
    """Write the demo data, run every method's stages, print and return the comparison table."""
    from tsdk_monai.data import write_demo_data

    workdir = Path(workdir)
    schedule = schedule or Schedule()
    datalist = write_demo_data(workdir / "data", n=48, size=schedule.student_size, n_labeled=8)
    t0 = time.time()
    table = run_methods(datalist, workdir, methods, schedule)
    print()
    print(table)
    print(f"\nall stages and the report: {time.time() - t0:.0f} s. This is a CPU demo on "
          f"{len(json.loads(datalist.read_text())['training'])} labelled phantoms with minutes-long schedules: it shows "
          "the pipeline working end to end, not the method at full strength; for that, run `tsdk run --datalist "
          f"DATA/datalist.json --workdir W` on real data. Report and plots: {workdir / 'report.md'}")
    return table
