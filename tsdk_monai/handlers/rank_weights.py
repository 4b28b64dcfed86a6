"""A multi-process check MONAI lacks: every rank saves its own final weights, so a test can compare them."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch.nn as nn
from ignite.engine import Engine, Events

from tsdk_monai.utils import rank_of, save_state_dict, unwrap

__all__ = ["RankWeightsSaver"]


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
        rank = rank_of()
        state = {f"{name}.{k}": v for name, module in self.modules.items() for k, v in unwrap(module).state_dict().items()}
        path = save_state_dict(state, Path(self.save_dir) / f"rank{rank}.pt")
        self.logger.info("rank %d saved its weights (%d tensors) to %s", rank, len(state), path)
        return path
