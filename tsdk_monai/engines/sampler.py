"""Sampling a trained diffusion model and writing the synthetic transfer set.

Output layout (``output_dir``)::

    images/synth_00000.png ...        the samples (PNG uint8, or NIfTI float32 in the data's intensity range)
    synthetic_datalist.json           {"unlabeled": [{"image": "images/synth_00000.png", "group": ...}, ...], ...}

``synthetic_datalist.json`` is a tsdk datalist: ``tsdk_monai.data.load_split(path, "unlabeled")`` returns its
images with absolute paths. It is removed before the first image is written and written last, atomically, so a
crash never leaves a datalist that lists missing or half-written images.

Orientation: tensors follow MONAI's ``LoadImage`` convention (for PNG, the first spatial axis is the image's
width). Files are written so that ``LoadImage`` reads back exactly the sampled tensor.
"""

from __future__ import annotations

import gzip
import inspect
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from tsdk_monai.utils import TSDKInputError, atomic_write_bytes, atomic_write_json, unwrap

__all__ = ["SYNTHETIC_DATALIST", "sample_images", "encode_image", "DiffusionSampler"]

logger = logging.getLogger(__name__)

SYNTHETIC_DATALIST = "synthetic_datalist.json"
FORMATS = ("png", "nii.gz")


def _image_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


@torch.no_grad()
def sample_images(
    network: torch.nn.Module,
    scheduler: Any,
    num_images: int,
    batch_size: int = 16,
    num_inference_steps: int = 50,
    seed: int = 0,
    eta: float = 0.0,
    device: str | torch.device | None = None,
    start: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Draw ``num_images`` samples with any diffusers scheduler (``DDIMScheduler``, ``DDPMScheduler``, ...).

    Image ``i`` starts from noise drawn by its own generator seeded from ``(seed, start + i)``, so a sample does not
    depend on the batch size or on which other images are drawn with it (DDIM with ``eta=0`` is then fully
    deterministic; stochastic schedulers use the same per-image generators for their step noise).

    Args:
        network: ``UNet2DModel`` (``config.sample_size`` and ``config.in_channels`` give the sample shape).
        scheduler: diffusers scheduler; ``set_timesteps(num_inference_steps)`` is called on it.
        num_images: number of samples ``N``.
        batch_size: samples per forward pass.
        num_inference_steps: denoising steps (e.g. 50 for DDIM, 1000 for DDPM).
        seed: base seed.
        eta: DDIM stochasticity (0 = deterministic); ignored by schedulers without it.
        device: where to run; default the network's device.
        start: index of the first image (for drawing a large set in parts).
        progress: show a progress bar over batches.

    Returns:
        ``(N, C, H, W)`` float tensor on the CPU, clamped to ``[-1, 1]``.
    """
    if num_images < 1 or batch_size < 1 or num_inference_steps < 1:
        raise ValueError(
            f"num_images, batch_size and num_inference_steps must be >= 1 (got {num_images}, {batch_size}, "
            f"{num_inference_steps})"
        )
    model = unwrap(network)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    size = model.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(model.config.in_channels), *hw)
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "eta" in step_params:
        step_kwargs["eta"] = float(eta)
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(range(0, num_images, batch_size), desc="sampling", unit="batch", disable=not progress, leave=False)
    try:
        for b0 in bar:
            n = min(batch_size, num_images - b0)
            gens = [torch.Generator().manual_seed(_image_seed(seed, start + b0 + j)) for j in range(n)]
            x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
            scheduler.set_timesteps(num_inference_steps, device=device)
            x = x * scheduler.init_noise_sigma
            if "generator" in step_params:
                step_kwargs["generator"] = gens
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(x, t)
                pred = model(inp, t, return_dict=False)[0]
                x = scheduler.step(pred, t, x, return_dict=False, **step_kwargs)[0]
            out.append(x.clamp(-1, 1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def encode_image(image: torch.Tensor | np.ndarray, file_format: str = "png", intensity_range: Sequence[float] = (0, 255)) -> bytes:
    """Encode one sample ``(C, *spatial)`` in ``[-1, 1]`` (MONAI orientation) as file bytes.

    PNG: values mapped to ``[0, 255]`` uint8, greyscale for one channel, stored so that MONAI's ``LoadImage``
    (PIL reader, reversed indexing) gives back the same ``(C, W, H)`` array. NIfTI (``nii.gz``): float32 in
    ``intensity_range``, identity affine, channel dropped for one channel.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    unit = (np.clip(arr.astype(np.float32), -1, 1) + 1) / 2  # [0, 1]
    if file_format == "png":
        from PIL import Image

        if unit.ndim != 3 or unit.shape[0] not in (1, 3):
            raise ValueError(f"PNG needs a 2D image with 1 or 3 channels, got shape {arr.shape}")
        u8 = np.round(unit * 255).astype(np.uint8)
        pil = Image.fromarray(u8[0].T) if u8.shape[0] == 1 else Image.fromarray(np.transpose(u8, (2, 1, 0)))
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        return buf.getvalue()
    if file_format == "nii.gz":
        import nibabel as nib

        lo, hi = float(intensity_range[0]), float(intensity_range[1])
        vol = (lo + unit * (hi - lo)).astype(np.float32)
        vol = vol[0] if vol.shape[0] == 1 else np.moveaxis(vol, 0, -1)
        return gzip.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes(), compresslevel=6, mtime=0)
    raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")


class DiffusionSampler:
    """Draw ``num_images`` samples and write them with ``synthetic_datalist.json`` (see the module docstring).

    Args:
        network: the trained ``UNet2DModel`` (weights already loaded).
        scheduler: sampling scheduler (``DDIMScheduler`` built from the training scheduler's config).
        output_dir: folder of the synthetic set.
        num_images: number of images.
        batch_size: images per forward pass.
        num_inference_steps: denoising steps.
        seed: base seed (the same seed gives the same images).
        eta: DDIM eta.
        file_format: ``"png"`` (uint8; needs ``intensity_range`` within 0..255) or ``"nii.gz"``.
        intensity_range: the real data's intensity range that ``[-1, 1]`` maps back to (``[0, 255]`` for PNG data).
        prefix: file name prefix.
        device: default the network's device.
        provenance: extra entries recorded in the datalist (checkpoint, source datalist, ...).
        progress: progress bar.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        scheduler: Any,
        output_dir: str | os.PathLike,
        num_images: int = 64,
        batch_size: int = 16,
        num_inference_steps: int = 50,
        seed: int = 0,
        eta: float = 0.0,
        file_format: str = "png",
        intensity_range: Sequence[float] = (0, 255),
        prefix: str = "synth",
        device: str | torch.device | None = None,
        provenance: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if file_format not in FORMATS:
            raise TSDKInputError(f"file_format must be one of {FORMATS}, got {file_format!r}")
        if file_format == "png" and not (0 <= intensity_range[0] < intensity_range[1] <= 255):
            raise TSDKInputError(
                f"intensity_range {list(intensity_range)} does not fit 8-bit PNG; use file_format 'nii.gz'"
            )
        if int(num_images) < 1:
            raise TSDKInputError(f"num_images must be >= 1, got {num_images}")
        self.network, self.scheduler = network, scheduler
        self.output_dir = Path(output_dir)
        self.num_images, self.batch_size = int(num_images), int(batch_size)
        self.num_inference_steps, self.seed, self.eta = int(num_inference_steps), int(seed), float(eta)
        self.file_format, self.intensity_range = file_format, [float(v) for v in intensity_range]
        self.prefix, self.device, self.progress = prefix, device, progress
        self.provenance = dict(provenance or {})

    @property
    def datalist_path(self) -> Path:
        return self.output_dir / SYNTHETIC_DATALIST

    def run(self) -> Path:
        """Sample, write the images (each to a temporary name, then renamed), then the datalist; return its path."""
        out, images_dir = self.output_dir, self.output_dir / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        self.datalist_path.unlink(missing_ok=True)  # from here until the end, no datalist: nothing half-valid
        (out / "quality.json").unlink(missing_ok=True)  # a report on the previous set would be stale
        t0 = time.time()
        names = []
        logger.info(
            "sampling %d images (%s, %d steps, batch %d, seed %d) into %s",
            self.num_images, type(self.scheduler).__name__, self.num_inference_steps, self.batch_size, self.seed, images_dir,
        )
        bar = tqdm(total=self.num_images, desc="synthesis", unit="img", disable=not self.progress)
        for b0 in range(0, self.num_images, self.batch_size):
            n = min(self.batch_size, self.num_images - b0)
            batch = sample_images(
                self.network, self.scheduler, n, batch_size=n, num_inference_steps=self.num_inference_steps,
                seed=self.seed, eta=self.eta, device=self.device, start=b0, progress=False,
            )
            for j in range(n):
                name = f"{self.prefix}_{b0 + j:05d}.{self.file_format}"
                atomic_write_bytes(images_dir / name, encode_image(batch[j], self.file_format, self.intensity_range))
                names.append(name)
            bar.update(n)
            logger.info("sampled %d/%d images (%.1f s)", b0 + n, self.num_images, time.time() - t0)
        bar.close()
        keep = set(names)
        for stale in images_dir.glob(f"{self.prefix}_*"):  # leftovers of an earlier, larger set
            if stale.name not in keep and not stale.name.startswith("."):
                stale.unlink()
        elapsed = time.time() - t0
        datalist = {
            "name": "tsdk_synthetic",
            "description": "images sampled from the tsdk_synthesis diffusion model (unlabelled transfer set)",
            "num_images": self.num_images,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "scheduler": type(self.scheduler).__name__,
            "eta": self.eta,
            "file_format": self.file_format,
            "intensity_range": self.intensity_range,
            "seconds": round(elapsed, 2),
            **{k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.provenance.items()},
            "training": [],
            "validation": [],
            "test": [],
            "unlabeled": [{"image": f"images/{n}", "group": Path(n).name.split(".")[0]} for n in names],
        }
        atomic_write_json(self.datalist_path, datalist)
        logger.info("wrote %s (%d images, %.1f s, %.2f s/image)", self.datalist_path, len(names), elapsed, elapsed / len(names))
        return self.datalist_path
