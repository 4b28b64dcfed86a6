"""Mixed precision for the iterations we write ourselves (``DistillationTrainer``), on any device type.

MONAI's engines take ``amp`` and ``amp_kwargs`` (e.g. ``{"dtype": torch.bfloat16}``) and run
``torch.autocast("cuda", **amp_kwargs)`` with a CUDA ``GradScaler``: the bundles' ``amp``/``amp_dtype`` switches
reach MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` unchanged and act on GPU runs. Our own iterations
use the same two arguments but autocast on the engine's device type, so a bfloat16 step also runs on the CPU
(which is how the tests exercise the switch), and scale the loss only for float16 on CUDA (bfloat16 has float32's
exponent range and needs no loss scaling).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from monai.engines import Trainer
from monai.engines.workflow import Workflow

__all__ = ["amp_dtype", "autocast", "grad_scaler", "backward_and_step", "AmpTrainer"]


def amp_dtype(device: torch.device | str, amp_kwargs: Mapping[str, Any] | None = None) -> torch.dtype:
    """The autocast dtype: ``amp_kwargs["dtype"]`` (a ``torch.dtype`` or its name), else autocast's default for the
    device type (float16 on CUDA, bfloat16 on the CPU)."""
    dtype = (amp_kwargs or {}).get("dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    return dtype


def autocast(device: torch.device | str, enabled: bool, amp_kwargs: Mapping[str, Any] | None = None):
    """``torch.autocast`` on ``device``'s type with ``amp_kwargs`` when ``enabled``, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    kwargs = dict(amp_kwargs or {})
    kwargs["dtype"] = amp_dtype(device, kwargs)
    return torch.autocast(torch.device(device).type, **kwargs)


def grad_scaler(device: torch.device | str, enabled: bool, amp_kwargs: Mapping[str, Any] | None = None):
    """A ``torch.amp.GradScaler`` for float16 autocast on CUDA; ``None`` otherwise (no loss scaling needed)."""
    device = torch.device(device)
    if enabled and device.type == "cuda" and amp_dtype(device, amp_kwargs) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def backward_and_step(engine: Any) -> None:
    """Backward of ``engine.state.output["loss"]`` and the optimiser step, through ``engine.scaler`` when it has one
    (float16 on CUDA, see :func:`grad_scaler`); fires MONAI's ``BACKWARD_COMPLETED`` between the two."""
    from monai.engines.utils import IterationEvents
    from monai.utils.enums import CommonKeys as Keys

    loss = engine.state.output[Keys.LOSS]
    if engine.scaler is not None:
        engine.scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()


class AmpTrainer(Trainer):
    """Base of the trainers whose iteration we write ourselves (``DistillationTrainer``, ``SSLTrainer``): their
    ``_iteration`` uses :func:`autocast` and :func:`backward_and_step`, so ``run`` sets ``scaler`` by
    :func:`grad_scaler` instead of ``Trainer.run``'s CUDA-only ``GradScaler``."""

    def run(self) -> None:  # type: ignore[override]
        self.scaler = grad_scaler(self.state.device, self.amp, self.amp_kwargs)
        Workflow.run(self)
