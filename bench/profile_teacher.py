"""Which training stage is slowest per image, where its time goes (torch.profiler), and the gain of the fix.

1. Seconds per image of one training step of each stage at its bundle's input size (the teacher's LoRA step at 256;
   distillation with the teacher online and cached; the student's step at 256; the diffusion UNet's step at 64),
   before the fix.
2. ``torch.profiler`` (CPU) on the slowest stage, the teacher's LoRA fine-tuning step: the operators with the most
   self time, and the same by input shape.
3. Before/after the fix, measured alternately in this run: seconds per teacher training step and per teacher
   inference image, and the largest difference of the outputs (the fix must not change them beyond rounding).

The fix (``tsdk_monai.networks.vfm``): LiteMedSAM's TinyViT keeps the 256x256 input resolution through its patch
embedding and first (MBConv) stage, so its 1x1 and depthwise 3x3 convolutions run on (B, 256, 256, 256) maps; in
PyTorch's default NCHW layout oneDNN runs them far below the machine's matmul speed (reorders around every call, a
slow NCHW depthwise kernel). The encoder is now built channels-last (NHWC), where oneDNN's convolutions are
direct, and its frozen Conv2d+BatchNorm pairs run as one convolution with the BatchNorm folded in (the same
weights; the BatchNorm layers are frozen in eval mode whenever the encoder is frozen). "Before" undoes both on a
copy of the same network (:func:`before_fix`).

Times are the best of a few calls, in CPU seconds of one thread by default (``time.process_time``), so that other
load on the machine hardly counts; ``--threads 2 --clock wall`` measures elapsed time on a quiet machine.

    python bench/profile_teacher.py                 # ~6 minutes on one CPU core
    python bench/profile_teacher.py --quick         # smoke test at 64x64
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def before_fix(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of a LiteMedSAM teacher as it ran before the fix: NCHW weights, Conv2d and BatchNorm as two calls."""
    from tsdk_monai.networks.tinyvit import set_tinyvit_fast_path

    net = copy.deepcopy(net)
    net.encoder.backbone.to(memory_format=torch.contiguous_format)
    set_tinyvit_fast_path(net.encoder, False)
    return net


CLOCK = time.process_time  # set in main: CPU seconds (default) or wall seconds


def _timed(fn, steps: int, warmup: bool = True) -> float:
    """Seconds per call of ``fn`` (the best of ``steps`` calls, after a warm-up call)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(steps):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def _teacher_step(net, batch: int, size: int, amp: bool = False):
    """One training step of ``net`` on random images (bfloat16 autocast with ``amp``, the loss in float32 as the
    bundles compute it)."""
    from monai.losses import DiceCELoss

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    x, y = torch.rand(batch, 1, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()

    def step():
        net.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def stage_costs(args) -> list[tuple[str, float]]:
    """(stage, seconds per image) of one training step of each stage."""
    import torch.nn.functional as F

    from tsdk_monai.losses import TaskSpecificKDLoss
    from tsdk_monai.networks import LoRASegTeacher, build_diffusion_unet, build_student

    s = args.img_size
    rows = []
    teacher = before_fix(LoRASegTeacher(num_classes=2, img_size=args.teacher_size))  # the stages as they were
    rows.append(("teacher: LoRA fine-tuning step", _timed(_teacher_step(teacher, args.batch, s), args.steps) / args.batch))
    frozen = before_fix(LoRASegTeacher(num_classes=2, img_size=args.teacher_size, finetune="decoder")).eval()
    for cached in (False, True):
        student = build_student("unet_small", num_classes=2, img_size=s)
        loss = TaskSpecificKDLoss(student.feature_channels, 256)
        opt = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-3)
        x = torch.rand(args.batch * 2, 1, s, s)
        with torch.no_grad():
            targets = frozen.forward_with_features(x)

        def step(student=student, loss=loss, opt=opt, x=x, targets=targets, cached=cached):
            if not cached:
                with torch.no_grad():
                    t_logits, t_emb = frozen.forward_with_features(x)
            else:
                t_logits, t_emb = targets
            opt.zero_grad(set_to_none=True)
            logits, feats = student.forward_with_features(x)
            loss({"logits": logits, "features": feats}, {"logits": t_logits, "features": t_emb}).backward()
            opt.step()

        name = "distillation step, cached teacher" if cached else "distillation step, teacher online"
        rows.append((name, _timed(step, args.steps) / x.shape[0]))
    student = build_student("unet_small", num_classes=2, img_size=s)
    rows.append(("student: fine-tuning step", _timed(_teacher_step(student, args.batch * 4, s), args.steps) / (args.batch * 4)))
    unet = build_diffusion_unet(args.diffusion_size)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    xd = torch.rand(args.batch * 8, 1, args.diffusion_size, args.diffusion_size) * 2 - 1

    def dstep():
        noise, t = torch.randn_like(xd), torch.randint(0, 1000, (xd.shape[0],))
        opt.zero_grad(set_to_none=True)
        F.mse_loss(unet(xd + noise, t, return_dict=False)[0], noise).backward()
        opt.step()

    rows.append((f"synthesis: diffusion UNet step at {args.diffusion_size}", _timed(dstep, args.steps) / xd.shape[0]))
    return rows


def _profile(step) -> dict[tuple[str, str], tuple[float, int]]:
    """{(operator, input shapes): (self CPU ms, calls)} of one call of ``step`` (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return {(e.key, str(e.input_shapes)): (e.self_cpu_time_total / 1e3, e.count)
            for e in prof.key_averages(group_by_input_shape=True)}


def profile_before_after(before_step, after_step, rows: int) -> None:
    """The operators (by input shapes) with the most self time before the fix, and their time after it."""
    before, after = _profile(before_step), _profile(after_step)
    total_b, total_a = sum(v[0] for v in before.values()), sum(v[0] for v in after.values())
    by_op_a: dict[str, float] = {}
    for (op, _), (ms, _) in after.items():
        by_op_a[op] = by_op_a.get(op, 0.0) + ms
    print(f"self CPU time of one step: before {total_b / 1e3:.2f} s, after {total_a / 1e3:.2f} s\n")
    print("| operator | input shapes | calls | before ms | share | after ms (same shapes) |")
    print("|---|---|---:|---:|---:|---:|")
    for (op, shapes), (ms, n) in sorted(before.items(), key=lambda kv: -kv[1][0])[:rows]:
        a = after.get((op, shapes), (0.0, 0))[0]
        short = shapes if len(shapes) <= 60 else shapes[:57] + "..."
        print(f"| {op} | {short} | {n} | {ms:.0f} | {100 * ms / total_b:.1f}% | {a:.0f} |")
    print("\n| operator (all shapes) | before ms | after ms |\n|---|---:|---:|")
    by_op_b: dict[str, float] = {}
    for (op, _), (ms, _) in before.items():
        by_op_b[op] = by_op_b.get(op, 0.0) + ms
    for op, ms in sorted(by_op_b.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"| {op} | {ms:.0f} | {by_op_a.get(op, 0.0):.0f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img_size", type=int, default=256)
    ap.add_argument("--teacher_size", type=int, default=None, help="LiteMedSAM encoder side (default its native 256)")
    ap.add_argument("--diffusion_size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2, help="teacher batch (distillation x2, student x4, diffusion x8)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3, help="before/after alternations")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: with --clock cpu, other load on the machine hardly counts)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: the process's CPU seconds (time.process_time); wall: elapsed seconds (a quiet machine)")
    ap.add_argument("--quick", action="store_true", help="64x64 everywhere, one step (a smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.img_size, args.teacher_size, args.diffusion_size, args.steps, args.rounds = 64, 64, 32, 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    from tsdk_monai.networks import LoRASegTeacher

    print(f"# profile: {args.threads} thread(s), {args.clock} seconds (best of {args.steps} after a warm-up), "
          f"torch {torch.__version__}\n")
    print("## 1. seconds per image of one training step\n")
    costs = stage_costs(args)
    print("| stage | s/image | vs slowest |\n|---|---:|---:|")
    worst = max(c for _, c in costs)
    for name, c in costs:
        print(f"| {name} | {c:.3f} | {c / worst:.2f} |")

    after = LoRASegTeacher(num_classes=2, img_size=args.teacher_size)
    before = before_fix(after)
    frozen = {"before": copy.deepcopy(before).eval(), "after": copy.deepcopy(after).eval()}  # untrained, for the diff
    steps = {"before": _teacher_step(before, args.batch, args.img_size),
             "after": _teacher_step(after, args.batch, args.img_size)}
    print(f"\n## 2. torch.profiler: one LoRA step of the teacher, the slowest stage (batch {args.batch}, "
          f"{args.img_size}x{args.img_size}), before and after the fix\n")
    profile_before_after(steps["before"], steps["after"], args.rows)

    print(f"\n## 3. before / after the fix (alternating, {args.rounds} rounds, best times)\n")
    x = torch.rand(1, 1, args.img_size, args.img_size)
    t_train = {"before": float("inf"), "after": float("inf")}
    t_infer = {"before": float("inf"), "after": float("inf")}
    for _ in range(args.rounds):
        for k in ("before", "after"):
            t_train[k] = min(t_train[k], _timed(steps[k], args.steps, warmup=False))
            with torch.no_grad():
                t_infer[k] = min(t_infer[k], _timed(lambda k=k: frozen[k](x), args.steps))
    with torch.no_grad():
        ref = frozen["before"](x)
        diff = float((ref - frozen["after"](x)).abs().max())
    print("| teacher (LiteMedSAM + LoRA r=4) | before s | after s | speed-up |\n|---|---:|---:|---:|")
    print(f"| LoRA training step (batch {args.batch}) | {t_train['before']:.2f} | {t_train['after']:.2f} | "
          f"{t_train['before'] / t_train['after']:.2f}x |")
    print(f"| inference, 1 image | {t_infer['before']:.2f} | {t_infer['after']:.2f} | "
          f"{t_infer['before'] / t_infer['after']:.2f}x |")
    print(f"\nlargest logit difference after vs before: {diff:.1e} (logits up to {float(ref.abs().max()):.1f})")


if __name__ == "__main__":
    main()
