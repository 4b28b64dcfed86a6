"""1 vs 2 processes for one training stage (the tsdk_student bundle), measured in one run on this machine.

The same training (demo phantoms, ``--size`` pixels, ``--epochs`` epochs, a global batch of ``--batch_size``, no
validation) runs as ``python -m monai.bundle run`` with ``train.json`` (1 process, 1 thread) and as
``torchrun --nproc_per_node=2 -m monai.bundle run`` with ``train.json`` + ``multi_gpu_train.json`` (gloo, 1 thread
and half the batch per process: the same global batch), and once more as 1 process with ``--threads`` threads (the
same cores as the 2 processes). Two modes:

- ``deterministic``: no shuffling, no random augmentation, plain SGD. Rank r of 2 gets samples r, r+2, ... so each
  global step sees the same images as the 1-process step, and averaging the two ranks' gradients (DDP) gives the
  1-process gradient up to float rounding: the final weights must agree to rounding, which checks the DDP set-up end
  to end. (With the bundle's AdamW they do not: Adam's first steps are about ``lr * sign(gradient)``, and gradients
  that are zero up to rounding, e.g. of a convolution's bias before an instance norm, become +-lr steps.)
- ``default``: the bundle as shipped (shuffled, augmented). The 2-process run sees the data in another order
  (``DistributedSampler``), so its weights differ from the 1-process run's as another seed's would.

Columns: training time (ignite's "Engine run finished ... Time taken" of the trainer, so start-up and caching are excluded), the
speed-up of 2 processes, the last logged training loss, the largest absolute weight difference from the 1-process
run, and whether both ranks ended with identical weights (``RankWeightsSaver``).

    python bench/ddp_speedup.py                       # 128x128, 32 images, 3 epochs, global batch 8 (a few minutes)
    python bench/ddp_speedup.py --n 16 --size 64 --epochs 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "tsdk_student"


def _arg(v) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def run_stage(nproc: int, work: Path, overrides: dict, threads: int) -> dict:
    cfg = [str(BUNDLE / "configs" / "train.json")]
    if nproc > 1:
        cfg.append(str(BUNDLE / "configs" / "multi_gpu_train.json"))
        launcher = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}",
                    f"--master_port={_free_port()}", "--tee=3", "-m"]
    else:
        launcher = [sys.executable, "-m"]
    cmd = launcher + ["monai.bundle", "run", "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
                      "--config_file", json.dumps(cfg) if len(cfg) > 1 else cfg[0],
                      "--logging_file", str(BUNDLE / "configs" / "logging.conf"), "--bundle_root", str(BUNDLE)]
    for k, v in overrides.items():
        cmd += [f"--{k}", _arg(v)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({proc.returncode}): {' '.join(cmd)}\n{log[-5000:]}")
    if nproc > 1:  # rank 0's lines only
        log = "\n".join(m.group(1) for m in re.finditer(r"^\[default0\]:(.*)$", log, re.M))
    times = re.findall(r"Trainer - INFO - Engine run (?:complete|finished)\. Time taken: (\d+:\d+:[\d.]+)", log)
    losses = re.findall(r"train_loss: ([\d.eE+-]+)", log)
    if not times:
        raise SystemExit(f"no 'Engine run finished' line in the log:\n{log[-3000:]}")
    from tsdk_monai.handlers import latest_checkpoint

    ckpt = torch.load(latest_checkpoint(overrides["ckpt_dir"]), map_location="cpu", weights_only=True)
    return {"seconds": _seconds(times[-1]), "last_loss": float(losses[-1]) if losses else float("nan"),
            "weights": ckpt["model"], "log": log}


def _ranks_identical(folder: Path) -> bool:
    w = [torch.load(folder / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    return w[0].keys() == w[1].keys() and all(torch.equal(w[0][k], w[1][k]) for k in w[0])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="labelled training images")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=8, help="global batch (each of 2 processes takes half)")
    ap.add_argument("--student", default="unet_small")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads of an extra 1-process run (the others use one thread per process)")
    ap.add_argument("--modes", default="deterministic,default")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.batch_size % 2:
        raise SystemExit("--batch_size must be even (2 processes take half each)")
    from tsdk_monai.data import write_demo_data

    work = Path(args.work or tempfile.mkdtemp(prefix="ddp_speedup_"))
    total = int(args.n / 0.68) + 2  # + the validation (10%) and test (20%) images the datalist holds
    datalist = write_demo_data(work / "data", n=total, size=args.size, n_labeled=args.n)
    n_train = len(json.loads(datalist.read_text())["training"])
    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        ref = None
        runs = [(1, 1), (2, 1)] + ([(1, args.threads)] if args.threads > 1 else [])
        base = None
        for nproc, threads in runs:
            out = work / f"{mode}_{nproc}p{threads}t"
            o = {"dataset_dir": str(datalist.parent), "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"),
                 "student": args.student, "image_size": args.size, "batch_size": args.batch_size // nproc,
                 "train#trainer#max_epochs": args.epochs, "val_interval": 10**6, "resume": False}
            if mode == "deterministic":
                o.update({"train#augment": [], "train#dataloader#shuffle": False, "optimizer#_target_": "torch.optim.SGD"})
                if nproc > 1:
                    o["train#sampler#shuffle"] = False
            if nproc > 1:
                o["rank_weights_dir"] = str(out / "ranks")
            r = run_stage(nproc, out, o, threads)
            if ref is None:
                ref = base = r
            diff = max(float((r["weights"][k].float() - ref["weights"][k].float()).abs().max()) for k in ref["weights"])
            scale = max(float(v.float().abs().max()) for v in ref["weights"].values())
            rows.append({"mode": mode, "processes": nproc, "threads": threads,
                         "batch": args.batch_size // nproc, "seconds": r["seconds"], "speedup": base["seconds"] / r["seconds"],
                         "last_loss": r["last_loss"], "max_abs_diff": diff, "max_abs_weight": scale,
                         "ranks_identical": _ranks_identical(out / "ranks") if nproc > 1 else None})
    steps = args.epochs * -(-n_train // args.batch_size)
    print(f"# 1 vs 2 processes: tsdk_student ({args.student}) train.json, {n_train} images of {args.size}x{args.size}, "
          f"{args.epochs} epochs = {steps} steps of a global batch {args.batch_size}, gloo on the CPU, "
          f"torch {torch.__version__}\n")
    print("| mode | processes x threads | batch per process | training s | speed-up vs 1 x 1 | last train loss (rank 0) "
          "| max abs weight diff vs 1 process | both ranks identical |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ident = "-" if r["ranks_identical"] is None else ("yes" if r["ranks_identical"] else "NO")
        print(f"| {r['mode']} | {r['processes']} x {r['threads']} | {r['batch']} | {r['seconds']:.1f} | "
              f"{r['speedup']:.2f}x | {r['last_loss']:.4f} | {r['max_abs_diff']:.2e} (of max {r['max_abs_weight']:.2f}) "
              f"| {ident} |")
    return rows


if __name__ == "__main__":
    main()
