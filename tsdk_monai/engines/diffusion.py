"""Diffusion training on MONAI engines with diffusers models and schedulers.

The iteration is MONAI's ``SupervisedTrainer`` iteration with MONAI's ``DiffusionPrepareBatch`` (draws the
noise and the timesteps; the target is the noise, or the velocity for ``v_prediction``) and
:class:`DiffusersInferer`, which noises the clean batch with a diffusers scheduler and runs a diffusers
``UNet2DModel``. So every MONAI/ignite handler (CheckpointSaver/Loader, StatsHandler, TensorBoard, EMA,
progress bar, ...) works on :class:`DiffusionTrainer` as on any MONAI trainer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from monai.engines import DiffusionPrepareBatch, SupervisedTrainer, VPredictionPrepareBatch
from monai.inferers import Inferer

from tsdk_monai.utils import TSDKInputError, load_state_dict_strict, read_checkpoint

__all__ = [
    "DiffusersInferer",
    "DiffusionTrainer",
    "MinSNRLoss",
    "diffusion_training_cases",
    "load_weights",
]

logger = logging.getLogger(__name__)


class DiffusersInferer(Inferer):
    """Noise a clean batch with a diffusers scheduler and predict the noise with a diffusers UNet.

    The diffusers twin of ``monai.inferers.DiffusionInferer``'s training call: it takes the keyword arguments
    ``noise`` and ``timesteps`` that MONAI's ``DiffusionPrepareBatch`` produces.

    Args:
        scheduler: a diffusers scheduler with ``add_noise`` (``DDPMScheduler``).
    """

    def __init__(self, scheduler: Any) -> None:
        super().__init__()
        self.scheduler = scheduler

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., Any], noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            inputs: clean images ``(B, C, H, W)`` in ``[-1, 1]``.
            network: ``UNet2DModel`` (or a DDP wrapper of one).
            noise: ``(B, C, H, W)`` standard normal noise.
            timesteps: ``(B,)`` integer timesteps in ``[0, num_train_timesteps)``.

        Returns:
            the network's prediction ``(B, C, H, W)`` (noise or velocity, as the scheduler's prediction type).
        """
        noisy = self.scheduler.add_noise(inputs, noise, timesteps)
        return network(noisy, timesteps, return_dict=False)[0]


class _RecordTimesteps:
    """Keeps the timesteps of the last batch a ``DiffusionPrepareBatch`` drew, for :class:`MinSNRLoss`."""

    last_timesteps: torch.Tensor | None = None

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        self.last_timesteps = super().get_timesteps(images)  # type: ignore[misc]
        return self.last_timesteps


class _EpsilonPrepareBatch(_RecordTimesteps, DiffusionPrepareBatch):
    pass


class _VelocityPrepareBatch(_RecordTimesteps, VPredictionPrepareBatch):
    pass


class MinSNRLoss(torch.nn.Module):
    """Mean squared error with each image weighted by the Min-SNR-gamma rule (Hang et al., ICCV 2023).

    The weight of an image noised at timestep ``t`` is ``min(SNR(t), gamma) / SNR(t)`` for noise prediction and
    ``min(SNR(t), gamma) / (SNR(t) + 1)`` for v-prediction, with ``SNR = alpha_bar / (1 - alpha_bar)``: the
    nearly clean timesteps (fine texture) no longer dominate the gradient, and the mid-noise ones that form the
    global layout get their share. The same weighting as diffusers' ``snr_gamma`` training scripts.

    Args:
        scheduler: the training ``DDPMScheduler`` (``alphas_cumprod``, ``prediction_type``).
        gamma: the SNR cap (5 in the paper).
        prepare_batch: the trainer's prepare-batch object, which records the timesteps of the batch.
    """

    def __init__(self, scheduler: Any, gamma: float, prepare_batch: _RecordTimesteps) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {gamma}")
        from diffusers.training_utils import compute_snr  # here: only trainers with Min-SNR pay for its import

        self.compute_snr = compute_snr
        self.scheduler, self.gamma, self.prepare_batch = scheduler, float(gamma), prepare_batch

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``(B,)`` loss weights of the timesteps."""
        snr = self.compute_snr(self.scheduler, timesteps)  # diffusers' SNR(t) of its snr_gamma training scripts
        capped = snr.clamp(max=self.gamma)
        return capped / snr if self.scheduler.config.prediction_type == "epsilon" else capped / (snr + 1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.prepare_batch.last_timesteps
        if t is None or t.shape[0] != pred.shape[0]:
            raise RuntimeError("MinSNRLoss needs the timesteps of this batch from the trainer's prepare_batch")
        per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return (self.weights(t) * per_image).mean()


class DiffusionTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` wired for DDPM training of a diffusers ``UNet2DModel``.

    Each iteration draws ``noise ~ N(0, I)`` and ``t ~ U{0..T-1}`` per image, noises the batch with
    ``scheduler.add_noise`` and regresses the network output on the noise (``prediction_type="epsilon"``) or
    on the velocity (``"v_prediction"``) with the mean squared error. The engine output holds ``image``
    (the clean batch ``(B, C, H, W)``), ``label`` (the target), ``pred`` and ``loss``.

    Args:
        device: device to train on.
        max_epochs: epochs to run.
        train_data_loader: loader of dict batches with an ``image`` key holding ``(B, C, H, W)`` in ``[-1, 1]``.
        network: ``UNet2DModel`` (optionally wrapped by DDP).
        optimizer: optimizer of the network's parameters.
        scheduler: diffusers ``DDPMScheduler`` (its ``num_train_timesteps`` and ``prediction_type`` are used).
        loss_function: default ``torch.nn.MSELoss()``, or :class:`MinSNRLoss` when ``snr_gamma`` is given.
        inferer: default ``DiffusersInferer(scheduler)``.
        snr_gamma: weight the loss per image by Min-SNR-gamma (e.g. 5); ``None``: plain MSE.
        kwargs: every other ``SupervisedTrainer`` argument (``train_handlers``, ``amp``, ``epoch_length``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loss_function: Callable | None = None,
        inferer: Inferer | None = None,
        snr_gamma: float | None = None,
        **kwargs: Any,
    ) -> None:
        num_train_timesteps = int(scheduler.config.num_train_timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            prepare_batch = _EpsilonPrepareBatch(num_train_timesteps=num_train_timesteps)
        elif prediction_type == "v_prediction":
            prepare_batch = _VelocityPrepareBatch(scheduler=scheduler, num_train_timesteps=num_train_timesteps)
        else:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
        if loss_function is None:
            loss_function = torch.nn.MSELoss() if snr_gamma is None else MinSNRLoss(scheduler, snr_gamma, prepare_batch)
        elif snr_gamma is not None:
            raise ValueError("give either loss_function or snr_gamma, not both")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            prepare_batch=prepare_batch,
            inferer=inferer if inferer is not None else DiffusersInferer(scheduler),
            **kwargs,
        )
        self.noise_scheduler = scheduler


def diffusion_training_cases(
    datalist: str | os.PathLike, splits: Sequence[str] = ("training", "unlabeled"), key: str = "image"
) -> list[dict[str, str]]:
    """The images a diffusion model may learn from: ``[{"image": path}, ...]`` from the given splits.

    Labels and groups are dropped (the model is unconditional). The ``test`` split is refused: no stage may
    see it. Empty splits are allowed as long as the result is not empty.

    Raises:
        TSDKInputError: ``test`` requested, or no image in the splits (naming the datalist).
    """
    from tsdk_monai.data import load_split

    if isinstance(splits, str):
        splits = [splits]
    if "test" in splits:
        raise TSDKInputError(f"{datalist}: the diffusion model may not be trained on the 'test' split")
    cases = [{key: c["image"]} for s in splits for c in load_split(datalist, s, allow_empty=True)]
    if not cases:
        raise TSDKInputError(f"{datalist}: no image in the splits {', '.join(splits)} to train the diffusion model on")
    return cases


def load_weights(network: torch.nn.Module, path: str | os.PathLike, key: str | Sequence[str] = ("ema", "model")) -> str:
    """Load a state dict saved by ``CheckpointSaver`` (or a plain state dict) into ``network``.

    Args:
        network: the module to load into.
        path: checkpoint file, read with ``torch.load(..., weights_only=True)``.
        key: the entry to use, or entries to try in order (default: the EMA weights when present, else the
            model's); a plain state dict is used as it is.

    Returns:
        the key that was loaded (``""`` for a plain state dict).

    Raises:
        TSDKInputError: missing or unreadable file, or no matching entry (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise TSDKInputError(f"{path}: checkpoint not found (train the synthesis bundle first, or set ckpt_path)")
    ckpt = read_checkpoint(path, "checkpoint")
    keys = [key] if isinstance(key, str) else list(key)
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, used = ckpt, ""
    else:
        used = next((k for k in keys if isinstance(ckpt, dict) and k in ckpt), None)
        if used is None:
            have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise TSDKInputError(f"{path}: checkpoint has none of the entries {keys} (has {have})")
        state = ckpt[used]
    load_state_dict_strict(network, state, path, "the")  # a mismatch: another image_size or network_def
    logger.info("loaded %s weights from %s", used or "plain", path)
    return used
