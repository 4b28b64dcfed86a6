"""Checkpoint handlers: ``AtomicCheckpointSaver`` (never a half-written file) and ``CheckedCheckpointLoader`` (errors
that name the file).

MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)`` and deletes the previous checkpoint
*before* writing the next one: a run killed while saving leaves a truncated ``checkpoint_epoch=N.pt`` (or
``model.pt``) that looks complete, and no older checkpoint to resume from. This subclass writes each file to a
temporary name beside it (``.NAME.XXXX.tmp``), flushes it to disk, renames it into place, and only then deletes the
checkpoint it replaces.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from tsdk_monai.utils import TSDKInputError, check_state_dict, read_checkpoint, replacing

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "CheckedCheckpointLoader"]

logger = logging.getLogger(__name__)


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes ``.NAME.XXXX.tmp`` then renames it to ``NAME``, and defers removals.

    Args:
        dirname: the folder.
        filename: a fixed file name for every save (``model.pt``), as MONAI's saver supports; ``None``: ignite's names.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=str(dirname), require_empty=False, atomic=True, create_dir=True)
        self.filename = filename
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        import ignite.distributed as idist

        saved = self.filename or filename
        super().__call__(checkpoint, saved, metadata)
        pending, self._pending_removal = self._pending_removal, []
        if idist.get_rank() == self.save_on_rank:  # as DiskSaver.remove: only the saving rank touches the files
            for old in pending:  # the replaced checkpoint goes only once its successor is complete
                if old != saved:
                    (Path(self.dirname) / old).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self._pending_removal.append(self.filename or filename)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            func(checkpoint, f, **self.kwargs)


def _stale_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.glob(".*.pt.*.tmp") if p.is_file()] if folder.is_dir() else []


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) writing through :class:`AtomicDiskSaver`.

    Every checkpoint (interval, key-metric, final) is complete under its final name or absent; a kill at any moment
    leaves at worst a hidden ``.NAME.XXXX.tmp`` file, removed when the next run attaches its saver.

    Interval checkpoints older than the ones kept (``n_saved``) are removed even when an earlier, interrupted process
    of the same run wrote them.

    With ``save_key_metric``, the saver is also a stateful object (``state_dict``, and MONAI's ``load_state_dict``):
    put it in a resume checkpoint's ``save_dict``/``load_dict`` and a resumed run keeps the best score so far, so it
    overwrites the best model (``key_metric_filename``) only with a better one, not with its first validation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(self.save_dir, getattr(ckpt.save_handler, "filename", None))

    def attach(self, engine: Any) -> None:
        import ignite.distributed as idist

        if idist.get_rank() == 0:
            for p in _stale_temporaries(Path(self.save_dir)):
                logger.info("removing %s, left by an interrupted save", p)
                p.unlink(missing_ok=True)
        super().attach(engine)

    def interval_completed(self, engine: Any) -> None:
        super().interval_completed(engine)
        self._remove_superseded()

    def _remove_superseded(self) -> None:
        """Remove interval checkpoints of this saver's name older than every one it keeps. ignite's ``n_saved`` counts
        only the files this process wrote: a resumed run would keep the checkpoints of the run it resumed."""
        import glob

        import ignite.distributed as idist

        ckpt = self._interval_checkpoint
        if ckpt.n_saved is None or not ckpt._saved or idist.get_rank() != 0:
            return
        oldest = ckpt._saved[0]  # ignite keeps them sorted by priority: the epoch or iteration
        stem = oldest.filename.rsplit("=", 1)[0] + "="
        for f in Path(self.save_dir).glob(glob.escape(stem) + "*." + ckpt.ext):
            number = f.name[len(stem):-len(ckpt.ext) - 1]
            if number.isdigit() and int(number) < oldest.priority:
                logger.info("removing %s, superseded by %s", f.name, oldest.filename)
                f.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        """The key-metric checkpoint's record of what it saved (score, file name), as ignite's ``Checkpoint``."""
        if self._key_metric_checkpoint is None:
            raise ValueError("state_dict: this saver has no key-metric checkpoint (save_key_metric=False)")
        return self._key_metric_checkpoint.state_dict()


class CheckedCheckpointLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` (same arguments; it reads with ``torch.load(..., weights_only=True)``) whose
    errors name the file: missing, not a complete checkpoint, refused because it needs pickle to load (it could run
    code), without an object this run restores, or with weights that do not fit the network. For checkpoints a user
    brings (``model.pt`` of a model zoo) and for resuming. The file is checked first (read by
    :func:`~tsdk_monai.utils.read_checkpoint`, names and shapes compared), then MONAI loads it."""

    def __call__(self, engine: Any) -> None:
        import torch

        path = Path(self.load_path)
        checkpoint = read_checkpoint(path, "checkpoint")
        if not isinstance(checkpoint, Mapping):
            raise TSDKInputError(f"{path}: not a checkpoint (got {type(checkpoint).__name__})")
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and first not in checkpoint:  # a plain state dict, as MONAI accepts it
            checkpoint = {first: checkpoint}
        missing = [k for k in self.load_dict if k not in checkpoint]
        if missing:
            raise TSDKInputError(f"{path}: does not hold every object this run restores (missing {missing}); written "
                                 "by another version of the bundle?")
        if self.strict and self.strict_shape:
            for k, obj in self.load_dict.items():
                if isinstance(obj, torch.nn.Module):
                    check_state_dict(obj, checkpoint[k], path, f"its '{k}'")
        super().__call__(engine)
