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


def _ellipse(shape=(48, 48), centre=(24, 24), radii=(12, 8)) -> torch.Tensor:
    yy, xx = torch.meshgrid(*(torch.arange(float(s)) for s in shape), indexing="ij")
    return (((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1).float()


def _prediction(case: str, label: torch.Tensor) -> torch.Tensor:
    pred = label.clone()
    if case == "stray_blob":  # far from the structure: the largest component removes it
        pred[2:5, 2:5] = 1
    elif case == "ragged":  # two bites out of the edge, opposite each other: the moment ellipse fills both
        pred[14:18, 19:23] = 0
        pred[30:34, 25:29] = 0
    return pred


@pytest.mark.parametrize("case, expected", [("stray_blob", "largest_component"), ("clean", "none"),
                                            ("ragged", "ellipse")])
def test_postprocessing_is_chosen_on_validation(tmp_path, case, expected):
    """Among the options within 0.005 validation Dice of the best, the lowest validation HD95 is chosen and applied to
    the evaluated predictions: a stray blob far from the structure, the largest component; a clean prediction, none
    (the simplest on a tie: the ellipse of an ellipse drawn on pixels is not exact); a ragged edge, the ellipse."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from tsdk_monai.handlers import PostprocessChooser
    from tsdk_monai.transforms import ChosenPostprocessd, read_postprocess_choice

    label = _ellipse()
    pred = _prediction(case, label)
    data = [{"image": torch.zeros(1, 1, 48, 48), "label": label[None, None]}]
    chosen = ChosenPostprocessd("pred", num_classes=2, is_onehot=True)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=_FixedLogits(pred),
        postprocessing=Compose([Activationsd("pred", softmax=True),
                                AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=2), chosen]),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[PostprocessChooser(data, chosen, str(tmp_path / "postprocess.json"), num_classes=2)],
    )
    evaluator.run()
    record = json.loads((tmp_path / "postprocess.json").read_text())
    assert record["postprocess"] == expected == chosen.choice and record["validation_cases"] == 1
    assert record["keep_largest_component"] is (expected != "none")
    assert read_postprocess_choice(tmp_path / "postprocess.json") == expected
    dice, hd95 = record["validation_dice"], record["validation_hd95"]
    assert set(dice) == set(hd95) == {"none", "largest_component", "ellipse"}
    assert dice[expected] >= max(dice.values()) - 0.005
    assert hd95[expected] == min(h for c, h in hd95.items() if dice[c] >= max(dice.values()) - 0.005)
    assert evaluator.state.metrics["dice"] == pytest.approx(dice[expected])  # the evaluation used the choice
    if case != "clean":
        assert hd95[expected] < hd95["none"]
    # the inference layout (argmaxed labels) of an exported bundle, with the baked choice: the same prediction
    onehot = ChosenPostprocessd("pred", num_classes=2, choice=expected, is_onehot=True)(
        {"pred": torch.stack([1 - pred, pred])})["pred"]
    labels = ChosenPostprocessd("pred", num_classes=2, choice=expected, is_onehot=False)({"pred": pred[None]})["pred"]
    assert torch.equal(torch.as_tensor(labels)[0], torch.as_tensor(onehot)[1])


def test_postprocess_choice_files_and_old_spellings(tmp_path):
    """postprocess.json of tsdk-monai 0.2 (keep_largest_component only) and the ``enabled`` switch of bundles exported
    then still mean what they meant; an unknown choice is refused naming the file; no file means none."""
    from tsdk_monai.transforms import ChosenPostprocessd, read_postprocess_choice
    from tsdk_monai.utils import TSDKInputError

    assert read_postprocess_choice(tmp_path / "absent.json") == "none"
    for keep, choice in ((True, "largest_component"), (False, "none")):
        (tmp_path / "old.json").write_text(json.dumps({"keep_largest_component": keep}))
        assert read_postprocess_choice(tmp_path / "old.json") == choice
        assert ChosenPostprocessd("pred", 2, enabled=keep).choice == choice
        assert ChosenPostprocessd("pred", 2, enabled=str(tmp_path / "old.json")).choice == choice
    assert ChosenPostprocessd("pred", 2, True).choice == "largest_component"  # 0.4's positional enabled
    with pytest.raises(TSDKInputError, match="'elipse': not one of none, largest_component, ellipse"):
        ChosenPostprocessd("pred", 2, choice="elipse")  # a typo is not silently "none"
    (tmp_path / "bad.json").write_text(json.dumps({"postprocess": "convex_hull"}))
    with pytest.raises(TSDKInputError, match="bad.json.*convex_hull"):
        read_postprocess_choice(tmp_path / "bad.json")
    label = _ellipse()
    pred = _prediction("stray_blob", label)
    out = ChosenPostprocessd("pred", num_classes=2, enabled=True, is_onehot=False)({"pred": pred[None]})["pred"]
    assert torch.equal(torch.as_tensor(out)[0], label)


def test_moment_ellipse_redraws_ellipses_and_keeps_other_classes():
    """The ellipse of an ellipse's moments is that ellipse (2D and 3D, IoU > 0.98); a mask too small for moments is
    kept; in a two-class prediction the ellipse grows into background only, never over the other class."""
    from tsdk_monai.transforms import ChosenPostprocessd, moment_ellipse

    def iou(a, b):
        return float((a & b).sum() / (a | b).sum())

    label = _ellipse().bool()
    assert iou(moment_ellipse(label), label) > 0.98
    zz, yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(24.0), torch.arange(24.0), indexing="ij")
    ball = ((zz - 10) / 6) ** 2 + ((yy - 12) / 9) ** 2 + ((xx - 12) / 5) ** 2 <= 1
    assert iou(moment_ellipse(ball), ball) > 0.98
    dot = torch.zeros(4, 4, dtype=torch.bool)
    dot[1, 2] = True
    assert torch.equal(moment_ellipse(dot), dot)
    # class 1 with a bite taken by class 2: class 2 keeps every pixel, class 1 is still about its ellipse
    labels = _ellipse().long()
    labels[22:27, 16:20] = 2
    out = ChosenPostprocessd("pred", num_classes=3, choice="ellipse", is_onehot=False)({"pred": labels[None]})["pred"]
    out = torch.as_tensor(out)[0]
    assert torch.equal(out == 2, labels == 2)
    assert iou(out == 1, _ellipse().bool() & (labels != 2)) > 0.9


def test_fast_as_discrete_matches_monai():
    """FastAsDiscreted gives MONAI's AsDiscreted output (values, dtype, shape, MetaTensor affine) for argmax with and
    without one-hot, per-key flags and numpy input, with argmax as max(dim).indices."""
    import numpy as np
    from monai.data import MetaTensor
    from monai.transforms import AsDiscrete, AsDiscreted

    from tsdk_monai.transforms import FastAsDiscrete, FastAsDiscreted

    torch.manual_seed(0)
    logits = MetaTensor(torch.randn(3, 32, 24), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    label = MetaTensor(torch.randint(0, 3, (1, 32, 24)).float())
    for kwargs in ({"argmax": [True, False], "to_onehot": 3}, {"argmax": [True, False]}, {"argmax": False}):
        ours = FastAsDiscreted(["pred", "label"], **kwargs)({"pred": logits, "label": label})
        theirs = AsDiscreted(["pred", "label"], **kwargs)({"pred": logits, "label": label})
        for key in ("pred", "label"):
            assert torch.equal(ours[key].as_tensor(), theirs[key].as_tensor()) and ours[key].dtype == theirs[key].dtype
            assert torch.equal(ours[key].affine, theirs[key].affine)
    array = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    ours, theirs = FastAsDiscrete(argmax=True)(array), AsDiscrete(argmax=True)(array)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs)) and np.asarray(ours).shape == (1, 8, 8)
