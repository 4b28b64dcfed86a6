"""Quality of a synthetic transfer set: Fréchet distance in a feature space and a memorisation check.

- Fréchet distance (FID-style) between real and synthetic images, computed by MONAI's ``FIDMetric`` on the pooled
  features of a feature extractor (in the bundle: the LiteMedSAM image encoder, average-pooled to 256 values per
  image). 0 for identical feature distributions; it grows as the sets differ. It is biased by the number of images:
  compare values computed on the same numbers of images.
- Memorisation: for each synthetic image the most similar real training image by Pearson correlation of pixels
  (both resized to ``nn_size``); images above ``copy_threshold`` are flagged as near-copies. The same statistic
  between real images (each against its nearest *other* real image) is reported as the reference.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric
from tqdm import tqdm

from tsdk_monai.metrics.grid import quality_grid
from tsdk_monai.utils import TSDKInputError, atomic_write_bytes, atomic_write_json

__all__ = [
    "load_images",
    "pooled_features",
    "frechet_distance",
    "nearest_neighbours",
    "quality_report",
    "SyntheticQualityReport",
]

logger = logging.getLogger(__name__)


def load_images(
    paths: Sequence[str | os.PathLike], image_size: int, intensity_range: Sequence[float] = (0, 255), progress: bool = True,
    keep_aspect: bool = False,
) -> torch.Tensor:
    """Read images with MONAI's ``LoadImage`` and bring them to ``(N, 1, S, S)`` in ``[0, 1]``.

    RGB(A) images are converted to grey (``tsdk_monai.transforms.EnsureGrey``); intensities are mapped from
    ``intensity_range`` to ``[0, 1]`` and clipped; images are resized to ``S = image_size`` with area interpolation
    (the diffusion model's input size), squashed or, with ``keep_aspect``, letterboxed as the synthesis bundle's
    training images are (:class:`tsdk_monai.transforms.SquareResized`).

    Raises:
        TSDKInputError: a file is missing or unreadable (naming it).
    """
    from tsdk_monai.data import read_array
    from tsdk_monai.transforms import EnsureGrey, letterbox_box, letterbox_pad

    lo, hi = float(intensity_range[0]), float(intensity_range[1])
    grey = EnsureGrey()
    out = []
    for p in tqdm(paths, desc="reading images", unit="img", disable=not progress, leave=False):
        arr = read_array(p, "image")
        if arr.ndim != 3:
            raise TSDKInputError(f"{p}: expected a 2D image, got spatial shape {arr.shape[1:]}")
        if arr.shape[0] not in (1, 2, 3, 4):
            raise TSDKInputError(f"{p}: image has {arr.shape[0]} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
        t = torch.as_tensor(np.asarray(grey(arr), dtype=np.float32))[None]
        box = letterbox_box(*t.shape[-2:], image_size) if keep_aspect else (image_size, image_size, 0, 0)
        t = F.interpolate(t, size=box[:2], mode="area") if t.shape[-2:] != box[:2] else t
        t = ((t - lo) / (hi - lo)).clamp(0, 1)  # then black padding, whatever the data's range
        out.append(letterbox_pad(t, box, image_size))
    if not out:
        raise TSDKInputError("no image to read")
    return torch.cat(out)


@torch.no_grad()
def pooled_features(
    extractor: torch.nn.Module, images: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Features ``(N, F)``: ``extractor`` output averaged over its spatial dimensions.

    Args:
        extractor: module mapping ``(B, C, H, W)`` in ``[0, 1]`` to ``(B, F, h, w)`` (or ``(B, F)``; a tuple's
            first element is used), e.g. ``tsdk_monai.networks.vfm.build_vfm_encoder("litemedsam")``.
        images: ``(N, C, H, W)`` in ``[0, 1]``.
        batch_size: images per forward pass.
        device: default the extractor's device.
    """
    if device is None:
        p = next(iter(extractor.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    extractor.eval()
    feats = []
    for b0 in tqdm(range(0, len(images), batch_size), desc="features", unit="batch", disable=not progress, leave=False):
        out = extractor(images[b0 : b0 + batch_size].to(device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        feats.append(out.flatten(2).mean(-1).double().cpu() if out.ndim > 2 else out.double().cpu())
    return torch.cat(feats)


def frechet_distance(real_features: torch.Tensor, synthetic_features: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``(N, F)`` and ``(M, F)`` feature sets (MONAI ``FIDMetric``).

    Needs at least 2 images per set. Tiny negative values from the matrix square root are clipped to 0.
    """
    if len(real_features) < 2 or len(synthetic_features) < 2:
        raise ValueError("the Fréchet distance needs at least 2 images in each set")
    with warnings.catch_warnings():  # fewer images than features: singular covariances are expected, not an error
        warnings.simplefilter("ignore", category=scipy.linalg.LinAlgWarning)
        warnings.filterwarnings("ignore", message=".*disp.*deprecated", category=DeprecationWarning)  # MONAI's sqrtm call
        value = float(FIDMetric()(synthetic_features.double(), real_features.double()))
    return max(value, 0.0)


def _flat_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    x = images.float()
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    x = x.flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def nearest_neighbours(
    queries: torch.Tensor, references: torch.Tensor, size: int = 64, exclude_self: bool = False, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the most similar reference image by Pearson correlation of pixels.

    Args:
        queries: ``(M, C, H, W)``.
        references: ``(N, C, H', W')`` (resized to ``size`` like the queries, if larger).
        size: comparison resolution.
        exclude_self: queries are the references themselves: ignore the diagonal.
        chunk: queries per matrix product.

    Returns:
        ``(similarity (M,), index (M,))`` with similarity in ``[-1, 1]`` (1: same image up to brightness/contrast).
    """
    ref = _flat_unit(references, size)
    sims, idxs = [], []
    for q0 in range(0, len(queries), chunk):
        s = _flat_unit(queries[q0 : q0 + chunk], size) @ ref.T
        if exclude_self:
            rows = torch.arange(s.shape[0])
            s[rows, rows + q0] = -math.inf
        v, i = s.max(1)
        sims.append(v)
        idxs.append(i)
    return torch.cat(sims), torch.cat(idxs)


def _stats(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {
        "min": float(x.min()), "mean": float(x.mean()), "median": float(x.median()),
        "p95": float(torch.quantile(x, 0.95)), "max": float(x.max()),
    }


def quality_report(
    real: torch.Tensor,
    synthetic: torch.Tensor,
    feature_extractor: torch.nn.Module,
    real_names: Sequence[str] | None = None,
    synthetic_names: Sequence[str] | None = None,
    copy_threshold: float = 0.95,
    nn_size: int = 64,
    max_real_for_fid: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    noise_baseline: bool = False,
) -> dict[str, Any]:
    """Compute the quality report of ``synthetic`` against ``real``.

    Args:
        real: ``(N, C, H, W)`` real training images in ``[0, 1]``.
        synthetic: ``(M, C, H, W)`` synthetic images in ``[0, 1]``.
        feature_extractor: see :func:`pooled_features`.
        real_names, synthetic_names: names recorded per image (default: indices).
        copy_threshold: correlation above which a synthetic image counts as a near-copy of a real one.
        nn_size: resolution of the memorisation comparison.
        max_real_for_fid: use at most this many real images (a seeded random subset) for the Fréchet distance;
            the memorisation check always uses all of them.
        seed: seed of that subset.
        batch_size, device, progress: for the feature extraction.
        noise_baseline: also report the distance of a trivially bad generator: as many images of Gaussian pixel
            noise with the real images' mean and std (clipped to ``[0, 1]``) as there are synthetic images.

    Returns:
        ``{"frechet_distance", "num_real", "num_real_fid", "num_synthetic", "memorisation": {...}}``, with one
        entry per synthetic image in ``memorisation["per_image"]`` (nearest real image, similarity, copy flag).
    """
    if len(real) < 2 or len(synthetic) < 2:
        raise TSDKInputError(f"the quality report needs at least 2 real and 2 synthetic images (got {len(real)}, {len(synthetic)})")
    real_names = list(real_names) if real_names is not None else [str(i) for i in range(len(real))]
    synthetic_names = list(synthetic_names) if synthetic_names is not None else [str(i) for i in range(len(synthetic))]
    fid_real = real
    if max_real_for_fid is not None and len(real) > max_real_for_fid:
        pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:max_real_for_fid]
        fid_real = real[pick.sort().values]
    logger.info("Fréchet distance: features of %d real and %d synthetic images", len(fid_real), len(synthetic))
    f_real = pooled_features(feature_extractor, fid_real, batch_size, device, progress)
    f_syn = pooled_features(feature_extractor, synthetic, batch_size, device, progress)
    fd = frechet_distance(f_real, f_syn)
    baseline = None
    if noise_baseline:
        g = torch.Generator().manual_seed(seed)
        noise = (real.mean() + real.std() * torch.randn(synthetic.shape, generator=g)).clamp(0, 1)
        fd_noise = frechet_distance(f_real, pooled_features(feature_extractor, noise, batch_size, device, progress))
        baseline = {
            "description": "Gaussian pixel noise with the real images' mean and std, as many images as synthetic ones",
            "frechet_distance": fd_noise,
            "synthetic_to_noise_ratio": fd / fd_noise if fd_noise > 0 else None,
        }
        logger.info("noise baseline: Fréchet distance %.4g (synthetic %.4g)", fd_noise, fd)

    sim, idx = nearest_neighbours(synthetic, real, size=nn_size)
    copies = sim >= copy_threshold
    real_sim, _ = nearest_neighbours(real, real, size=nn_size, exclude_self=True) if len(real) > 1 else (sim, idx)
    per_image = [
        {"image": synthetic_names[i], "nearest_real": real_names[int(idx[i])], "similarity": round(float(sim[i]), 5),
         "copy": bool(copies[i])}
        for i in range(len(synthetic))
    ]
    report = {
        "frechet_distance": fd,
        "feature_dim": int(f_real.shape[1]),
        "covariance_full_rank": bool(min(len(fid_real), len(synthetic)) > f_real.shape[1]),
        "num_real": len(real),
        "num_real_fid": len(fid_real),
        "num_synthetic": len(synthetic),
        "noise_baseline": baseline,
        "memorisation": {
            "similarity": f"Pearson correlation of pixels at {nn_size}x{nn_size}",
            "copy_threshold": float(copy_threshold),
            "num_copies": int(copies.sum()),
            "copy_fraction": float(copies.float().mean()),
            "synthetic_to_real": _stats(sim),
            "real_to_other_real": _stats(real_sim),
            "per_image": per_image,
        },
    }
    logger.info(
        "Fréchet distance %.4g; %d/%d synthetic images flagged as near-copies (similarity >= %.3f; max %.3f; real-real "
        "nearest-neighbour median %.3f)", fd, report["memorisation"]["num_copies"], len(synthetic), copy_threshold,
        float(sim.max()), report["memorisation"]["real_to_other_real"]["median"],
    )
    return report


class SyntheticQualityReport:
    """Write ``quality.json`` and ``quality_grid.png`` for a synthetic set (beside ``synthetic_datalist.json``).

    Args:
        real_datalist: the real datalist; the real images are its ``splits`` (the images the model trained on).
        synthetic_datalist: ``synthetic_datalist.json`` written by ``DiffusionSampler`` (its ``unlabeled`` split).
        feature_extractor: module for the Fréchet distance (the VFM encoder in the bundle).
        output_dir: where to write; default the synthetic datalist's folder.
        image_size: both sets are compared at this size (the diffusion model's).
        keep_aspect: letterbox the images to that size (as the bundle trained with ``keep_aspect``) instead of
            squashing them.
        intensity_range: the real data's intensity range, mapped to ``[0, 1]`` (synthetic PNGs use 0..255).
        splits: real splits to compare against (never ``test``).
        copy_threshold, nn_size, max_real_for_fid, seed, batch_size, device, noise_baseline: see
            :func:`quality_report`.
        grid_columns, grid_rows: layout of the PNG grid.
    """

    def __init__(
        self,
        real_datalist: str | os.PathLike,
        synthetic_datalist: str | os.PathLike,
        feature_extractor: torch.nn.Module,
        output_dir: str | os.PathLike | None = None,
        image_size: int = 64,
        intensity_range: Sequence[float] = (0, 255),
        splits: Sequence[str] = ("training", "unlabeled"),
        copy_threshold: float = 0.95,
        nn_size: int = 64,
        max_real_for_fid: int | None = 256,
        seed: int = 0,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        grid_columns: int = 8,
        grid_rows: int = 2,
        progress: bool = True,
        noise_baseline: bool = False,
        keep_aspect: bool = False,
    ) -> None:
        self.real_datalist, self.synthetic_datalist = Path(real_datalist), Path(synthetic_datalist)
        self.feature_extractor = feature_extractor
        self.output_dir = Path(output_dir) if output_dir is not None else self.synthetic_datalist.parent
        self.image_size, self.intensity_range, self.splits = int(image_size), list(intensity_range), list(splits)
        self.kwargs = dict(
            copy_threshold=copy_threshold, nn_size=nn_size, max_real_for_fid=max_real_for_fid, seed=seed,
            batch_size=batch_size, device=device, progress=progress, noise_baseline=noise_baseline,
        )
        self.grid_columns, self.grid_rows, self.progress = grid_columns, grid_rows, progress
        self.keep_aspect = bool(keep_aspect)

    def run(self) -> dict[str, Any]:
        """Compute the report; write ``quality.json`` and ``quality_grid.png`` atomically; return the report."""
        from PIL import Image

        from tsdk_monai.engines.diffusion import diffusion_training_cases
        from tsdk_monai.data import load_split

        real_paths = [c["image"] for c in diffusion_training_cases(self.real_datalist, self.splits)]
        syn_cases = load_split(self.synthetic_datalist, "unlabeled")
        syn_paths = [c["image"] for c in syn_cases]
        real = load_images(real_paths, self.image_size, self.intensity_range, self.progress, self.keep_aspect)
        # synthetic files hold [0, 255] (PNG) or the data's range (NIfTI, written by DiffusionSampler)
        syn_range = (0, 255) if all(p.lower().endswith(".png") for p in syn_paths) else self.intensity_range
        synthetic = load_images(syn_paths, self.image_size, syn_range, self.progress, self.keep_aspect)
        report = quality_report(
            real, synthetic, self.feature_extractor,
            real_names=[str(Path(p).name) for p in real_paths], synthetic_names=[str(Path(p).name) for p in syn_paths],
            **self.kwargs,
        )
        report.update(
            real_datalist=str(self.real_datalist.absolute()), real_splits=self.splits,
            synthetic_datalist=str(self.synthetic_datalist.absolute()), image_size=self.image_size,
            feature_extractor=type(self.feature_extractor).__name__,
        )
        n = self.grid_columns * self.grid_rows
        _, nn_idx = nearest_neighbours(synthetic[:n], real, size=self.kwargs["nn_size"])
        pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(int(self.kwargs["seed"])))[:n]
        grid = quality_grid(real[pick], synthetic, real[nn_idx], columns=self.grid_columns, rows=self.grid_rows)
        import io

        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        grid_path = atomic_write_bytes(self.output_dir / "quality_grid.png", buf.getvalue())
        report["grid"] = {"path": grid_path.name, "sections": ["real (random)", "synthetic", "nearest real of each synthetic"]}
        atomic_write_json(self.output_dir / "quality.json", report)
        logger.info("wrote %s and %s", self.output_dir / "quality.json", grid_path)
        return report
