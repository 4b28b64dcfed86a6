"""Autocast on any device type.

MONAI's engines take ``amp`` and ``amp_kwargs`` (e.g. ``{"dtype": torch.bfloat16}``) and run
``torch.autocast("cuda", **amp_kwargs)`` with a CUDA ``GradScaler``: the bundles' ``amp``/``amp_dtype`` switches
reach MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` unchanged and act on GPU runs. :func:`autocast` takes
the same two arguments on the tensors' own device type, so the distillation's teacher and student forwards
(:class:`~tsdk_monai.inferers.AutocastInferer`) also run in bfloat16 on the CPU, which is how the tests exercise
the switch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

__all__ = ["amp_dtype", "autocast"]


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
