"""Ablation: rerun one method of a finished table from its distillation (or pre-training) stage on, with overrides.

The upstream stages of the table (the teacher, the synthesis) are reused as they are, so an ablation of the
distillation or of the fine-tuning costs minutes, not the teacher's half hour. The stages' commands are read from the
table's stage records (``WORK/logs/*.stage.json``) and run with this checkout's bundles and package; their outputs go to
``OUT``; only the table's teacher cache is shared (the same teacher's targets, keyed by image and teacher files: its
entries are reused, and an image it lacks is added to it). The validation Dice (the fine-tuned student's, with its
validation-chosen post-processing) decides; the test Dice is printed beside it for the record only.

    python bench/ablate.py WORK --method tskd_no_synth --n-labeled 20 --out WORK/ablations/conf07 \\
        --distill '{"kd#confidence": 0.7}'
    python bench/ablate.py WORK --method scratch --out WORK/ablations/scratch_lr --student '{"learning_rate": 3e-4}'
    python bench/ablate.py WORK --method tskd --seeds 0,1,2 --from finetune --out WORK/ablations/ft3  # 3 fine-tune seeds

``--seeds``: the fine-tuning (and, unless ``--from finetune``, the distillation) reruns once per seed; mean ± std.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the stage kinds of a student method, in order; the first that exists for a method is where a rerun starts
FIRST = ("distill", "pretrain")


def _record(work: Path, name: str) -> dict:
    f = work / "logs" / f"{name}.stage.json"
    if not f.is_file():
        raise SystemExit(f"{f}: no such stage record (is {work} a finished table, with this method and n?)")
    rec = json.loads(f.read_text())
    if rec.get("state") != "done":
        raise SystemExit(f"{f}: stage is {rec.get('state')!r}, not done")
    return rec


def _arg(cmd: list[str], key: str) -> str | None:
    return cmd[cmd.index(key) + 1] if key in cmd else None


def _set(cmd: list[str], key: str, value: str) -> None:
    if key in cmd:
        cmd[cmd.index(key) + 1] = value
    else:
        cmd += [key, value]


def _rebase(cmd: list[str], old_bundles: str, method_dirs: dict[str, Path], dest: Path) -> list[str]:
    """The stage's command with this checkout's bundles, this interpreter and the method's folders of the table
    (``method_dirs``: kind -> folder) moved to ``dest/kind``."""
    cmd = [sys.executable] + [c.replace(old_bundles, str(REPO / "bundles")) for c in cmd[1:]]
    for i, c in enumerate(cmd):
        for kind, d in method_dirs.items():
            if c == str(d) or c.startswith(str(d) + os.sep):
                cmd[i] = str(dest / kind / Path(c).relative_to(d))
    return cmd


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="a finished bench table's folder")
    ap.add_argument("--method", default="tskd_no_synth")
    ap.add_argument("--n-labeled", type=int, default=20)
    ap.add_argument("--table-seed", type=int, default=0, help="the table run whose stages are reused")
    ap.add_argument("--seeds", default=None, help="comma-separated bundle seeds (default: the table's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--from", dest="start", choices=["first", "finetune"], default="first",
                    help="rerun from the method's distillation / pre-training stage (default) or its fine-tuning")
    ap.add_argument("--distill", type=json.loads, default={}, help="overrides of the distillation or pre-training stage")
    ap.add_argument("--student", type=json.loads, default={}, help="overrides of the fine-tuning (and evaluation)")
    args = ap.parse_args(argv)
    work, out = args.work.absolute(), args.out.absolute()
    s, n, m = args.table_seed, args.n_labeled, args.method
    run = json.loads((work / "run.json").read_text()) if (work / "run.json").is_file() else {}
    labelled, shared = work / f"seed{s}" / f"n{n}", work / f"seed{s}" / "shared"
    method_dirs = {"labelled": labelled / m, "shared": shared / m}
    names = []
    if args.start == "first":
        names += [x for kind in FIRST for x in (f"s{s}_n{n}_{m}_{kind}", f"s{s}_{m}_{kind}")
                  if (work / "logs" / f"{x}.stage.json").is_file()][:1]
    first = names[0] if names else None
    names += [f"s{s}_n{n}_{m}_finetune", f"s{s}_n{n}_{m}_evaluate"]
    if args.start == "finetune":
        # only the fine-tuning's folders move: it starts from the table's distilled / pre-trained student
        method_dirs = {"models": labelled / m / "models", "eval": labelled / m / "eval"}
    records = [(_record(work, x), args.distill if x == first else args.student) for x in names]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"ablation of {m} (n {n}) of {work} ({run.get('dir', '')}): stages {', '.join(names)}", flush=True)
    rows = []
    for seed in seeds:
        dest = out / (f"seed{seed}" if seed is not None else "run")
        dest.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        for (rec, over), name in zip(records, names):
            old_bundles = str(Path(_arg(rec["command"], "--bundle_root")).parent)
            cmd = _rebase(list(rec["command"]), old_bundles, method_dirs, dest)
            if seed is not None:
                _set(cmd, "--seed", str(seed))
            for k, v in over.items():
                _set(cmd, f"--{k}", v if isinstance(v, str) else json.dumps(v))
            log = dest / f"{name}.log"
            with open(log, "w") as fh:
                proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if proc.returncode:
                raise SystemExit(f"{name} failed (exit {proc.returncode}); log: {log}")
        test = json.loads((Path(_arg(cmd, "--output_dir")) / "metrics.json").read_text())
        post = json.loads((Path(_arg(cmd, "--ckpt_dir")) / "postprocess.json").read_text())
        chosen = post.get("postprocess", max(post["validation_dice"], key=post["validation_dice"].get))
        rows.append({"seed": seed, "val_dice": post["validation_dice"][chosen], "postprocess": chosen,
                     "test_dice": test["mean"]["test_mean_dice"], "test_hd95": test["mean"]["test_hd95"],
                     "per_class": test.get("per_class_mean", {}), "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        for k in ("val_dice", "test_dice", "test_hd95"):
            vals = [r[k] for r in rows]
            print(f"{k}: {statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f} (n={len(vals)})")
    (out / "ablation.json").write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "rows": rows},
                                                  indent=2))
    return rows


if __name__ == "__main__":
    main()
