"""bfloat16 autocast vs float32 on this CPU: seconds per training step and per inference batch, measured in one run.

The training bundles' ``amp`` switch (``amp_dtype`` bfloat16) autocasts on the device's type, the CPU included. On a
CPU with AMX or AVX-512 BF16 (``lscpu``: ``amx_bf16``, ``avx512_bf16``), oneDNN runs bfloat16 matrix products and
convolutions several times faster than float32: ``--preset cpu`` turns ``amp`` on for the teacher, the distillation
and the students. Without those instructions bfloat16 may be slower: measure before turning it on.

    python bench/cpu_amp.py                      # teacher (LoRA step, inference) and student at 128 and 256 px
    python bench/cpu_amp.py --sizes 64 --steps 1 # smoke test

Prints, per network and size, the best-of-N seconds in float32 and under bfloat16 autocast, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_teacher import _teacher_step  # noqa: E402  (one training step, float32 or bfloat16 autocast)


def _best(fn, steps: int) -> float:
    fn()  # warm-up (oneDNN picks its kernels on the first call)
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _infer(net: torch.nn.Module, batch: int, size: int, amp: bool):
    x = torch.rand(batch, 1, size, size)

    def run():
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            net(x)

    return run


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256", help="comma-separated image sides")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per measurement (best of, after a warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from tsdk_monai.networks import LoRASegTeacher, build_student

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        teacher = LoRASegTeacher(num_classes=3, img_size=size)
        student = build_student("unet_small", num_classes=3, img_size=size)
        cases = {
            f"teacher LoRA step, batch 4, {size} px": lambda amp: _teacher_step(teacher, 4, size, amp),
            f"teacher inference, batch 8, {size} px": lambda amp: _infer(teacher, 8, size, amp),
            f"student step, batch 8, {size} px": lambda amp: _teacher_step(student, 8, size, amp),
        }
        for name, make in cases.items():
            fp32, bf16 = (_best(make(amp), args.steps) for amp in (False, True))
            rows.append((name, fp32, bf16))
            print(f"{name}: float32 {fp32:.3f} s, bfloat16 {bf16:.3f} s", flush=True)
    print(f"\n{args.threads} thread(s), torch {torch.__version__}, best of {args.steps}\n")
    print("| step | float32 s | bfloat16 s | speed-up |\n|---|---:|---:|---:|")
    for name, fp32, bf16 in rows:
        print(f"| {name} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
