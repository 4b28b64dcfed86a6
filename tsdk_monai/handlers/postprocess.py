"""``PostprocessChooser``: pick the post-processing on the validation split, before an evaluation scores the test."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["PostprocessChooser"]


class PostprocessChooser:
    """At the evaluator's start (after its checkpoint loader), score the validation images with each post-processing
    of :data:`~tsdk_monai.transforms.POSTPROCESS_CHOICES` (none, the class's largest connected component, that
    component's moment ellipse), choose one for each foreground class, set ``transform.choice``, and write the choice
    and every option's scores (mean over the classes and each class's, ``validation_*_per_class``) and the choice's
    own (``validation_dice_chosen``, ``validation_hd95_chosen``) to ``output_path`` (``postprocess.json``).

    The rule, for each class on its own: among the options whose mean validation Dice of that class is within
    ``dice_tolerance`` of the best one's, the one with the lowest mean validation HD95 of that class (a missed or
    invented class counted as the image diagonal, as the evaluation counts it); the simplest on a tie, ``none`` for a
    class no validation image has. Post-processing changes shapes at their edges and far-off blobs, which HD95 measures
    and Dice barely sees (PSFHS, TS-KD at 80 labels: the largest component cost 0.001 validation Dice and saved 2.3 px
    of validation HD95); and what suits one structure need not suit another (PSFHS, TS-KD at 20 labels, validation
    Dice / HD95: the fetal head's ellipse 0.872 / 17.2 px against 0.865 / 23.1 without; the pubic symphysis without
    post-processing 0.759 / 13.9 against its ellipse's 0.751 / 13.9). The choice is written as one word when every
    class has the same, else as a list in label order.

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
        from tsdk_monai.transforms import POSTPROCESS_CHOICES, ChosenPostprocessd, FastAsDiscrete
        from tsdk_monai.utils import atomic_write_json

        net = engine.network
        net.eval()
        predicted = FastAsDiscrete(argmax=True, to_onehot=self.num_classes)
        onehot = AsDiscrete(to_onehot=self.num_classes)
        options = {c: ChosenPostprocessd("pred", self.num_classes, choice=c, is_onehot=True)
                   for c in POSTPROCESS_CHOICES}
        dice = {c: DiceMetric(include_background=False, ignore_empty=True) for c in options}
        hd95 = {c: MissAwareHausdorffDistanceMetric(include_background=False, percentile=95) for c in options}
        cases = 0
        for batch in self.data_loader:
            image, label = batch["image"].to(next(net.parameters()).device), batch["label"]
            logits = self.inferer(image, net) if self.inferer is not None else net(image)
            for p, y in zip(logits.cpu(), label):
                pred, y = predicted(p), onehot(y)[None]
                scored: list[tuple[torch.Tensor, Any, Any]] = []  # HD95 costs: an output seen before reuses its scores
                for c, post in options.items():
                    out = post({"pred": pred})["pred"][None]
                    seen = next((s for s in scored if torch.equal(s[0], out)), None)
                    if seen is None:
                        seen = (out, dice[c](out, y), hd95[c](out, y))
                        scored.append(seen)
                    else:
                        dice[c].extend(seen[1])
                        hd95[c].extend(seen[2])
                cases += 1
        if cases == 0:
            raise ValueError("PostprocessChooser: the validation split is empty; nothing to choose the post-processing on")
        scores = {c: {"dice": float(dice[c].aggregate().item()), "hd95": float(hd95[c].aggregate().item()),
                      "dice_per_class": dice[c].aggregate(reduction="mean_batch").tolist(),
                      "hd95_per_class": hd95[c].aggregate(reduction="mean_batch").tolist()} for c in options}
        per_class = [self._pick({c: s["dice_per_class"][i] for c, s in scores.items()},
                                {c: s["hd95_per_class"][i] for c, s in scores.items()})
                     for i in range(self.num_classes - 1)]
        self.transform.choice = per_class[0] if len(set(per_class)) == 1 else per_class
        # the choice's own scores: each class's column from its option's per-image scores
        chosen = [float(torch.nanmean(torch.stack([m[p].get_buffer()[:, i] for i, p in enumerate(per_class)], 1)))
                  for m in (dice, hd95)]
        atomic_write_json(self.output_path, {
            "postprocess": self.transform.choice, "keep_largest_component": set(per_class) != {"none"},
            "validation_dice_chosen": chosen[0], "validation_hd95_chosen": chosen[1],
            "validation_dice": {c: s["dice"] for c, s in scores.items()},
            "validation_hd95": {c: s["hd95"] for c, s in scores.items()},
            "validation_dice_per_class": {c: s["dice_per_class"] for c, s in scores.items()},
            "validation_hd95_per_class": {c: s["hd95_per_class"] for c, s in scores.items()},
            "dice_tolerance": self.dice_tolerance, "validation_cases": cases})
        self.logger.info("post-processing chosen on %d validation cases: %s, validation Dice / HD95 %.4f / %.2f "
                         "(each option for every class: %s)", cases, self.transform.choice, *chosen,
                         ", ".join(f"{c} {s['dice']:.4f} / {s['hd95']:.2f}" for c, s in scores.items()))

    def _pick(self, dice: dict[str, float], hd95: dict[str, float]) -> str:
        """One class's choice from its mean validation Dice and HD95 per option (NaN: no image has the class)."""
        known = {c: d for c, d in dice.items() if not math.isnan(d)}
        if not known:
            return "none"
        best = max(known.values())
        eligible = [c for c, d in known.items() if d >= best - self.dice_tolerance]
        # min keeps the first (the simplest) on a tie
        return min(eligible, key=lambda c: math.inf if math.isnan(hd95[c]) else hd95[c])
