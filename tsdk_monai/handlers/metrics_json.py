"""``MetricsJSONSaver``: per-case and mean metrics of an evaluation run as one JSON file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from tsdk_monai.utils import atomic_write_json

__all__ = ["MetricsJSONSaver"]


def _finite(x: float) -> float | None:
    return None if (x is None or math.isnan(x) or math.isinf(x)) else float(x)


class MetricsJSONSaver:
    """Write ``{"mean": {...}, "per_class_mean": {...}, "cases": [{"image": ..., metric: ...}]}`` at the end of a run.

    MONAI's ``MetricsSaver`` writes CSV files; the pipeline and the model zoo read one JSON. Attach it to an evaluator
    whose metric handlers use ``save_details=True``; the file names come from each batch's image meta data.

    Args:
        output_path: where to write the JSON (atomically).
        metric_names: names of the metrics in ``engine.state.metrics``/``metric_details`` to save.
        class_names: names of the classes the metrics' columns stand for (background excluded, as the metrics are
            computed with ``include_background=False``).
        image_key: the key of the image in each decollated item.
        distance_metric: the evaluation's :class:`~tsdk_monai.metrics.MissAwareHausdorffDistanceMetric`, whose counts
            of missed and invented structures (scored as the image diagonal) go into the file as
            ``empty_predictions`` and ``invented``.
    """

    def __init__(self, output_path: str, metric_names: Sequence[str], class_names: Sequence[str] | None = None,
                 image_key: str = "image", distance_metric: Any = None) -> None:
        self.output_path = Path(output_path)
        self.metric_names = list(metric_names)
        self.class_names = list(class_names) if class_names is not None else None
        self.image_key = image_key
        self.distance_metric = distance_metric
        self._names: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        for item in batch if isinstance(batch, list) else [batch]:
            meta = getattr(item[self.image_key], "meta", {})
            names = meta.get("filename_or_obj", "")
            self._names.extend(names if isinstance(names, (list, tuple)) else [names])

    def _write(self, engine: Any) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        result: dict[str, Any] = {"mean": {}, "per_class_mean": {}, "cases": [{"image": str(n)} for n in self._names]}
        for name in self.metric_names:
            result["mean"][name] = _finite(float(engine.state.metrics[name]))
            if name not in details:
                continue
            d = torch.as_tensor(details[name]).float().reshape(len(self._names), -1)
            cols = self.class_names or [str(i + 1) for i in range(d.shape[1])]
            result["per_class_mean"][name] = {c: _finite(torch.nanmean(d[:, i]).item()) for i, c in enumerate(cols)}
            for case, row in zip(result["cases"], d):
                case[name] = {c: _finite(v) for c, v in zip(cols, row.tolist())}
        if self.distance_metric is not None:
            result["empty_predictions"] = int(self.distance_metric.empty_predictions)
            result["invented"] = int(self.distance_metric.invented)
        atomic_write_json(self.output_path, result)
