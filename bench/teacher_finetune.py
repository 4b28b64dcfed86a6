"""Benchmark: LoRA vs frozen-encoder (decoder only) vs full fine-tuning of the LiteMedSAM teacher on HC18.

For each method, in its own process (so peak memory is its own), on the same seeded HC18 split (``tsdk prepare``,
n_labeled=80, seed 0) at the same input size: train for the same wall-clock budget, then report trainable
parameters, seconds per iteration, peak memory and the validation Dice. All numbers come from one run on one
machine; compare them as ratios.

    # the issue's acceptance run (LoRA within 30 CPU minutes) plus both baselines on the same budget (~1.7 h on 2 cores)
    python bench/teacher_finetune.py
    # a smoke test: two iterations each, 2 validation images
    python bench/teacher_finetune.py --minutes 1 --max-iters 2 --batch-size 1 --val-cases 2 --img-size 64

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident set (VmHWM,
reset after the model is built, so "train peak" is the peak during training and "model RSS" what it started from).
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
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hc18"
METHODS = ("lora", "decoder", "full")


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc (Linux), else resource."""
    try:
        status = Path("/proc/self/status").read_text()
        vals = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM"))}
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _transforms(img_size: int, train: bool, num_classes: int):
    from monai.transforms import (
        Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, RandAffined, RandFlipd, Resized, ScaleIntensityd,
    )
    import torch

    from tsdk_monai.transforms import CheckLabeld, EnsureGreyd

    t = [
        LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"]),
        EnsureGreyd(keys="image"), CheckLabeld(keys="label", num_classes=num_classes),
        ScaleIntensityd(keys="image", minv=0.0, maxv=1.0), EnsureTyped(keys=["image", "label"], dtype=torch.float32),
    ]
    if train:  # the same as bundles/tsdk_teacher/configs/train.json
        t += [
            Resized(keys=["image", "label"], spatial_size=(img_size, img_size), mode=("bilinear", "nearest"),
                    anti_aliasing=(True, False)),
            RandAffined(keys=["image", "label"], prob=0.5, rotate_range=0.26, scale_range=0.1, translate_range=(8, 8),
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        ]
    return Compose(t)


def worker(args: argparse.Namespace) -> dict:
    """Train one method for the budget and evaluate it; return the result row."""
    import torch
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.utils import set_determinism

    from tsdk_monai.data import load_split, num_classes_of
    from tsdk_monai.networks import LoRASegTeacher, count_parameters

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    device = torch.device(args.device)
    num_classes = num_classes_of(args.datalist)
    train_ds = CacheDataset(load_split(args.datalist, "training"), _transforms(args.img_size, True, num_classes),
                            cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True)
    val_cases = load_split(args.datalist, "validation")[: args.val_cases]
    val_loader = DataLoader(Dataset(val_cases, _transforms(args.img_size, False, num_classes)), batch_size=1)

    net = LoRASegTeacher(
        num_classes=num_classes, img_size=args.img_size, finetune=args.worker, lora_rank=args.lora_rank,
        default_prompt=args.default_prompt,
    ).to(device)
    trainable, total = count_parameters(net)
    enc = [p for n, p in net.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    dec = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    enc_lr = args.lr * (args.full_encoder_lr_scale if args.worker == "full" else 1.0)
    groups = [{"params": dec, "lr": args.lr}] + ([{"params": enc, "lr": enc_lr}] if enc else [])
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0, _ = _rss_mb()
    reset_ok = _reset_peak_rss()
    budget = args.minutes * 60.0
    times: list[float] = []
    losses: list[float] = []
    start = time.perf_counter()
    net.train()
    done = False
    while not done:
        for batch in loader:
            t0 = time.perf_counter()
            x, y = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if len(times) % max(1, args.log_every) == 0:
                print(f"[{args.worker}] iter {len(times)} loss {statistics.fmean(losses[-args.log_every:]):.4f} "
                      f"{times[-1]:.1f} s/iter", file=sys.stderr, flush=True)
            if time.perf_counter() - start >= budget or (args.max_iters and len(times) >= args.max_iters):
                done = True
                break
    train_s = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        mem_kind = "cuda_max_allocated"
    else:
        peak_mb = _rss_mb()[1] if reset_ok else _rss_mb()[1]
        mem_kind = "cpu_peak_rss" if reset_ok else "cpu_peak_rss_process"

    net.eval()
    metric = DiceMetric(include_background=False, reduction="mean")
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in val_loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            pred = net(x).argmax(1, keepdim=True)
            onehot = lambda t: torch.nn.functional.one_hot(t[:, 0].long(), num_classes).permute(0, 3, 1, 2)  # noqa: E731
            metric(onehot(pred), onehot(y))
    val_s = time.perf_counter() - t0
    dice = float(metric.aggregate()) if val_cases else float("nan")
    return {
        "method": args.worker, "trainable_params": trainable, "total_params": total,
        "trainable_pct": 100.0 * trainable / total, "iterations": len(times), "batch_size": args.batch_size,
        "epochs": len(times) * args.batch_size / max(1, len(train_ds)), "train_minutes": train_s / 60,
        "s_per_iter_median": statistics.median(times) if times else float("nan"),
        "s_per_iter_mean": statistics.fmean(times) if times else float("nan"),
        "final_loss": statistics.fmean(losses[-5:]) if losses else float("nan"),
        "model_rss_mb": rss0, "peak_mem_mb": peak_mb, "peak_mem_kind": mem_kind,
        "val_dice": dice, "val_cases": len(val_cases), "val_s_per_image": val_s / max(1, len(val_cases)),
        "img_size": args.img_size, "device": str(device), "threads": args.threads,
    }


def _table(rows: list[dict]) -> str:
    head = ("method", "trainable", "share", "iters", "epochs", "s/iter", "peak MiB", "val Dice")
    lines = [" | ".join(f"{h:>10}" for h in head)]
    for r in rows:
        lines.append(" | ".join(f"{v:>10}" for v in (
            r["method"], f"{r['trainable_params']:,}", f"{r['trainable_pct']:.1f}%", r["iterations"], f"{r['epochs']:.1f}",
            f"{r['s_per_iter_median']:.2f}", f"{r['peak_mem_mb']:.0f}", f"{r['val_dice']:.4f}",
        )))
    base = next((r for r in rows if r["method"] == "full"), None)
    if base:
        lines.append("ratios to full fine-tuning (same run, same machine):")
        for r in rows:
            lines.append(
                f"  {r['method']:>8}: trainable x{r['trainable_params'] / base['trainable_params']:.3f}, "
                f"s/iter x{r['s_per_iter_median'] / base['s_per_iter_median']:.2f}, "
                f"peak memory x{r['peak_mem_mb'] / base['peak_mem_mb']:.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="HC18 folder with images/ and labels/")
    p.add_argument("--work", default=str(REPO / "bench" / "out" / "teacher_finetune"), help="output folder")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: lora, decoder, full")
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget per method")
    p.add_argument("--max-iters", type=int, default=0, help="stop earlier after this many iterations (0: budget only)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--img-size", type=int, default=256, help="LiteMedSAM input size (native 256)")
    p.add_argument("--val-cases", type=int, default=40, help="validation images (at their original resolution)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--full-encoder-lr-scale", type=float, default=0.1, help="encoder lr factor for full fine-tuning")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--default-prompt", choices=("box", "none"), default="box", help="decoder's learned default prompt init")
    p.add_argument("--n-labeled", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--datalist", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    from tsdk_monai.data import prepare

    work = Path(args.work)
    split = work / f"hc18_n{args.n_labeled}_seed{args.seed}"
    datalist = prepare(str(Path(args.data) / "images"), str(Path(args.data) / "labels"), str(split),
                       n_labeled=args.n_labeled, seed=args.seed)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {METHODS}")
    print(f"teacher fine-tuning benchmark: {methods}, {args.minutes:g} min each at {args.img_size}px, batch "
          f"{args.batch_size}, {args.threads} threads, {args.device}; split {datalist}", flush=True)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore::FutureWarning")
    for m in methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", m, "--datalist", str(datalist)]
        for k in ("minutes", "max_iters", "batch_size", "img_size", "val_cases", "lr", "full_encoder_lr_scale",
                  "lora_rank", "default_prompt", "seed", "threads", "device", "log_every"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{m}: worker failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"{m}: done, val Dice {rows[-1]['val_dice']:.4f}", flush=True)
    table = _table(rows)
    print(table)
    from tsdk_monai.utils import atomic_write_json

    atomic_write_json(work / "results.json", {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "datalist")},
                                             "rows": rows})
    (work / "results.txt").write_text(table + "\n")
    print(f"wrote {work / 'results.json'}")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
