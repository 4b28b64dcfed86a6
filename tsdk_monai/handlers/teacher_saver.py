"""Handlers MONAI lacks: saving the LoRA teacher's artefacts, and finding the latest resume checkpoint."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch.nn as nn
from ignite.engine import Engine, Events

from tsdk_monai.utils import atomic_write_json, rank_of

__all__ = ["TeacherSaver", "latest_checkpoint"]


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "") -> str:
    """The newest ``{prefix}*epoch=N.pt`` / ``*iteration=N.pt`` checkpoint written by MONAI's ``CheckpointSaver``
    in ``folder``, or ``""`` when there is none (a bundle then disables its ``CheckpointLoader``).

    A file that is not a complete ``torch.save`` archive (cut short by a kill during a non-atomic save) is skipped
    with a warning, so a resumed run starts from the newest complete checkpoint.
    """
    import zipfile

    folder = Path(folder)
    if not folder.is_dir():
        return ""
    found: list[tuple[int, Path]] = []
    for f in folder.iterdir():
        m = re.fullmatch(re.escape(prefix) + r".*?(?:epoch|iteration)=(\d+)\.pt", f.name)
        if m and f.is_file():
            found.append((int(m.group(1)), f))
    for _, f in sorted(found, reverse=True):
        if zipfile.is_zipfile(f):
            return str(f)
        logging.getLogger(__name__).warning("%s: not a complete checkpoint (interrupted save?); skipped", f)
    return ""


class TeacherSaver:
    """Save a :class:`~tsdk_monai.networks.LoRASegTeacher`'s artefacts with :func:`~tsdk_monai.networks.save_teacher`
    (peft adapter in safetensors, decoder in safetensors, ``teacher.json``, merged ``model.pt``).

    Attach it to the validation evaluator with ``save_on="best"``: it saves when the evaluator's key metric
    improves; or to the trainer with ``save_on="final"``: it saves when training completes. With ``save_on="best"``
    it also writes the metric of every validation to ``save_dir/val_history.json`` (``{"metric": name, "epochs":
    [{"epoch": e, "value": v}, ...]}``; the report plots it). Its best metric and history are kept in
    ``state_dict()``, so put it in the resume checkpoint's ``save_dict`` and a resumed run does not overwrite a
    better teacher with a worse one. Only rank 0 writes under ``torch.distributed``.

    Args:
        save_dir: the teacher folder (e.g. ``$@ckpt_dir + '/teacher'``).
        network: the teacher (DDP-wrapped or not).
        save_on: ``"best"`` or ``"final"``.
        metric_name: the metric to compare; default the engine's key metric.
    """

    def __init__(self, save_dir: str, network: nn.Module, save_on: str = "best", metric_name: str | None = None) -> None:
        if save_on not in ("best", "final"):
            raise ValueError(f"save_on must be 'best' or 'final', got {save_on!r}")
        self.save_dir = save_dir
        self.network = network
        self.save_on = save_on
        self.metric_name = metric_name
        self.best_metric = -float("inf")
        self.best_epoch = -1
        self.history: list[dict[str, float]] = []
        self.logger = logging.getLogger(__name__)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": float(self.best_metric), "best_epoch": int(self.best_epoch), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric = float(state.get("best_metric", -float("inf")))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.history = list(state.get("history", []))

    def attach(self, engine: Engine) -> None:
        if self.save_on == "best":
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        else:
            engine.add_event_handler(Events.COMPLETED, self.save)

    def epoch_completed(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"TeacherSaver: metric {name!r} not found in the engine's metrics {list(engine.state.metrics)}")
        value = float(engine.state.metrics[name])
        self.history = [h for h in self.history if h["epoch"] < engine.state.epoch]
        self.history.append({"epoch": int(engine.state.epoch), "value": value})
        if value > self.best_metric:
            self.best_metric, self.best_epoch = value, int(engine.state.epoch)
            self.save(engine)
        if rank_of() == 0:  # atomic_write_json makes the folder
            atomic_write_json(Path(self.save_dir) / "val_history.json", {"metric": name, "epochs": self.history})

    def save(self, engine: Engine | None = None) -> None:
        from tsdk_monai.networks.teacher_io import save_teacher

        if rank_of() != 0:
            return
        path = save_teacher(self.network, self.save_dir)
        self.logger.info(
            "saved teacher to %s%s", path,
            f" (best {self.metric_name or 'key metric'} {self.best_metric:.4f} at epoch {self.best_epoch})"
            if self.save_on == "best" else "",
        )
