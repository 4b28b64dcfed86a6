"""Post-processing chosen on the validation split: none, each class's largest connected component (MONAI's
``KeepLargestConnectedComponent``), or that component replaced by its moment ellipse (a shape prior for head- or
organ-like structures, which MONAI lacks)."""

from __future__ import annotations

import os
from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import KeepLargestConnectedComponent, MapTransform

from tsdk_monai.transforms.discrete import channel_argmax

__all__ = ["POSTPROCESS_CHOICES", "POSTPROCESS_DICE_TOLERANCE", "ChosenPostprocessd", "moment_ellipse", "read_postprocess_choice",
           "read_postprocess_record"]

#: the post-processings :class:`~tsdk_monai.handlers.PostprocessChooser` chooses from, simplest first, and their
#: words in reports and model cards
POSTPROCESS_CHOICES = {
    "none": "none",
    "largest_component": "each class's largest connected component",
    "ellipse": "the moment ellipse of each class's largest connected component",
}
#: how much validation Dice :class:`~tsdk_monai.handlers.PostprocessChooser` lets an option give up for a lower
#: validation HD95 (its default; the report words it)
POSTPROCESS_DICE_TOLERANCE = 0.005


def read_postprocess_record(path: str | os.PathLike) -> tuple[str, float | None]:
    """``(choice, dice_tolerance)`` of a ``postprocess.json`` (written by
    :class:`~tsdk_monai.handlers.PostprocessChooser`): one of :data:`POSTPROCESS_CHOICES`, and the Dice tolerance it was
    chosen with (None when not recorded); ``("none", None)`` when the file is absent (a model evaluated before the
    choice existed). A file of tsdk-monai 0.2 (``keep_largest_component`` only) reads as ``largest_component`` or
    ``none``."""
    from tsdk_monai.utils import TSDKInputError, read_json

    if not os.path.isfile(path):
        return "none", None
    record = read_json(path, "not found", "not valid JSON")
    if "postprocess" not in record and "keep_largest_component" in record:
        choice = "largest_component" if record["keep_largest_component"] else "none"
    else:
        choice = record.get("postprocess")
    if choice not in POSTPROCESS_CHOICES:
        raise TSDKInputError(f"{path}: postprocess is {choice!r}, not one of {', '.join(POSTPROCESS_CHOICES)}")
    return choice, record.get("dice_tolerance")


def read_postprocess_choice(path: str | os.PathLike) -> str:
    """The post-processing a ``postprocess.json`` chose (:func:`read_postprocess_record`'s choice)."""
    return read_postprocess_record(path)[0]


def moment_ellipse(mask: torch.Tensor) -> torch.Tensor:
    """The filled ellipse (ellipsoid in 3D) with the centroid and second moments of a boolean ``mask`` (spatial dims
    only): the points ``x`` with ``(x - mean)^T cov^-1 (x - mean) <= d + 2`` (d spatial dims), the set whose uniform
    distribution has that covariance. A mask of fewer than d + 1 pixels is returned as it is."""
    coords = torch.nonzero(mask).to(torch.float64)
    d = mask.ndim
    if coords.shape[0] <= d:
        return mask.clone()
    mean = coords.mean(0)
    centred = coords - mean
    cov = centred.T @ centred / coords.shape[0] + 1e-3 * torch.eye(d, dtype=torch.float64)  # a 1-pixel-wide line
    inv = torch.linalg.inv(cov).to(torch.float32)
    # (x - mean)^T inv (x - mean) summed over pairs of axes, each offset broadcast along its own axis
    offsets = [(torch.arange(s, dtype=torch.float32, device=mask.device) - float(mean[i])).reshape(
        [-1 if j == i else 1 for j in range(d)]) for i, s in enumerate(mask.shape)]
    q = sum(inv[i, j] * offsets[i] * offsets[j] for i in range(d) for j in range(d))
    return q <= d + 2


class ChosenPostprocessd(MapTransform):
    """Apply the post-processing ``choice`` to a prediction (one-hot or argmaxed labels, channel first):

    - ``none``: pass it through;
    - ``largest_component``: keep each foreground class's largest connected component (MONAI's
      ``KeepLargestConnectedComponent``, every class independently);
    - ``ellipse``: that component replaced by its :func:`moment_ellipse`; the ellipse takes background pixels only
      (not another class's), the class's pixels outside it become background; classes in order.

    The choice is set by :class:`~tsdk_monai.handlers.PostprocessChooser` from the validation split before the test
    images are scored, or given (``inference.json`` of an exported bundle bakes it in).

    Args:
        keys: the prediction's key.
        num_classes: classes including background (labels / channels ``1..num_classes-1`` are processed).
        choice: one of :data:`POSTPROCESS_CHOICES`, or the path of a ``postprocess.json`` to read it from.
        is_onehot: the prediction's layout (None: one-hot when it has more than one channel).
        enabled: tsdk-monai 0.2's spelling (bundles exported then): True is ``largest_component``, False ``none``, a
            path is read as ``choice``; given, it overrides ``choice``.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, num_classes: int, choice: str = "none",
                 is_onehot: bool | None = None, enabled: bool | str | None = None) -> None:
        super().__init__(keys)
        if enabled is not None or isinstance(choice, bool):  # 0.4's third positional argument was enabled
            choice = enabled if enabled is not None else choice
            if isinstance(choice, bool):
                choice = "largest_component" if choice else "none"
        if choice not in POSTPROCESS_CHOICES:
            if not str(choice).endswith(".json"):
                from tsdk_monai.utils import TSDKInputError

                raise TSDKInputError(f"post-processing {choice!r}: not one of {', '.join(POSTPROCESS_CHOICES)} "
                                     "(or a postprocess.json to read it from)")
            choice = read_postprocess_choice(choice)
        self.choice = choice
        self.num_classes, self.is_onehot = int(num_classes), is_onehot
        self.lcc = KeepLargestConnectedComponent(applied_labels=list(range(1, self.num_classes)), is_onehot=False,
                                                 independent=True)

    def every_choice(self, labels: torch.Tensor, choices: Sequence[str] = tuple(POSTPROCESS_CHOICES)
                     ) -> dict[str, torch.Tensor]:
        """``choices`` applied to an argmaxed label map (1, *spatial), the largest components found once (the chooser
        scores every option on each validation image)."""
        out = {"none": labels}
        if set(choices) - {"none"}:
            kept = self.lcc(labels.clone())  # MONAI's step zeroes the other components in place
            kept = kept.as_tensor() if isinstance(kept, MetaTensor) else torch.as_tensor(kept)
            out["largest_component"] = kept
        if "ellipse" in choices:
            out["ellipse"] = shaped = kept.clone()
            for c in range(1, self.num_classes):
                own = kept[0] == c
                if not own.any():
                    continue
                shape = moment_ellipse(own)
                shaped[0][own & ~shape] = 0
                shaped[0][shape & (shaped[0] == 0)] = c
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        if self.choice == "none":
            return data
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            values = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
            onehot = self.is_onehot if self.is_onehot is not None else values.shape[0] > 1
            labels = channel_argmax(values) if onehot else values.round().long()
            out = self.every_choice(labels, (self.choice,))[self.choice]
            if onehot:
                out = torch.nn.functional.one_hot(out[0], values.shape[0]).movedim(-1, 0)
            out = out.to(values.dtype)
            d[key] = pred.clone().copy_(out) if isinstance(pred, torch.Tensor) else out.numpy()
        return d
