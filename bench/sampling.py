"""DDIM vs DDPM sampling speed of the synthesis stage's diffusion UNet, measured in one run on this machine.

    python bench/sampling.py                       # 64x64, bundle-default UNet, DDIM 50 steps vs DDPM 1000 steps
    python bench/sampling.py --image-size 128 --checkpoint models/model.pt
    python bench/sampling.py --ddpm-steps 20 --ddim-steps 5 --num-images 2   # smoke test

Prints seconds per image for each sampler and their ratio. The weights do not change the cost: without a
checkpoint the UNet has random weights. Both samplers run the same code (``tsdk_monai.engines.sample_images``)
on the same images (same seed), so the ratio is the cost of the step counts alone (plus scheduler overhead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tsdk_monai.engines import load_weights, sample_images
from tsdk_monai.networks.diffusion import build_diffusion_unet


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--block-out-channels", type=int, nargs="+", default=[32, 64, 128, 128],
                    help="UNet levels (bundle default: 32 64 128 128)")
    ap.add_argument("--checkpoint", default=None, help="optional trained model.pt (EMA weights used when present)")
    ap.add_argument("--num-images", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--ddpm-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = build_diffusion_unet(args.image_size, block_out_channels=args.block_out_channels)
    if args.checkpoint:
        load_weights(net, args.checkpoint)
    train_sched = DDPMScheduler(num_train_timesteps=1000)
    samplers = {
        "DDIM": (DDIMScheduler.from_config(train_sched.config), args.ddim_steps),
        "DDPM": (DDPMScheduler.from_config(train_sched.config), args.ddpm_steps),
    }
    # warm-up (allocations, first-call overheads), not timed
    sample_images(net, samplers["DDIM"][0], 1, batch_size=1, num_inference_steps=2, progress=False)
    results = {}
    for name, (sched, steps) in samplers.items():
        t0 = time.perf_counter()
        sample_images(net, sched, args.num_images, batch_size=args.batch_size, num_inference_steps=steps, seed=0)
        sec = (time.perf_counter() - t0) / args.num_images
        results[name] = {"steps": steps, "seconds_per_image": sec}
        logging.info("%s %d steps: %.3f s/image", name, steps, sec)
    ratio = results["DDPM"]["seconds_per_image"] / results["DDIM"]["seconds_per_image"]
    summary = {
        "image_size": args.image_size, "block_out_channels": args.block_out_channels, "num_images": args.num_images,
        "batch_size": args.batch_size, "threads": args.threads,
        "parameters": sum(p.numel() for p in net.parameters()), "results": results, "ddpm_over_ddim": ratio,
    }
    print(f"\nsampling {args.num_images} images of {args.image_size}x{args.image_size} "
          f"({summary['parameters'] / 1e6:.2f}M-parameter UNet, batch {args.batch_size}, {args.threads} threads)")
    print(f"{'sampler':8s} {'steps':>6s} {'s/image':>10s}")
    for name, r in results.items():
        print(f"{name:8s} {r['steps']:6d} {r['seconds_per_image']:10.3f}")
    print(f"DDPM / DDIM time ratio: {ratio:.1f}x (step ratio {args.ddpm_steps / args.ddim_steps:.1f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
