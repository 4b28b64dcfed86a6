"""HD95 that counts misses, the metrics file that reports them, and the paired bootstrap of the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric

from tsdk_monai.handlers import MetricsJSONSaver
from tsdk_monai.metrics import MissAwareHausdorffDistanceMetric
from tsdk_monai.stats import paired_bootstrap


def _onehot(mask: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """(H, W) labels -> (1, C, H, W) one-hot."""
    return torch.nn.functional.one_hot(mask.long(), num_classes).permute(2, 0, 1)[None].float()


def _masks():
    gt = torch.zeros(16, 12)
    gt[2:6, 2:6] = 1  # class 1 present
    pred_hit = torch.zeros(16, 12)
    pred_hit[3:7, 2:6] = 1  # class 1 found, shifted by one row
    pred_invent = pred_hit.clone()
    pred_invent[10:12, 8:10] = 2  # class 2 predicted but not in the label
    return gt, pred_hit, pred_invent


def test_found_structures_score_as_in_monai():
    gt, hit, _ = _masks()
    ours = MissAwareHausdorffDistanceMetric(include_background=False, percentile=95)
    ref = HausdorffDistanceMetric(include_background=False, percentile=95)
    a, b = ours(_onehot(hit), _onehot(gt)), ref(_onehot(hit), _onehot(gt))
    assert torch.isclose(a[0, 0], b[0, 0]) and a[0, 0] > 0
    assert torch.isnan(a[0, 1]) and torch.isnan(b[0, 1])  # class 2 in neither: nothing to measure
    assert ours.empty_predictions == 0 and ours.invented == 0


def test_a_miss_and_an_invention_score_the_image_diagonal():
    gt, _, invent = _masks()
    metric = MissAwareHausdorffDistanceMetric(include_background=False, percentile=95)
    d = metric(_onehot(torch.zeros(16, 12)), _onehot(gt))  # class 1 missed
    diagonal = math.hypot(16, 12)
    assert d[0, 0].item() == pytest.approx(diagonal)
    d = metric(_onehot(invent), _onehot(gt))  # class 2 invented
    assert d[0, 1].item() == pytest.approx(diagonal)
    # MONAI: inf for both, so one miss turns the whole mean into inf
    ref = HausdorffDistanceMetric(include_background=False)
    assert ref(_onehot(torch.zeros(16, 12)), _onehot(gt))[0, 0].isinf()
    assert ref(_onehot(invent), _onehot(gt))[0, 1].isinf()
    assert (metric.empty_predictions, metric.invented) == (1, 1)
    assert metric.aggregate().item() > 0
    metric.reset()
    assert (metric.empty_predictions, metric.invented) == (0, 0)


def test_metrics_file_counts_the_misses(tmp_path):
    """A real ignite evaluator: the mean HD95 includes the missed case, and metrics.json says how many there were."""
    from ignite.engine import Engine, Events
    from monai.data import MetaTensor

    gt, hit, _ = _masks()
    batches = [(hit, gt, "a.png"), (torch.zeros(16, 12), gt, "b.png")]

    def step(engine, batch):
        pred, label, name = batch
        return [{"pred": _onehot(pred)[0], "label": _onehot(label)[0],
                 "image": MetaTensor(torch.zeros(1, 16, 12), meta={"filename_or_obj": name})}]

    engine = Engine(step)
    engine.state.batch = None
    metric = MissAwareHausdorffDistanceMetric(include_background=False, percentile=95)
    IgniteMetricHandler(metric_fn=metric, output_transform=lambda out: ([o["pred"] for o in out],
                                                                         [o["label"] for o in out]),
                        save_details=True).attach(engine, "test_hd95")
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(e.state, "batch", e.state.output))
    MetricsJSONSaver(str(tmp_path / "metrics.json"), ["test_hd95"], ["one", "two"], distance_metric=metric).attach(engine)
    engine.run(batches)
    out = json.loads((tmp_path / "metrics.json").read_text())
    assert out["empty_predictions"] == 1 and out["invented"] == 0
    assert [c["image"] for c in out["cases"]] == ["a.png", "b.png"]
    assert out["cases"][1]["test_hd95"]["one"] == pytest.approx(math.hypot(16, 12))
    assert out["mean"]["test_hd95"] > out["cases"][0]["test_hd95"]["one"]


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.8, size=200)
    a = b + 0.05 + rng.normal(0, 0.02, size=200)
    r = paired_bootstrap(a, b, n_boot=2000)
    assert r["low"] < r["mean"] < r["high"] and r["low"] > 0.04 and r["high"] < 0.06 and r["n"] == 200
    same = paired_bootstrap(b, b + rng.normal(0, 0.02, size=200), n_boot=2000)
    assert same["low"] < 0 < same["high"]
    with_nan = paired_bootstrap([0.5, float("nan"), 0.7], [0.4, 0.3, 0.6], n_boot=100)
    assert with_nan["n"] == 2 and with_nan["mean"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 2.0])


class _FixedLogits(torch.nn.Module):
    """A network whose prediction is a given label map (class 1 where ``mask`` is 1), whatever the image."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", torch.stack([1 - mask, mask]).float()[None] * 10)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1) + self.w


@pytest.mark.parametrize("stray_blob", [True, False])
def test_postprocessing_is_chosen_on_validation(tmp_path, stray_blob):
    """A stray blob far from the structure: the largest component helps on validation, so it is chosen and applied
    to the evaluated predictions; without one it does not help and is not chosen."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from tsdk_monai.handlers import PostprocessChooser
    from tsdk_monai.transforms import ChosenPostprocessd, read_postprocess_choice

    label = torch.zeros(24, 24)
    label[4:12, 4:12] = 1
    pred = label.clone()
    if stray_blob:
        pred[18:21, 18:21] = 1
    data = [{"image": torch.zeros(1, 1, 24, 24), "label": label[None, None]}]
    net = _FixedLogits(pred)
    chosen = ChosenPostprocessd("pred", num_classes=2, is_onehot=True)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=net,
        postprocessing=Compose([Activationsd("pred", softmax=True),
                                AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=2), chosen]),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[PostprocessChooser(data, chosen, str(tmp_path / "postprocess.json"), num_classes=2)],
    )
    evaluator.run()
    record = json.loads((tmp_path / "postprocess.json").read_text())
    assert record["keep_largest_component"] is stray_blob and record["validation_cases"] == 1
    assert read_postprocess_choice(tmp_path / "postprocess.json") is stray_blob
    assert not read_postprocess_choice(tmp_path / "absent.json")
    if stray_blob:
        assert record["validation_dice"]["largest_component"] == pytest.approx(1.0)
        assert record["validation_dice"]["none"] < 1.0
    assert evaluator.state.metrics["dice"] == pytest.approx(1.0)  # the evaluation used the choice
    # the inference layout (argmaxed labels) of an exported bundle: the baked choice
    labels = {"pred": pred[None].clone()}
    out = ChosenPostprocessd("pred", num_classes=2, enabled=True, is_onehot=False)(labels)["pred"]
    assert torch.equal(torch.as_tensor(out)[0], label)
