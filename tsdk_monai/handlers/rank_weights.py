"""A multi-process check MONAI lacks: every rank saves its own final weights, so a test can compare them."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from tsdk_monai.utils import atomic_write_bytes

__all__ = ["RankWeightsSaver"]


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else module


class RankWeightsSaver:
    """When training completes, write ``save_dir/rank{R}.pt`` on every rank ``R``: the state dicts of ``modules``
    (``DistributedDataParallel`` unwrapped, on the CPU) as one flat dict ``{"<name>.<key>": tensor}``.

    Data-parallel ranks must end with identical weights (same initial weights, all-reduced gradients, same
    optimiser); comparing the files checks that nothing (an unsynchronised buffer, a module left out of DDP, a
    rank-dependent random draw) lets them drift. Unlike the checkpoints, which only rank 0 writes, this handler
    writes on every rank by design. An empty ``save_dir`` (the bundles' default) disables it: ``attach`` does nothing.

    Args:
        save_dir: folder of the ``rank{R}.pt`` files (created), or ``""`` to disable.
        modules: the modules to save, by name (e.g. ``{"network": @network, "loss": @loss}``), or one module
            (saved under the name ``network``).
    """

    def __init__(self, save_dir: str | os.PathLike | None, modules: Mapping[str, nn.Module] | nn.Module) -> None:
        self.save_dir = str(save_dir or "")
        self.modules = {"network": modules} if isinstance(modules, nn.Module) else dict(modules)
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if self.save_dir:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> Path:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = {
            f"{name}.{k}": v.detach().cpu().clone()
            for name, module in self.modules.items()
            for k, v in _unwrap(module).state_dict().items()
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        path = atomic_write_bytes(Path(self.save_dir) / f"rank{rank}.pt", buf.getvalue())
        self.logger.info("rank %d saved its weights (%d tensors) to %s", rank, len(state), path)
        return path
