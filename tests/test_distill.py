"""The distillation on MONAI's trainer (prepare-batch with teacher targets, feature inferer, KD loss), the teacher cache,
the transfer set and the tsdk_distill bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import monai
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, LoadImaged, RandFlipd, ScaleIntensityRanged

from helpers import run_bundle, verify_metadata
from tsdk_monai.data import build_transfer_set
from tsdk_monai.engines import DistillationPrepareBatch, TeacherCache, keep_confident, teacher_targets
from tsdk_monai.inferers import FeatureInferer
from tsdk_monai.losses import TaskAgnosticKDLoss, TaskSpecificKDLoss
from tsdk_monai.networks import resolve_teacher_dir
from tsdk_monai.networks.students import build_student, load_student_weights
from tsdk_monai.transforms import TeacherLabeld
from tsdk_monai.utils import TSDKInputError

torch.set_num_threads(2)
BUNDLE = "tsdk_distill"


@pytest.fixture(scope="module")
def teacher():
    """A real (untrained-decoder) LiteMedSAM LoRA teacher at 64x64, the cheapest real teacher."""
    from tsdk_monai.networks import LoRASegTeacher

    torch.manual_seed(0)
    return LoRASegTeacher(num_classes=2, img_size=64).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, teacher):
    """A teacher stage's ckpt_dir, written by the teacher module's own save function."""
    from tsdk_monai.networks import save_teacher

    ckpt_dir = tmp_path_factory.mktemp("teacher") / "models"
    save_teacher(teacher, ckpt_dir / "teacher")
    return ckpt_dir


def _loader(datalist: Path, n: int = 4) -> DataLoader:
    items = build_transfer_set(datalist, use_unlabeled=False)[:n]
    tf = Compose([
        LoadImaged("image", image_only=True, ensure_channel_first=True),
        ScaleIntensityRanged("image", a_min=0, a_max=255, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped("image", dtype=torch.float32),
    ])
    return DataLoader(Dataset(items, tf), batch_size=2, shuffle=False, num_workers=0)


def _distillation_trainer(loader, student, teacher, loss, epochs, **prepare):
    """The tsdk_distill bundle's trainer: MONAI's SupervisedTrainer, teacher targets from the prepare-batch."""
    from monai.engines import SupervisedTrainer

    opt = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-3)
    return SupervisedTrainer(
        device="cpu", max_epochs=epochs, train_data_loader=loader, network=student, optimizer=opt, loss_function=loss,
        prepare_batch=DistillationPrepareBatch(teacher, loss.needs_logits, loss.needs_features, **prepare),
        inferer=FeatureInferer(loss.needs_features), decollate=False,
    )


def _train(datalist, teacher, cache, epochs=2, kind="task_specific"):
    torch.manual_seed(0)
    student = build_student("unet_small", num_classes=2, img_size=64)
    if kind == "task_specific":
        loss = TaskSpecificKDLoss(student.feature_channels, 256)
    else:
        loss = TaskAgnosticKDLoss(student.feature_channels, 256)
    trainer = _distillation_trainer(_loader(datalist), student, teacher, loss, epochs, cache=cache)
    losses, calls = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    hook = getattr(teacher, "encoder", teacher).register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        trainer.run()
    finally:
        hook.remove()
    return losses, calls, student, loss


def test_cached_and_online_teacher_give_the_same_loss(demo_datalist, teacher, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    online, online_calls, student, _ = _train(demo_datalist, teacher, None)
    memory_cache = TeacherCache("memory", tag="t")
    memory, memory_calls, _, _ = _train(demo_datalist, teacher, memory_cache)
    disk_cache = TeacherCache("disk", cache_dir=tmp_path / "cache", tag="t")
    disk, disk_calls, _, _ = _train(demo_datalist, teacher, disk_cache)
    assert len(online) == 4  # 2 epochs x 2 batches
    assert memory == pytest.approx(online, rel=1e-5, abs=1e-6)
    assert disk == pytest.approx(online, rel=1e-5, abs=1e-6)
    # the teacher ran on every batch online, once per image with a cache
    assert sum(online_calls) == 8 and sum(memory_calls) == 4 and sum(disk_calls) == 4
    assert memory_cache.hits == 4 and memory_cache.misses == 4 and len(memory_cache) == 4
    assert len(disk_cache) == 4
    for f in (tmp_path / "cache").glob("*.pt"):  # disk entries load safely
        assert set(torch.load(f, weights_only=True)) == {"logits", "features"}
    # a fresh disk cache with the same tag reuses the files: no teacher call at all
    again = TeacherCache("disk", cache_dir=tmp_path / "cache", tag="t")
    _, again_calls, _, _ = _train(demo_datalist, teacher, again, epochs=1)
    assert sum(again_calls) == 0 and again.hits == 4
    # the teacher never changed; the student did
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    fresh = build_student("unet_small", num_classes=2, img_size=64)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.parametrize("amp", [False, True])
def test_a_cached_target_depends_on_its_image_alone(teacher, amp):
    """A target is the same in the first epoch as from the cache later, and whichever images an earlier run cached
    (TS-KD reads the real images' targets that TS-KD without synthesis cached): before, the first epoch used the
    float32 targets of the teacher's batch call and later epochs their float16 copy, and a batch with some images
    cached ran the teacher on the others alone, which bfloat16 kernels answer differently (~0.04 in the logits)."""
    torch.manual_seed(1)
    images, ids = torch.rand(4, 1, 64, 64), [f"img{i}.png" for i in range(4)]

    def prepare():
        return DistillationPrepareBatch(teacher, True, True, cache=TeacherCache("memory", dtype="float16"), amp=amp,
                                        amp_kwargs={"dtype": torch.bfloat16})

    cold = prepare()
    first, second = cold.targets(images, ids), cold.targets(images, ids)  # epoch 1 (computed), epoch 2 (cached)
    warm = prepare()
    warm.targets(images[:3], ids[:3])  # an earlier run cached three of the four
    mixed = warm.targets(images, ids)
    assert warm.cache.hits == 3 and warm.cache.misses == 4
    for k in ("logits", "features"):
        assert first[k].dtype == torch.float32
        assert torch.equal(first[k], second[k]), k
        assert torch.equal(first[k], mixed[k]), k


def test_task_agnostic_trainer_uses_the_frozen_vfm_encoder(demo_datalist):
    from tsdk_monai.networks.vfm import build_vfm_encoder

    encoder = build_vfm_encoder("litemedsam", img_size=64)
    losses, calls, _, loss = _train(demo_datalist, encoder, TeacherCache("memory"), epochs=1, kind="task_agnostic")
    assert len(losses) == 2 and all(v > 0 for v in losses)
    assert set(loss.last_terms) == {"kd_feat"}


def test_cache_needs_image_ids(teacher):
    prepare = DistillationPrepareBatch(teacher, True, True, cache=TeacherCache("memory"))
    with pytest.raises(TSDKInputError, match="identifier"):
        prepare({"image": torch.rand(1, 1, 64, 64)}, "cpu")
    with pytest.raises(ValueError, match="cache mode"):
        TeacherCache("gpu")


def test_joint_augmentation_keeps_targets_aligned(teacher):
    aug = RandFlipd(keys=["image", "logits", "features"], prob=1.0, spatial_axis=1, allow_missing_keys=True)
    x = torch.rand(2, 1, 64, 64)
    plain = DistillationPrepareBatch(teacher, True, True)({"image": x}, "cpu")[1]
    x_aug, t_aug = DistillationPrepareBatch(teacher, True, True, augment=aug)({"image": x}, "cpu")
    torch.testing.assert_close(x_aug, x.flip(-1))
    torch.testing.assert_close(t_aug["logits"], plain["logits"].flip(-1))
    torch.testing.assert_close(t_aug["features"], plain["features"].flip(-1))


def test_teacher_reads_its_own_copy_of_the_images(teacher):
    """With ``teacher_key`` the teacher reads that (larger) copy; its logits are resized to the student's images,
    its features are those of the copy, and the cache keeps them apart from targets of the student-size images."""
    big = torch.rand(2, 1, 64, 64)
    small = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)
    cache = TeacherCache("memory")
    ids = ["a.png", "b.png"]
    x, t = DistillationPrepareBatch(teacher, True, True, teacher_key="teacher_image")(
        {"image": small, "teacher_image": big}, "cpu")
    want = teacher_targets(teacher, big, True, True)
    torch.testing.assert_close(x, small)
    assert t["logits"].shape == (2, 2, 32, 32)
    torch.testing.assert_close(t["logits"], torch.nn.functional.interpolate(
        want["logits"], size=(32, 32), mode="bilinear", antialias=True))
    torch.testing.assert_close(t["features"], want["features"])
    # cached under a key of both sizes: the same images without the teacher's copy are other targets
    small_meta = monai.data.MetaTensor(small, meta={"filename_or_obj": ids})
    big_meta = monai.data.MetaTensor(big, meta={"filename_or_obj": ids})
    prepare = DistillationPrepareBatch(teacher, True, True, cache=cache, teacher_key="teacher_image")
    prepare({"image": small_meta, "teacher_image": big_meta}, "cpu")
    prepare({"image": small_meta}, "cpu")
    assert len(cache) == 4 and cache.hits == 0
    prepare({"image": small_meta, "teacher_image": big_meta}, "cpu")
    assert cache.hits == 2
    # the evaluation's teacher labels: read from the copy, resized to the student's image before the argmax
    labeled = TeacherLabeld("teacher_image", teacher, like_key="image")({"image": small[0], "teacher_image": big[0]})
    want_small = torch.nn.functional.interpolate(want["logits"][:1], size=(32, 32), mode="bilinear", antialias=True)
    assert labeled["teacher_label"].shape == (2, 32, 32)
    torch.testing.assert_close(labeled["teacher_label"].argmax(0), want_small[0].argmax(0))


def test_keep_confident_drops_the_synthetic_images_the_teacher_is_least_sure_of(teacher):
    """``synthetic_keep`` of the bundle: the synthetic part of the transfer set is ranked by the teacher's mean
    highest softmax probability and its best fraction (rounded up) stays; real images pass through untouched."""
    torch.manual_seed(1)
    syn = [{"image": torch.rand(1, 64, 64) * s, "source": "synthetic", "id": i}
           for i, s in enumerate((0.1, 1.0, 0.5, 2.0, 0.2))]
    real = [{"image": torch.rand(1, 64, 64), "source": "unlabeled", "id": 10 + i} for i in range(3)]
    items = real[:1] + syn + real[1:]
    score = {it["id"]: float(teacher(it["image"][None]).softmax(1).amax(1).mean()) for it in syn}
    assert len(set(round(v, 6) for v in score.values())) == len(syn)  # the test can tell the images apart
    kept = keep_confident(items, teacher, lambda d: d, keep=0.5)
    best3 = sorted(score, key=score.get, reverse=True)[:3]  # ceil(0.5 * 5)
    assert [it["id"] for it in kept if it["source"] == "synthetic"] == sorted(best3)  # the order is kept
    assert [it["id"] for it in kept if it["source"] != "synthetic"] == [10, 11, 12]

    def never(x):
        raise AssertionError("keep 1 must not run the teacher")

    assert [it["id"] for it in keep_confident(items, never, lambda d: d, keep=1.0)] == [it["id"] for it in items]
    with pytest.raises(TSDKInputError, match="synthetic_keep"):
        keep_confident(items, teacher, lambda d: d, keep=0.0)


def test_teachers_and_students_speak_one_protocol(teacher):
    """``teacher_targets`` calls forward, forward_features or forward_with_features, whichever the loss needs; the
    feature inferer reads a student's features through forward (as DDP needs)."""
    x = torch.rand(1, 1, 64, 64)
    ref_logits, ref_feats = teacher.forward_with_features(x)
    both = teacher_targets(teacher, x, True, True)
    torch.testing.assert_close(both["logits"], ref_logits)
    torch.testing.assert_close(both["features"], ref_feats)
    torch.testing.assert_close(teacher_targets(teacher, x, False, True)["features"], teacher.forward_features(x))
    assert set(teacher_targets(teacher, x, True, False)) == {"logits"}
    from monai.data import MetaTensor

    seen = []
    hook = teacher.register_forward_pre_hook(lambda _m, args: seen.append(type(args[0])))
    try:  # a MetaTensor batch reaches the teacher as a plain tensor (the targets need no metadata; faster)
        torch.testing.assert_close(teacher_targets(teacher, MetaTensor(x), True, False)["logits"], ref_logits)
    finally:
        hook.remove()
    assert seen == [torch.Tensor]
    student = build_student("unet_small", img_size=64).eval()
    s_logits, s_feats = student.forward_with_features(x)
    out = FeatureInferer(True)(x, student)
    torch.testing.assert_close(out["logits"], s_logits)
    torch.testing.assert_close(out["features"], s_feats)
    assert FeatureInferer(False)(x, student)["features"] is None
    with pytest.raises(TSDKInputError, match="input size"):  # logits must come at the input size
        teacher_targets(torch.nn.Conv2d(1, 4, 3, stride=2), x, True, False)
    with pytest.raises(TypeError, match="features_module"):
        FeatureInferer(True)(x, torch.nn.Conv2d(1, 4, 3, padding=1))


def test_transfer_set_parts(demo_datalist, tmp_path):
    data = json.loads(Path(demo_datalist).read_text())
    n_unl, n_lab = len(data["unlabeled"]), len(data["training"])
    everything = build_transfer_set(demo_datalist)
    assert len(everything) == n_unl + n_lab
    assert {i["source"] for i in everything} == {"unlabeled", "training"}
    assert all("label" not in i for i in everything)  # pixels only
    val_test = {Path(demo_datalist).parent / c["image"] for c in data["validation"] + data["test"]}
    assert not val_test & {Path(i["image"]) for i in everything}
    assert len(build_transfer_set(demo_datalist, use_unlabeled="false")) == n_lab
    assert len(build_transfer_set(demo_datalist, use_labeled=False)) == n_unl
    # synthetic images from the synthesis stage's datalist
    syn_dir = tmp_path / "synthetic"
    (syn_dir / "images").mkdir(parents=True)
    for i, case in enumerate(data["unlabeled"][:3]):
        shutil.copy(Path(demo_datalist).parent / case["image"], syn_dir / "images" / f"syn_{i}.png")
    syn = syn_dir / "synthetic_datalist.json"
    syn.write_text(json.dumps({"unlabeled": [{"image": f"images/syn_{i}.png"} for i in range(3)]}))
    with_syn = build_transfer_set(demo_datalist, synthetic_datalist=str(syn))
    assert len(with_syn) == n_unl + n_lab + 3
    assert sum(i["source"] == "synthetic" for i in with_syn) == 3
    assert len(build_transfer_set(demo_datalist, synthetic_datalist=str(syn), use_synthetic=False)) == n_unl + n_lab
    with pytest.raises(TSDKInputError, match="missing_syn.json"):
        build_transfer_set(demo_datalist, synthetic_datalist=str(tmp_path / "missing_syn.json"))
    with pytest.raises(TSDKInputError, match="transfer set is empty"):
        build_transfer_set(demo_datalist, use_unlabeled=False, use_labeled=False)


def test_resolve_teacher_dir(teacher_ckpt, tmp_path):
    folder = teacher_ckpt / "teacher"
    assert resolve_teacher_dir(teacher_ckpt) == folder
    assert resolve_teacher_dir(folder) == folder
    assert resolve_teacher_dir(folder / "model.pt") == folder
    with pytest.raises(TSDKInputError, match="not found"):
        resolve_teacher_dir(tmp_path / "nothing")
    with pytest.raises(TSDKInputError, match="teacher.json"):
        resolve_teacher_dir(tmp_path)


# ----------------------------------------------------------------------------------------------- the bundle
def _overrides(demo_datalist, out: Path, **extra):
    o = {
        "dataset_dir": str(Path(demo_datalist).parent),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "image_size": 64,
        "batch_size": 2,
        "train#trainer#max_epochs": 1,
        "use_unlabeled": False,  # the 6 labelled-pool images: 3 iterations
    }
    o.update(extra)
    return o


def _check_student(out: Path, name: str):
    path = out / "models" / "student_distilled.pt"
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    net = load_student_weights(build_student(name, num_classes=2, img_size=64), path)
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_metadata(tmp_path):
    verify_metadata(BUNDLE, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("student", ["vit_tiny", "unet_small"])
def test_bundle_task_specific(demo_datalist, teacher_ckpt, tmp_path, student):
    out = tmp_path / student
    extra = {"student": student, "teacher_ckpt": str(teacher_ckpt)}
    if student == "unet_small":  # also the disk cache and a synthetic part of the transfer set
        syn_dir = tmp_path / "synthetic"
        (syn_dir / "images").mkdir(parents=True)
        data = json.loads(Path(demo_datalist).read_text())
        for i in range(2):
            shutil.copy(Path(demo_datalist).parent / data["unlabeled"][i]["image"], syn_dir / "images" / f"syn_{i}.png")
        (syn_dir / "synthetic_datalist.json").write_text(json.dumps(
            {"unlabeled": [{"image": f"images/syn_{i}.png"} for i in range(2)]}))
        extra.update(teacher_cache_mode="disk", synthetic_datalist=str(syn_dir / "synthetic_datalist.json"),
                     synthetic_keep=0.5)
    proc = run_bundle(BUNDLE, ["train.json"], _overrides(demo_datalist, out, **extra))
    _check_student(out, student)
    log = proc.stdout + proc.stderr
    if student == "unet_small":
        assert "synthetic 2" in log and "synthetic images: kept 1 of 2" in log  # synthetic_keep 0.5
        assert len(list((out / "eval" / "teacher_cache").glob("*.pt"))) == 7  # 6 labelled-pool images + 1
        return
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], _overrides(demo_datalist, out, **extra))
    metrics = (out / "eval" / "metrics.csv").read_text()
    assert "val_mean_dice" in metrics and "teacher_agreement" in metrics and "teacher_val_mean_dice" in metrics


@pytest.mark.slow
def test_bundle_task_agnostic(demo_datalist, tmp_path):
    out = tmp_path / "agnostic"
    o = _overrides(demo_datalist, out, student="unet_small", vfm_image_size=64)
    run_bundle(BUNDLE, ["train.json", "task_agnostic.json"], o)
    _check_student(out, "unet_small")
    assert (out / "models" / "distill" / "checkpoint_epoch=1.pt").is_file()
    # an interrupted or extended run resumes from its last checkpoint instead of starting over
    proc = run_bundle(BUNDLE, ["train.json", "task_agnostic.json"], {**o, "train#trainer#max_epochs": 2})
    log = proc.stdout + proc.stderr
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in log
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in log
    run_bundle(BUNDLE, ["train.json", "task_agnostic.json", "evaluate.json"], o)
    metrics = (out / "eval" / "metrics.csv").read_text()
    assert "val_mean_dice" in metrics and "teacher_agreement" not in metrics


def test_bundle_rotation_and_zoom_move_image_and_targets_together():
    """``aug_rotate`` / ``aug_zoom`` of the bundle: the image, the teacher's logits and its (smaller) feature map are
    rotated and zoomed alike; at 0 (the default) they are off."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / BUNDLE / "configs" / "train.json"))
    img = torch.zeros(1, 64, 64)
    img[:, 10:30, 35:55] = 1.0
    sample = {"image": img, "logits": img.repeat(3, 1, 1),
              "features": torch.nn.functional.interpolate(img[None], size=(16, 16), mode="area")[0].repeat(4, 1, 1)}
    moved = 0
    for rotate, zoom in ((0.0, 0.0), (0.5, 0.2)):
        parser["aug_rotate"], parser["aug_zoom"] = rotate, zoom
        aug = parser.get_parsed_content("train#augment", instantiate=True, lazy=False)
        aug.set_random_state(0)
        for _ in range(6):
            out = aug(dict(sample))
            image, logits, feats = (torch.as_tensor(out[k]) for k in ("image", "logits", "features"))
            torch.testing.assert_close(logits[0], image[0] / image.max() * logits[0].max(), atol=0.02, rtol=0)
            down = torch.nn.functional.interpolate(image[None] / image.max(), size=(16, 16), mode="area")[0, 0]
            assert (down - feats[0] / feats[0].max()).abs().mean() < 0.05
            unmoved = torch.equal(image, img.flip(1)) or torch.equal(image, img)
            moved += not unmoved and rotate > 0
            if rotate == 0:
                assert unmoved or torch.allclose(image / image.max(), img, atol=0.01)
    assert moved > 0


def test_cache_tag_follows_the_teacher_not_the_cache(tmp_path):
    """The tag changes with the teacher's files, not with the targets the cache writes into its own folder inside
    the teacher's checkpoint folder (where the driver puts it), so a later run finds them."""
    from tsdk_monai.engines import cache_tag

    ckpt = tmp_path / "models"
    (ckpt / "teacher").mkdir(parents=True)
    (ckpt / "teacher" / "model.pt").write_bytes(b"weights")
    cache = ckpt / "distill_cache"
    tag = cache_tag(ckpt, 128, exclude=[cache])
    TeacherCache("disk", cache, tag).put("k", {"logits": torch.zeros(2, 4, 4)})
    assert cache_tag(ckpt, 128, exclude=[cache]) == tag
    assert cache_tag(ckpt, 128) != tag  # (what the 0.3.0 bundle computed)
    (ckpt / "teacher" / "model.pt").write_bytes(b"other weights")
    assert cache_tag(ckpt, 128, exclude=[cache]) != tag
