"""Post-processing chosen on the validation split, for each class: none, its largest connected component (MONAI's
``KeepLargestConnectedComponent``), or that component replaced by its moment ellipse (a shape prior for head- or
organ-like structures, which MONAI lacks)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import KeepLargestConnectedComponent, MapTransform

from tsdk_monai.transforms.discrete import channel_argmax

__all__ = ["POSTPROCESS_CHOICES", "POSTPROCESS_DICE_TOLERANCE", "ChosenPostprocessd", "count_postprocess",
           "describe_postprocess", "moment_ellipse", "read_postprocess_choice"]

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

#: a choice: one of :data:`POSTPROCESS_CHOICES` for every class, or one per foreground class (classes 1, 2, ...)
Choice = str | list[str]


def _checked(choice: Any, where: str) -> Choice:
    """``choice`` if it is a known choice or a non-empty list of them, else a :class:`TSDKInputError` naming ``where``."""
    from tsdk_monai.utils import TSDKInputError

    choices = choice if isinstance(choice, (list, tuple)) else [choice]
    bad = [c for c in choices if not isinstance(c, str) or c not in POSTPROCESS_CHOICES]
    if bad or not choices:
        raise TSDKInputError(f"{where}: post-processing {choice!r}: not one of {', '.join(POSTPROCESS_CHOICES)} "
                             "(or a list of them, one per foreground class)")
    return list(choice) if isinstance(choice, (list, tuple)) else choice


def read_postprocess_choice(path: str | os.PathLike) -> Choice:
    """The post-processing that ``postprocess.json`` (written by :class:`~tsdk_monai.handlers.PostprocessChooser`)
    chose: one of :data:`POSTPROCESS_CHOICES` for every class, or a list of them, one per foreground class; ``"none"``
    when the file is absent (a model evaluated before the choice existed). A file of tsdk-monai 0.2
    (``keep_largest_component`` only) reads as ``largest_component`` or ``none``."""
    from tsdk_monai.utils import read_json

    if not os.path.isfile(path):
        return "none"
    record = read_json(path, "not found", "not valid JSON")
    if "postprocess" not in record and "keep_largest_component" in record:
        return "largest_component" if record["keep_largest_component"] else "none"
    return _checked(record.get("postprocess"), str(path))


def describe_postprocess(choice: Choice, class_names: Sequence[str] | None = None) -> str:
    """A choice in words (reports, model cards): one choice for every class as :data:`POSTPROCESS_CHOICES` words it;
    a per-class one as ``per class (name: words, ...)`` in label order (``class 1``, ... without names)."""
    if isinstance(choice, str):
        return POSTPROCESS_CHOICES[choice]
    names = list(class_names or [])
    short = {"none": "none", "largest_component": "its largest connected component",
             "ellipse": "its largest connected component's moment ellipse"}
    return "per class (" + ", ".join(f"{names[i] if i < len(names) else f'class {i + 1}'}: {short[c]}"
                                     for i, c in enumerate(choice)) + ")"


def count_postprocess(choices: Sequence[Choice], class_names: Sequence[str] | None = None) -> str:
    """How many models made each choice, in words (``words N; ... of M``): one-word choices first, in
    :data:`POSTPROCESS_CHOICES` order, then the per-class ones; empty for no choice."""
    counts = Counter(c if isinstance(c, str) else tuple(c) for c in choices)
    order = [c for c in POSTPROCESS_CHOICES if counts[c]] + sorted(c for c in counts if not isinstance(c, str))
    return "; ".join(f"{describe_postprocess(c if isinstance(c, str) else list(c), class_names)} {counts[c]}"
                     for c in order) + (f" of {len(choices)}" if choices else "")


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
    """Apply the post-processing ``choice`` to a prediction (one-hot or argmaxed labels, channel first), to every
    foreground class or, given a list, to each its own:

    - ``none``: pass the class through;
    - ``largest_component``: keep the class's largest connected component (MONAI's
      ``KeepLargestConnectedComponent``, every class independently);
    - ``ellipse``: that component replaced by its :func:`moment_ellipse`; the ellipse takes background pixels only
      (not another class's), the class's pixels outside it become background; classes in order.

    The choice is set by :class:`~tsdk_monai.handlers.PostprocessChooser` from the validation split before the test
    images are scored, or given (``inference.json`` of an exported bundle bakes it in).

    Args:
        keys: the prediction's key.
        num_classes: classes including background (labels / channels ``1..num_classes-1`` are processed).
        choice: one of :data:`POSTPROCESS_CHOICES` for every class, a list of them (one per foreground class, in
            label order), or the path of a ``postprocess.json`` to read it from.
        is_onehot: the prediction's layout (None: one-hot when it has more than one channel).
        enabled: tsdk-monai 0.2's spelling (bundles exported then): True is ``largest_component``, False ``none``, a
            path is read as ``choice``; given, it overrides ``choice``.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, num_classes: int, choice: Choice = "none",
                 is_onehot: bool | None = None, enabled: bool | str | None = None) -> None:
        super().__init__(keys)
        if enabled is not None or isinstance(choice, bool):  # 0.4's third positional argument was enabled
            choice = enabled if enabled is not None else choice
            if isinstance(choice, bool):
                choice = "largest_component" if choice else "none"
        if isinstance(choice, str) and choice not in POSTPROCESS_CHOICES and choice.endswith(".json"):
            choice = read_postprocess_choice(choice)
        self.num_classes, self.is_onehot = int(num_classes), is_onehot
        self.choice = _checked(choice, "ChosenPostprocessd")

    @property
    def choice(self) -> Choice:
        """The choice: one for every class, or a list with one per foreground class (settable)."""
        return self._choice

    @choice.setter
    def choice(self, choice: Choice) -> None:
        per_class = [choice] * (self.num_classes - 1) if isinstance(choice, str) else list(choice)
        if len(per_class) != self.num_classes - 1:
            from tsdk_monai.utils import TSDKInputError

            raise TSDKInputError(f"post-processing {choice!r}: {len(per_class)} choices for {self.num_classes - 1} "
                                 "foreground classes")
        self._choice, self.per_class = choice, per_class
        kept = [c for c, p in enumerate(per_class, start=1) if p != "none"]
        self.lcc = KeepLargestConnectedComponent(applied_labels=kept, is_onehot=False, independent=True) if kept else None

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Each class's choice applied to an argmaxed label map (1, *spatial)."""
        kept = self.lcc(labels)
        kept = kept.as_tensor() if isinstance(kept, MetaTensor) else torch.as_tensor(kept)
        out = kept.clone()
        for c, choice in enumerate(self.per_class, start=1):
            own = kept[0] == c
            if choice != "ellipse" or not own.any():
                continue
            shape = moment_ellipse(own)
            out[0][own & ~shape] = 0
            out[0][shape & (out[0] == 0)] = c
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        if self.lcc is None:
            return data
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            values = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
            onehot = self.is_onehot if self.is_onehot is not None else values.shape[0] > 1
            out = self._labels(channel_argmax(values) if onehot else values.round().long())
            if onehot:
                out = torch.nn.functional.one_hot(out[0], values.shape[0]).movedim(-1, 0)
            out = out.to(values.dtype)
            d[key] = pred.clone().copy_(out) if isinstance(pred, torch.Tensor) else out.numpy()
        return d
