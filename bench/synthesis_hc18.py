"""Benchmark: the synthesis stage on HC18 fetal-head ultrasound within a CPU time budget (issue 4 acceptance).

Steps, all through the bundle (``python -m monai.bundle run``), so the numbers are the bundle's:

1. ``tsdk_monai.data.prepare`` the HC18 images into a seeded grouped split (n_labeled=80, seed 0);
2. ``tsdk_synthesis/configs/train.json`` on the training + unlabelled images (never test) at 128x128, stopped
   by ignite's ``TimeLimit`` after ``--minutes`` (an interrupted run resumes from its last epoch checkpoint);
3. ``train.json + inference.json``: DDIM sampling of ``--num-images`` images, ``synthetic_datalist.json``, and the
   quality report (``quality.json`` + ``quality_grid.png``) with the noise baseline: the Fréchet distance, in the
   pooled LiteMedSAM encoder feature space, of Gaussian pixel noise with the data's mean and std.

    # the acceptance run (~60 min training + ~8 min sampling and LiteMedSAM features on 2 quiet CPU cores)
    python bench/synthesis_hc18.py
    # a smoke test (a few images, tiny UNet, seconds of training, a small stand-in feature extractor)
    python bench/synthesis_hc18.py --limit 40 --minutes 0.3 --image-size 32 --block-out-channels 16 32 32 \\
        --num-images 4 --steps 4 --max-real-fid 8 --features small --work /tmp/syn_hc18_smoke

Prints the Fréchet distance of the samples and of the noise baseline, the near-copy count and where the grid is.
Look at the grid: its rows are real images, samples, and each sample's nearest real image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "tsdk_synthesis"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hc18"
SMALL_FEATURES = "$torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, stride=2), torch.nn.ReLU())"


def _bundle(configs: list[str], overrides: dict, log: Path) -> None:
    cfg = [str(BUNDLE / "configs" / c) for c in configs]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
        "--config_file", json.dumps(cfg) if len(cfg) > 1 else cfg[0],
        "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(BUNDLE),
    ]
    for k, v in overrides.items():
        # fire reads values as Python literals: JSON's true/false would arrive as the (truthy) strings "true"/"false"
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v) if isinstance(v, bool) else json.dumps(v)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    print(f"$ {' '.join(cmd[:4])} {' '.join(configs)} ...  (log: {log})", flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        tail = "".join(open(log).readlines()[-40:])
        raise SystemExit(f"bundle run failed ({proc.returncode}); last lines of {log}:\n{tail}")


def _subset(data: Path, work: Path, limit: int) -> tuple[Path, Path]:
    """Links to the first ``limit`` image/label pairs (smoke tests), in a folder ``prepare`` can read."""
    images, labels = work / f"subset{limit}" / "images", work / f"subset{limit}" / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for p in sorted((data / "images").glob("*.png"))[:limit]:
        for src, dst in ((p, images / p.name), (data / "labels" / p.name, labels / p.name)):
            if not dst.exists():
                dst.symlink_to(src.resolve())
    return images, labels


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HC18 folder with images/ and labels/")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "synthesis_hc18")
    ap.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget")
    ap.add_argument("--image-size", type=int, default=128)
    # sized for 2 CPU cores: ~2.7M parameters, ~0.67 s per batch of 8 at 128x128 on a quiet machine (~5,400
    # iterations in 60 min, measured 2026-11-22); the bundle's default UNet (32 64 128 128, batch 16) is ~5x slower per iteration
    ap.add_argument("--block-out-channels", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction",
                    help="training target; v-prediction learns the low frequencies (the data mean, the fan) far sooner")
    ap.add_argument("--beta-schedule", default="squaredcos_cap_v2", help="diffusers beta schedule (linear, squaredcos_cap_v2)")
    ap.add_argument("--snr-gamma", type=float, default=5.0,
                    help="Min-SNR-gamma loss weighting (0: plain MSE); it shifts the gradient from fine texture to layout")
    ap.add_argument("--ema-momentum", type=float, default=0.001,
                    help="final EMA weight of the newest weights per iteration (after the warm-up, tsdk_monai.handlers.EMAWarmup)")
    ap.add_argument("--num-images", type=int, default=64, help="samples to draw (and noise images for the baseline)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--max-real-fid", type=int, default=128, help="real images in the Fréchet distance")
    ap.add_argument("--features", choices=("litemedsam", "small"), default="litemedsam",
                    help="feature space of the Fréchet distance ('small': a random conv net, for smoke tests only)")
    ap.add_argument("--n-labeled", type=int, default=80)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N HC18 pairs (smoke tests)")
    args = ap.parse_args(argv)

    from tsdk_monai.data import prepare

    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    t0 = time.time()
    images, labels = (args.data / "images", args.data / "labels") if args.limit is None else _subset(args.data, work, args.limit)
    n_labeled = args.n_labeled if args.limit is None else min(args.n_labeled, max(1, args.limit // 4))
    datalist = prepare(str(images), str(labels), str(work / "data"), n_labeled=n_labeled, seed=0)
    print(f"split: {datalist} ({time.time() - t0:.0f} s)", flush=True)

    common = {
        "dataset_dir": str(datalist.parent),
        "ckpt_dir": str(work / "models"),
        "log_dir": str(work / "logs"),
        "output_dir": str(work / "synthetic"),
        "image_size": args.image_size,
        "network_def#block_out_channels": args.block_out_channels,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "train#ema_momentum": args.ema_momentum,
        "train#snr_gamma": args.snr_gamma if args.snr_gamma > 0 else "None",
        "prediction_type": args.prediction_type,
        "noise_scheduler#beta_schedule": args.beta_schedule,
    }
    t_train = time.time()
    _bundle(["train.json"], {**common, "train#time_limit_s": args.minutes * 60, "train#trainer#max_epochs": 100000}, log)
    train_s = time.time() - t_train
    print(f"trained for {train_s / 60:.1f} min", flush=True)

    t_inf = time.time()
    inference = {
        **common, "num_images": args.num_images, "num_inference_steps": args.steps,
        "quality#report#max_real_for_fid": args.max_real_fid, "quality#report#noise_baseline": True,
    }
    if args.features == "small":
        inference["quality#feature_extractor"] = SMALL_FEATURES
    _bundle(["train.json", "inference.json"], inference, log)
    infer_s = time.time() - t_inf

    quality = json.loads((work / "synthetic" / "quality.json").read_text())
    ckpt_epoch = None
    try:
        import torch

        state = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)["trainer"]
        ckpt_epoch = round(state["iteration"] / state["epoch_length"], 2)
    except Exception:  # the summary still stands without it
        pass
    mem = quality["memorisation"]
    summary = {
        "image_size": args.image_size, "train_minutes": round(train_s / 60, 2), "epochs": ckpt_epoch,
        "sampling_and_report_minutes": round(infer_s / 60, 2), "num_images": args.num_images, "ddim_steps": args.steps,
        "features": args.features, "block_out_channels": args.block_out_channels, "batch_size": args.batch_size,
        "lr": args.lr, "prediction_type": args.prediction_type, "beta_schedule": args.beta_schedule, "ema_momentum": args.ema_momentum,
        "snr_gamma": args.snr_gamma or None, "num_real_fid": quality["num_real_fid"],
        "frechet_distance": quality["frechet_distance"],
        "noise_baseline_frechet_distance": quality["noise_baseline"]["frechet_distance"],
        "num_copies": mem["num_copies"], "copy_threshold": mem["copy_threshold"],
        "max_similarity": mem["synthetic_to_real"]["max"], "real_to_real_median_similarity": mem["real_to_other_real"]["median"],
        "grid": str(work / "synthetic" / "quality_grid.png"),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nHC18 synthesis at {args.image_size}x{args.image_size}: {summary['train_minutes']} CPU min of training "
          f"({ckpt_epoch} epochs), {args.num_images} DDIM-{args.steps} samples")
    print(f"Fréchet distance ({args.features} features, {quality['num_real_fid']} real vs {args.num_images}):"
          f" samples {summary['frechet_distance']:.4g}  |  Gaussian noise with the data's mean/std "
          f"{summary['noise_baseline_frechet_distance']:.4g}")
    print(f"near-copies: {mem['num_copies']}/{args.num_images} (pixel correlation >= {mem['copy_threshold']}; "
          f"max {summary['max_similarity']:.3f}; real-to-real nearest-neighbour median {summary['real_to_real_median_similarity']:.3f})")
    print(f"grid (real / samples / nearest real): {summary['grid']}")
    return summary


if __name__ == "__main__":
    main()
