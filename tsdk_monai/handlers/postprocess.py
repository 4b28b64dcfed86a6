"""``PostprocessChooser``: pick the post-processing on the validation split, before an evaluation scores the test."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["PostprocessChooser"]


class PostprocessChooser:
    """At the evaluator's start (after its checkpoint loader), score the validation images with each post-processing
    of :data:`~tsdk_monai.transforms.POSTPROCESS_CHOICES` (none, each class's largest connected component, that
    component's moment ellipse), set ``transform.choice``, and write the choice and every option's scores to
    ``output_path`` (``postprocess.json``).

    The rule: among the options whose mean foreground validation Dice is within ``dice_tolerance`` of the best one's,
    the one with the lowest mean validation HD95 (a missed or invented class counted as the image diagonal, as the
    evaluation counts it); the simplest on a tie. Post-processing changes shapes at their edges and far-off blobs,
    which HD95 measures and Dice barely sees (PSFHS, TS-KD at 80 labels: the largest component cost 0.001 validation
    Dice and saved 2.3 px of validation HD95).

    The choice never sees the test split: it is made on ``data_loader`` (the validation split), with the evaluator's
    own network and inferer.

    Args:
        data_loader: the validation split, preprocessed as the evaluator's data.
        transform: the evaluator's :class:`~tsdk_monai.transforms.ChosenPostprocessd` (one-hot predictions).
        output_path: where to write the choice (atomically).
        num_classes: classes including background.
        inferer: the evaluator's inferer (default: call the network).
        dice_tolerance: how much validation Dice an option may give up for a lower HD95 (default
            :data:`~tsdk_monai.transforms.POSTPROCESS_DICE_TOLERANCE`, 0.005).
    """

    def __init__(self, data_loader: Any, transform: Any, output_path: str, num_classes: int, inferer: Any = None,
                 dice_tolerance: float | None = None) -> None:
        from tsdk_monai.transforms import POSTPROCESS_DICE_TOLERANCE

        self.data_loader = data_loader
        self.transform = transform
        self.output_path = Path(output_path)
        self.num_classes = int(num_classes)
        self.inferer = inferer
        self.dice_tolerance = float(POSTPROCESS_DICE_TOLERANCE if dice_tolerance is None else dice_tolerance)
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    @torch.no_grad()
    def __call__(self, engine: Any) -> None:
        from monai.metrics import DiceMetric
        from monai.transforms import AsDiscrete

        from tsdk_monai.metrics import MissAwareHausdorffDistanceMetric
        from tsdk_monai.transforms import POSTPROCESS_CHOICES, ChosenPostprocessd
        from tsdk_monai.transforms.discrete import channel_argmax
        from tsdk_monai.utils import atomic_write_json

        net = engine.network
        net.eval()
        onehot = AsDiscrete(to_onehot=self.num_classes)
        post = ChosenPostprocessd("pred", self.num_classes)
        dice = {c: DiceMetric(include_background=False, ignore_empty=True) for c in POSTPROCESS_CHOICES}
        hd95 = {c: MissAwareHausdorffDistanceMetric(include_background=False, percentile=95)
                for c in POSTPROCESS_CHOICES}
        cases = 0
        for batch in self.data_loader:
            image, label = batch["image"].to(next(net.parameters()).device), batch["label"]
            logits = self.inferer(image, net) if self.inferer is not None else net(image)
            for p, y in zip(logits.cpu(), label):
                outs, y = post.every_choice(channel_argmax(p)), onehot(y)[None]
                scored: list[tuple[torch.Tensor, Any, Any]] = []  # HD95 costs: an output seen before reuses its scores
                for c in POSTPROCESS_CHOICES:
                    seen = next((s for s in scored if torch.equal(s[0], outs[c])), None)
                    if seen is None:
                        out = onehot(outs[c])[None]
                        seen = (outs[c], dice[c](out, y), hd95[c](out, y))
                        scored.append(seen)
                    else:
                        dice[c].extend(seen[1])
                        hd95[c].extend(seen[2])
                cases += 1
        if cases == 0:
            raise ValueError("PostprocessChooser: the validation split is empty; nothing to choose the post-processing on")
        scores = {c: {"dice": float(dice[c].aggregate().item()), "hd95": float(hd95[c].aggregate().item())}
                  for c in POSTPROCESS_CHOICES}
        best = max(s["dice"] for s in scores.values())
        eligible = [c for c in POSTPROCESS_CHOICES if scores[c]["dice"] >= best - self.dice_tolerance]
        # min keeps the first (the simplest) on a tie
        self.transform.choice = min(eligible, key=lambda c: scores[c]["hd95"])
        atomic_write_json(self.output_path, {
            "postprocess": self.transform.choice, "keep_largest_component": self.transform.choice != "none",
            "validation_dice": {c: s["dice"] for c, s in scores.items()},
            "validation_hd95": {c: s["hd95"] for c, s in scores.items()},
            "dice_tolerance": self.dice_tolerance, "validation_cases": cases})
        self.logger.info("post-processing chosen on %d validation cases: %s (validation Dice / HD95: %s)", cases,
                         self.transform.choice,
                         ", ".join(f"{c} {s['dice']:.4f} / {s['hd95']:.2f}" for c, s in scores.items()))
