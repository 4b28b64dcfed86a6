"""Distillation speed, measured in one run on one machine (ratios are what to compare across machines).

Prints:

1. inference images/s at ``--img_size`` (no gradient, eval mode) of the teacher (LiteMedSAM + LoRA prompt-free
   decoder, or the one in ``--teacher_ckpt``) and of each student, their ratio, and parameter counts;
2. the time of one distillation epoch over ``--n_images`` images with the teacher online (recomputed every batch)
   and with cached teacher targets (a warm memory cache: the steady state from the second epoch on), and the ratio.

Images are the embedded demo phantoms (deterministic), so nothing is downloaded.

Smoke test (about a minute):
    python bench/distill_speed.py --n_images 4 --img_size 64 --teacher_img_size 64 --batch_size 2 --repeats 1
Full run (minutes on 2 CPU cores):  python bench/distill_speed.py
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def _images(n: int, size: int) -> torch.Tensor:
    from tsdk_monai.data import make_phantom

    rng = np.random.default_rng(0)
    return torch.stack([torch.from_numpy(make_phantom(rng, size)[0]).float()[None] / 255.0 for _ in range(n)])


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _images_per_s(net: torch.nn.Module, x: torch.Tensor, batch_size: int, repeats: int) -> float:
    net.eval()
    net(x[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, x.shape[0], batch_size):
            net(x[i : i + batch_size])
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def _epoch_time(student_name: str, teacher: torch.nn.Module, x: torch.Tensor, batch_size: int, cached: bool) -> float:
    from monai.data import DataLoader

    from monai.data import MetaTensor
    from monai.engines import SupervisedTrainer

    from tsdk_monai.engines import DistillationPrepareBatch, TeacherCache
    from tsdk_monai.inferers import FeatureInferer
    from tsdk_monai.losses import TaskSpecificKDLoss
    from tsdk_monai.networks import build_student

    torch.manual_seed(0)
    student = build_student(student_name, num_classes=2, img_size=x.shape[-1])
    loss = TaskSpecificKDLoss(student.feature_channels, 256)
    opt = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-3)
    ids = [f"img{i}" for i in range(x.shape[0])]
    data = [{"image": MetaTensor(x[i], meta={"filename_or_obj": ids[i]})} for i in range(x.shape[0])]
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    prepare = DistillationPrepareBatch(teacher, True, True, cache=TeacherCache("memory") if cached else None)
    trainer = SupervisedTrainer("cpu", 1, loader, student, opt, loss, prepare_batch=prepare,
                                inferer=FeatureInferer(True), decollate=False)
    if cached:  # fill the cache once, as the first epoch of a run does
        prepare.targets(x, ids)
    t0 = time.perf_counter()
    trainer.run()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_images", type=int, default=32, help="images of the distillation epoch")
    ap.add_argument("--n_infer", type=int, default=None, help="images for the inference speed (default n_images)")
    ap.add_argument("--img_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="inference timing repeats (best is kept)")
    ap.add_argument("--students", default="vit_tiny,unet_small")
    ap.add_argument("--teacher_ckpt", default=None, help="a tsdk_teacher ckpt_dir / teacher folder (default: untrained "
                                                          "LoRA teacher; the speed is the same)")
    ap.add_argument("--teacher_img_size", type=int, default=None,
                    help="the default teacher's encoder input side (default: LiteMedSAM's native 256; 64 for smoke tests)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tsdk_monai.networks import LoRASegTeacher, build_student, load_distill_teacher

    if args.teacher_ckpt:
        teacher = load_distill_teacher(args.teacher_ckpt)
    else:
        # LiteMedSAM at its native 256 unless --teacher_img_size says otherwise
        teacher = LoRASegTeacher(num_classes=2, img_size=args.teacher_img_size).eval().requires_grad_(False)
    x = _images(args.n_images, args.img_size)
    xi = x[: args.n_infer] if args.n_infer else x
    students = [s.strip() for s in args.students.split(",") if s.strip()]

    print(f"# distillation speed: {args.img_size}x{args.img_size}, batch {args.batch_size}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("\n## inference (no gradient)\n")
    print("| network | parameters | images/s | speed-up vs teacher |")
    print("|---|---:|---:|---:|")
    t_ips = _images_per_s(teacher, xi, args.batch_size, args.repeats)
    print(f"| teacher ({teacher.config['vfm']} + LoRA, encoder at {teacher.config['img_size']}) | {_count(teacher):,} | {t_ips:.2f} | 1.0x |")
    for name in students:
        net = build_student(name, num_classes=2, img_size=args.img_size)
        ips = _images_per_s(net, xi, args.batch_size, args.repeats)
        print(f"| {name} | {_count(net):,} | {ips:.2f} | {ips / t_ips:.1f}x |")

    print(f"\n## one distillation epoch ({args.n_images} images, task-specific loss)\n")
    print("| student | online teacher s | cached teacher s | speed-up |")
    print("|---|---:|---:|---:|")
    for name in students:
        online = _epoch_time(name, teacher, x, args.batch_size, cached=False)
        cached = _epoch_time(name, teacher, x, args.batch_size, cached=True)
        print(f"| {name} | {online:.1f} | {cached:.1f} | {online / cached:.1f}x |")


if __name__ == "__main__":
    main()
