"""``PostprocessChooser``: pick the post-processing on the validation split, before an evaluation scores the test."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["PostprocessChooser"]


class PostprocessChooser:
    """At the evaluator's start (after its checkpoint loader), score the validation images with and without keeping
    each class's largest connected component, set ``transform.enabled`` to whichever has the higher mean foreground
    Dice (plain on a tie), and write the choice and both scores to ``output_path`` (``postprocess.json``).

    The choice never sees the test split: it is made on ``data_loader`` (the validation split), with the evaluator's
    own network and inferer.

    Args:
        data_loader: the validation split, preprocessed as the evaluator's data.
        transform: the evaluator's :class:`~tsdk_monai.transforms.ChosenPostprocessd` (one-hot predictions).
        output_path: where to write the choice (atomically).
        num_classes: classes including background.
        inferer: the evaluator's inferer (default: call the network).
    """

    def __init__(self, data_loader: Any, transform: Any, output_path: str, num_classes: int, inferer: Any = None) -> None:
        self.data_loader = data_loader
        self.transform = transform
        self.output_path = Path(output_path)
        self.num_classes = int(num_classes)
        self.inferer = inferer
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    @torch.no_grad()
    def __call__(self, engine: Any) -> None:
        from monai.metrics import DiceMetric
        from monai.transforms import AsDiscrete

        from tsdk_monai.utils import atomic_write_json

        net = engine.network
        net.eval()
        onehot, label_onehot = AsDiscrete(argmax=True, to_onehot=self.num_classes), AsDiscrete(to_onehot=self.num_classes)
        plain, kept = (DiceMetric(include_background=False, ignore_empty=True) for _ in range(2))
        self.transform.enabled = True
        cases = 0
        for batch in self.data_loader:
            image, label = batch["image"].to(next(net.parameters()).device), batch["label"]
            logits = self.inferer(image, net) if self.inferer is not None else net(image)
            for p, y in zip(logits.cpu(), label):
                pred, y = onehot(p)[None], label_onehot(y)[None]
                plain(pred, y)
                kept(self.transform({"pred": pred[0]})["pred"][None], y)
                cases += 1
        if cases == 0:
            raise ValueError("PostprocessChooser: the validation split is empty; nothing to choose the post-processing on")
        scores = {"none": float(plain.aggregate().item()), "largest_component": float(kept.aggregate().item())}
        self.transform.enabled = scores["largest_component"] > scores["none"]
        atomic_write_json(self.output_path, {"keep_largest_component": self.transform.enabled,
                                             "validation_dice": scores, "validation_cases": cases})
        self.logger.info("post-processing chosen on %d validation cases: %s (validation Dice %.4f plain, %.4f with "
                         "the largest component of each class)", cases,
                         "largest component" if self.transform.enabled else "none", scores["none"],
                         scores["largest_component"])
