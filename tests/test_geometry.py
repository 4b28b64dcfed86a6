"""One geometry for every bundle: squashed or letterboxed (``keep_aspect``) squares in training, undone at inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, Resized
from PIL import Image

from tsdk_monai.driver import RunDirs, Schedule, method_stages
from tsdk_monai.driver.methods import overlay_stages
from tsdk_monai.inferers import ResizeSliceInferer
from tsdk_monai.transforms import SquareResized, letterbox_box

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SHAPES = [(60, 90), (90, 60), (33, 77), (64, 64), (127, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_letterbox_box_is_where_square_resized_puts_the_image(shape):
    img = torch.ones(1, *shape)
    out = SquareResized("image", 32, keep_aspect=True)({"image": img})["image"]
    assert tuple(out.shape) == (1, 32, 32)
    h, w, top, left = letterbox_box(*shape, 32)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    assert bool((out[0][inside] > 0.99).all()) and bool((out[0][~inside] == 0).all())
    assert max(h, w) == 32 and abs(h / w - shape[0] / shape[1]) < 0.05


def test_square_resized_without_keep_aspect_is_monai_resized():
    img = torch.rand(1, 40, 70)
    ours = SquareResized(["image", "label"], 32, mode=["bilinear", "nearest"])({"image": img, "label": img > 0.5})
    theirs = Resized(["image", "label"], (32, 32), mode=["bilinear", "nearest"])({"image": img, "label": img > 0.5})
    for k in ("image", "label"):
        torch.testing.assert_close(torch.as_tensor(ours[k]), torch.as_tensor(theirs[k]))


def test_label_keeps_its_classes_and_pads_with_background():
    lab = torch.zeros(1, 50, 100)
    lab[0, 10:40, 20:80] = 2
    out = SquareResized("label", 40, keep_aspect=True, mode="nearest")({"label": lab})["label"]
    assert set(torch.unique(out).tolist()) == {0.0, 2.0}
    h, w, top, left = letterbox_box(50, 100, 40)
    assert bool((out[0, :top] == 0).all()) and bool((out[0, top + h:] == 0).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_inferer_feeds_the_training_geometry_and_undoes_it(shape):
    """The network sees exactly what SquareResized makes in training; its output comes back at the image's size,
    cropped to the image (a network that echoes its input returns the input, up to the two resizes)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, shape[0]), torch.linspace(0, 1, shape[1]), indexing="ij")
    img = (0.3 + 0.5 * yy + 0.2 * xx)[None, None]  # smooth and nowhere 0: the padding shows as 0
    seen = []

    def echo(x):
        seen.append(x)
        return x

    out = ResizeSliceInferer(32, keep_aspect=True)(img, echo)
    trained = SquareResized("image", 32, keep_aspect=True)({"image": img[0]})["image"]
    torch.testing.assert_close(seen[0][0], torch.as_tensor(trained).as_subclass(torch.Tensor))
    assert tuple(out.shape) == tuple(img.shape)
    assert float((out - img).abs().max()) < 0.05  # no padding (0) leaks into the image's own pixels


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_inferer_runs_the_network_on_a_plain_tensor_and_keeps_the_metadata(keep_aspect):
    """A MetaTensor batch reaches the network as a plain tensor (every op on a MetaTensor pays for its metadata) and
    the logits come back a MetaTensor with the batch's metadata, equal to the network's run on the MetaTensor."""
    from monai.data import MetaTensor

    img = MetaTensor(torch.rand(1, 1, 40, 24), meta={"filename_or_obj": "a.png"}, applied_operations=[{"op": 1}])
    img.is_batch = True
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    seen = []

    def network(x):
        seen.append(type(x))
        return net(x)

    inferer = ResizeSliceInferer(16, keep_aspect=keep_aspect)
    out = inferer(img, network)
    assert seen == [torch.Tensor]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.png" and out.is_batch
    assert out.applied_operations == img.applied_operations
    torch.testing.assert_close(out.as_tensor(), inferer(img, net).as_tensor())  # the same values as before
    assert type(inferer(img.as_tensor(), network)) is torch.Tensor


def test_inferer_letterboxes_3d_slices_and_rejects_a_non_square_size():
    vol = torch.rand(1, 1, 40, 24, 3)
    out = ResizeSliceInferer(16, keep_aspect=True)(vol, lambda x: torch.cat([x, 1 - x], 1))
    assert tuple(out.shape) == (1, 2, 40, 24, 3)
    with pytest.raises(ValueError, match="square"):
        ResizeSliceInferer((32, 16), keep_aspect=True)


def _configs():
    for f in sorted(BUNDLES.glob("*/configs/*.json")):
        if f.name != "metadata.json":
            yield f


def _targets(x, found):
    if isinstance(x, dict):
        if "_target_" in x:
            found.append(x)
        for v in x.values():
            _targets(v, found)
    elif isinstance(x, list):
        for v in x:
            _targets(v, found)
    return found


def test_every_bundle_resizes_through_the_one_geometry():
    """No bundle squashes on its own: every resize to the network's square is SquareResized with the bundle's
    keep_aspect, and every resizing inferer takes the same knob (a bundle that forgot it would silently train or
    infer in another geometry than the rest)."""
    resizes = 0
    for f in _configs():
        cfg = json.loads(f.read_text())
        if f.parts[-3] == "tsdk_ssl":
            cfg.pop("augment", None)  # random resized crops: their aspect jitter is the augmentation, not the geometry
        for t in _targets(cfg, []):
            assert t["_target_"] not in ("Resized", "Resize"), f"{f}: a bare {t['_target_']}"
            if t["_target_"].endswith(("SquareResized", "ResizeSliceInferer")):
                assert t.get("keep_aspect") == "@keep_aspect", f"{f}: {t}"
                resizes += 1
    assert resizes >= 10
    for b in ("tsdk_teacher", "tsdk_synthesis", "tsdk_distill", "tsdk_ssl", "tsdk_student"):
        assert json.loads((BUNDLES / b / "configs" / "train.json").read_text())["keep_aspect"] is False, b
    for b in ("tsdk_teacher", "tsdk_student"):
        assert json.loads((BUNDLES / b / "configs" / "inference.json").read_text())["keep_aspect"] is False, b


def _png(path: Path, shape) -> str:
    rng = np.random.default_rng(0)
    Image.fromarray((64 + 128 * rng.random(shape)).astype(np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("bundle,item,overrides", [
    ("tsdk_teacher", "train#deterministic_transforms", {}),
    ("tsdk_synthesis", "preprocessing", {}),
    ("tsdk_distill", "preprocessing", {}),
    ("tsdk_distill", "preprocessing", {"teacher_image_size": 48}),
    ("tsdk_distill", "validate#preprocessing", {}),
    ("tsdk_ssl", "preprocessing", {}),
    ("tsdk_student", "$@load_image + @resize", {}),
])
def test_bundle_training_images_are_letterboxed(bundle, item, overrides, tmp_path):
    """Each bundle's own (deterministic) preprocessing, parsed from its config, letterboxes a 40 x 80 image to
    32 x 32 with keep_aspect (16 rows of black padding, split evenly) and squashes it without; the distillation's
    teacher copy follows."""
    image = _png(tmp_path / "a.png", (40, 80))
    label = tmp_path / "l.png"
    Image.fromarray(np.pad(np.ones((20, 40), np.uint8), ((10, 10), (20, 20)))).save(label)
    for keep in (False, True):
        p = ConfigParser()
        p.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        p.update({"num_classes": 2, "image_size": 32, "keep_aspect": keep, "dataset_dir": str(tmp_path),
                  "datalist": str(tmp_path / "datalist.json"), "probe": item, **overrides})
        t = p.get_parsed_content("probe" if item.startswith("$") else item)
        out = (t if callable(t) else Compose(t))({"image": image, "label": str(label)})
        x = torch.as_tensor(out["image"])[0]
        assert tuple(x.shape) == (32, 32), (bundle, keep)
        black = x == x.min()  # 0, or -1 in the synthesis' [-1, 1]; the image itself is grey (64..192)
        assert int(black.all(0).sum()) == (16 if keep else 0), (bundle, keep)  # MONAI's PNG arrays are (W, H)
        if "teacher_image_size" in overrides:
            t_img = torch.as_tensor(out["teacher_image"])[0]
            assert tuple(t_img.shape) == (48, 48)
            assert int((t_img == t_img.min()).all(0).sum()) == (24 if keep else 0)
        elif bundle == "tsdk_distill":
            assert "teacher_image" not in out  # same sizes: the teacher reads `image`, no second copy is cached


def test_keep_aspect_reaches_every_stage(tmp_path):
    s = Schedule(keep_aspect=True)
    dirs = RunDirs(tmp_path, tmp_path)
    stages = {st.name: st for sts in method_stages(tmp_path / "datalist.json", dirs, s).values() for st in sts}
    stages.update({st.name: st for st in overlay_stages(dirs, ["teacher", "scratch"], s, 2, tmp_path / "d.json").values()})
    assert len(stages) > 15
    for name, st in stages.items():
        assert st.overrides.get("keep_aspect") is True, name
    plain = method_stages(tmp_path / "datalist.json", dirs, Schedule())
    assert not any("keep_aspect" in st.overrides for sts in plain.values() for st in sts)  # the default: squashed
