"""The LoRA teacher (peft LoRA on the VFM encoder + prompt-free SAM decoder) and the tsdk_teacher bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from helpers import BUNDLES, run_bundle, verify_metadata
from tsdk_monai.handlers import latest_checkpoint
from tsdk_monai.networks import (
    LoRASegTeacher,
    build_teacher,
    count_parameters,
    load_teacher,
    read_teacher_config,
    save_teacher,
)
from tsdk_monai.transforms import POSTPROCESS_CHOICES, CheckLabeld, ChosenPostprocessd, EnsureGreyd
from tsdk_monai.utils import TSDKInputError

SIZE = 64  # LiteMedSAM runs at any multiple of 64; its native 256 costs ~2 s per image on these CPUs


def _train_steps(net: torch.nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    x = torch.rand(2, 1, SIZE, SIZE)
    y = (torch.rand(2, 1, SIZE, SIZE) > 0.5).float()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    net.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA teacher before/after a few optimiser steps, and its saved artefacts."""
    torch.manual_seed(0)
    net = LoRASegTeacher(num_classes=3, img_size=SIZE, lora_rank=4)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    _train_steps(net)
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    save_teacher(net, out)
    return net, before, out


def test_shapes_and_embedding():
    net = LoRASegTeacher(num_classes=2, img_size=SIZE).eval()
    x = torch.rand(2, 1, 50, 70)
    with torch.no_grad():
        logits, emb = net.forward_with_features(x)
        assert torch.equal(net(x), logits)
        assert torch.equal(net.forward_features(x), emb)
    assert logits.shape == (2, 2, 50, 70)  # at the input size
    assert emb.shape == (2, 256, SIZE // 4, SIZE // 4)
    assert net.decode(emb).shape == (2, 2, SIZE, SIZE)


def test_only_adapter_and_decoder_train(trained):
    net, before, _ = trained
    trainable, total = count_parameters(net)
    print(f"\n{net.trainable_summary()}")
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("decoder.") for n in names)
    lora_names = [n for n in names if "lora_" in n]
    assert lora_names and all(".qkv." in n for n in lora_names)  # default target: attention qkv
    assert 0 < trainable < total
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    base = [k for k in before if k.startswith("encoder.") and "lora_" not in k]
    assert base and not any(k in changed for k in base), "LoRA training changed frozen base weights"
    assert any("lora_B" in k for k in changed) and any(k.startswith("decoder.") for k in changed)


def test_finetune_modes():
    dec = LoRASegTeacher(num_classes=2, img_size=SIZE, finetune="decoder", pretrained=False)
    assert not dec.has_adapter
    assert all(n.startswith("decoder.") for n, p in dec.named_parameters() if p.requires_grad)
    full = LoRASegTeacher(num_classes=2, img_size=SIZE, finetune="full", pretrained=False)
    assert count_parameters(full)[0] == count_parameters(full)[1]
    lora = LoRASegTeacher(num_classes=2, img_size=SIZE, target_modules=["qkv", "proj"], lora_rank=2, pretrained=False)
    assert count_parameters(lora)[0] > count_parameters(dec)[0]
    with pytest.raises(TSDKInputError, match="do not match"):
        LoRASegTeacher(num_classes=2, img_size=SIZE, target_modules=["no_such_layer"], pretrained=False)
    with pytest.raises(TSDKInputError, match="finetune"):
        LoRASegTeacher(num_classes=2, finetune="half", pretrained=False)


def test_adapter_round_trip_and_merged(trained):
    net, _, out = trained
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "decoder.safetensors").is_file() and (out / "model.pt").is_file()
    cfg = read_teacher_config(out)
    assert cfg["finetune"] == "lora" and cfg["lora_rank"] == 4 and cfg["num_classes"] == 3
    x = torch.rand(2, 1, 48, 56)
    with torch.no_grad():
        ref = net(x)
        adapter = load_teacher(out, merged=False)
        assert adapter.has_adapter and not adapter.training
        torch.testing.assert_close(adapter(x), ref, rtol=0, atol=0)  # identical
        merged = load_teacher(out, merged=True)
        assert not merged.has_adapter
        torch.testing.assert_close(merged(x), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged.forward_features(x), net.forward_features(x), rtol=0, atol=1e-5)
    # the merged file is a plain state dict that loads with weights_only=True into the plain architecture
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert not any("lora_" in k for k in state)
    build_teacher(out, merged=True).load_state_dict(state, strict=True)


def test_cpu_preset_lora_adapts_every_linear_layer_and_round_trips(tmp_path):
    """``--preset cpu``'s teacher LoRA (rank 16 on qkv, proj, fc1, fc2) reaches every linear layer of LiteMedSAM's
    encoder, and its saved adapter and merged weights give the trained network's logits back."""
    from peft.tuners.lora import LoraLayer

    from tsdk_monai.driver import PRESETS

    knobs = PRESETS["cpu"]["extra"]["tsdk_teacher"]
    torch.manual_seed(0)
    net = LoRASegTeacher(num_classes=3, img_size=SIZE, lora_rank=knobs["lora_rank"],
                         target_modules=knobs["lora_target_modules"])
    adapted = [m for m in net.encoder.modules() if isinstance(m, LoraLayer)]
    linear = [m for m in net.encoder.modules() if type(m) is torch.nn.Linear]  # base layers and adapters' A / B
    assert len(adapted) == 40 and len(linear) == 3 * len(adapted)  # TinyViT: 10 blocks x (qkv, proj, fc1, fc2)
    assert all(m.r["default"] == 16 for m in adapted)
    _train_steps(net, steps=2)
    save_teacher(net, tmp_path / "t")
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(load_teacher(tmp_path / "t", merged=False)(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(load_teacher(tmp_path / "t", merged=True)(x), ref, rtol=0, atol=1e-4)


def test_bad_teacher_files(tmp_path, trained):
    _, _, out = trained
    with pytest.raises(TSDKInputError, match="teacher.json: teacher config not found"):
        load_teacher(tmp_path)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TSDKInputError, match="adapter_model.safetensors: cannot read LoRA adapter"):
        load_teacher(bad, merged=False)
    (bad / "model.pt").write_bytes(b"garbage")
    with pytest.raises(TSDKInputError, match="model.pt: not a complete teacher weights file"):
        load_teacher(bad, merged=True)


def test_transforms_and_latest_checkpoint(tmp_path):
    from monai.data import MetaTensor

    rgb = MetaTensor(torch.rand(3, 8, 6), meta={"filename_or_obj": "a.png"})
    grey = EnsureGreyd("image")({"image": rgb})["image"]
    assert grey.shape == (1, 8, 6)
    torch.testing.assert_close(grey[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    assert EnsureGreyd("image")({"image": torch.ones(4, 2, 2)})["image"].shape == (1, 2, 2)
    with pytest.raises(TSDKInputError, match="b.png: image has 5 channels"):
        EnsureGreyd("image")({"image": MetaTensor(torch.rand(5, 2, 2), meta={"filename_or_obj": "b.png"})})
    lab = MetaTensor(torch.tensor([[[0.0, 3.0]]]), meta={"filename_or_obj": "lab.png"})
    with pytest.raises(TSDKInputError, match="lab.png: label value 3 is out of range"):
        CheckLabeld("label", num_classes=2)({"label": lab, "image": torch.zeros(1, 1, 2)})
    with pytest.raises(TSDKInputError, match="lab.png: label size"):
        CheckLabeld("label", num_classes=4)({"label": lab, "image": torch.zeros(1, 2, 2)})
    assert latest_checkpoint(tmp_path / "none") == ""
    for n in (1, 2, 10):
        torch.save({"n": torch.tensor(n)}, tmp_path / f"checkpoint_epoch={n}.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")
    # a checkpoint cut short (a kill during a non-atomic save) is skipped: resume from the newest complete one
    (tmp_path / "checkpoint_epoch=11.pt").write_bytes((tmp_path / "checkpoint_epoch=10.pt").read_bytes()[:40])
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")


def test_teacher_saver_keeps_the_best_and_the_history(tmp_path, trained):
    """With ``save_on="best"`` the saver writes the teacher only when validation improves and records every epoch's
    value in ``val_history.json``; its state (best and history) resumes without doubling the epochs it replays."""
    from ignite.engine import Engine, Events

    from tsdk_monai.handlers import TeacherSaver

    net, _, _ = trained
    scores = {1: 0.4, 2: 0.7, 3: 0.5, 4: 0.8}
    out = tmp_path / "teacher"

    def run(saver: TeacherSaver, first: int, last: int) -> None:
        engine = Engine(lambda e, b: None)

        @engine.on(Events.EPOCH_COMPLETED)  # registered before the saver, as the evaluator's metric handlers are
        def metric(e):
            e.state.metrics["dice"] = scores[e.state.epoch]

        saver.attach(engine)
        engine.state.epoch = first - 1  # MONAI's evaluator runs at the trainer's epoch
        engine.state.max_epochs = last
        engine.run([0], max_epochs=last)

    saver = TeacherSaver(str(out), net, save_on="best", metric_name="dice")
    run(saver, 1, 3)
    hist = json.loads((out / "val_history.json").read_text())
    assert hist == {"metric": "dice", "epochs": [{"epoch": e, "value": scores[e]} for e in (1, 2, 3)]}
    assert saver.best_epoch == 2 and (out / "model.pt").is_file()
    saved = (out / "model.pt").stat().st_mtime_ns

    state = saver.state_dict()  # what the epoch-3 resume checkpoint holds ...
    state["history"] = state["history"][:2]  # ... taken at epoch 2, say; the run then replays epoch 3
    resumed = TeacherSaver(str(out), net, save_on="best", metric_name="dice")
    resumed.load_state_dict(state)
    run(resumed, 3, 4)
    hist = json.loads((out / "val_history.json").read_text())
    assert [h["epoch"] for h in hist["epochs"]] == [1, 2, 3, 4] and resumed.best_epoch == 4
    assert (out / "model.pt").stat().st_mtime_ns >= saved


# --------------------------------------------------------------------------------------------- the bundle
def test_metadata(tmp_path):
    verify_metadata("tsdk_teacher", tmp_path)


def _common(demo_datalist: Path, work: Path) -> dict:
    return {
        "dataset_dir": str(demo_datalist.parent), "ckpt_dir": str(work / "models"), "output_dir": str(work / "eval"),
    }


@pytest.mark.slow
def test_bundle_train_resume_evaluate_infer(demo_datalist, tmp_path):
    common = _common(demo_datalist, tmp_path)
    train = dict(common, image_size=SIZE, batch_size=2, max_iterations=2, progress=False, lr_cosine_cycles=0.5)
    proc = run_bundle("tsdk_teacher", ["train.json"], dict(train, epochs=1))
    assert "trainable" in proc.stdout  # the trainable share is printed
    teacher = tmp_path / "models" / "teacher"
    for f in ("teacher.json", "model.pt", "decoder.safetensors", "adapter/adapter_model.safetensors"):
        assert (teacher / f).is_file(), f
    assert latest_checkpoint(tmp_path / "models" / "train").endswith("epoch=1.pt")

    # an interrupted/earlier run resumes from its checkpoint instead of starting over
    proc = run_bundle("tsdk_teacher", ["train.json"], dict(train, epochs=2))
    log = proc.stdout + proc.stderr
    assert "Restored all variables from" in log and "epoch=1.pt" in log
    assert "Epoch: 1/2" not in log and "Epoch: 2/2" in log
    assert latest_checkpoint(tmp_path / "models" / "train").endswith("epoch=2.pt")
    hist = json.loads((teacher / "val_history.json").read_text())  # one validation Dice per epoch, resume included
    assert [h["epoch"] for h in hist["epochs"]] == [1, 2] and all(0 <= h["value"] <= 1 for h in hist["epochs"])
    # warm-up + cosine decay per iteration, resumed with the run: 2 epochs x 2 iterations end at the cosine's zero
    ckpt = torch.load(latest_checkpoint(tmp_path / "models" / "train"), weights_only=True)
    assert ckpt["lr_scheduler"]["last_epoch"] == 4 and ckpt["optimizer"]["param_groups"][0]["lr"] < 1e-9

    net = load_teacher(teacher)  # what the distillation stage does
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert net(x).shape == (1, 2, 64, 64)

    before = sorted(p.name for p in teacher.rglob("*"))
    run_bundle("tsdk_teacher", ["train.json", "evaluate.json"], common)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())  # the student bundle's layout
    # the post-processing is chosen on the validation split and recorded beside the metrics, not in the teacher's
    # folder (whose files key the distillation's teacher cache)
    chosen = json.loads((tmp_path / "eval" / "postprocess.json").read_text())
    assert chosen["postprocess"] in POSTPROCESS_CHOICES and set(chosen["validation_hd95"]) == set(POSTPROCESS_CHOICES)
    assert sorted(p.name for p in teacher.rglob("*")) == before
    data = json.loads(demo_datalist.read_text())
    n_test, (foreground,) = len(data["test"]), [v for k, v in data["labels"].items() if k != "0"]
    assert len(metrics["cases"]) == n_test
    for name in ("test_mean_dice", "test_hd95"):
        per_case = [c[name][foreground] for c in metrics["cases"]]
        assert all(v is not None and v >= 0 for v in per_case), (name, per_case)
        assert metrics["mean"][name] == pytest.approx(np.mean(per_case), rel=1e-5), name
    assert 0 <= metrics["mean"]["test_mean_dice"] <= 1

    out = tmp_path / "infer"
    run_bundle("tsdk_teacher", ["inference.json"], dict(common, output_dir=str(out)))
    segs = sorted(out.glob("*_seg.png"))
    assert len(segs) == n_test
    from PIL import Image

    seg = np.array(Image.open(segs[0]))
    assert seg.shape == (64, 64) and set(np.unique(seg)) <= {0, 1}
    # the post-processing chosen on validation, read from a postprocess.json as the driver's overlay stage passes it
    # (this 2-iteration teacher may predict nothing: test_inference_applies_the_chosen_postprocessing checks the effect)
    (tmp_path / "chose.json").write_text(json.dumps({"postprocess": "ellipse"}))
    run_bundle("tsdk_teacher", ["inference.json"], dict(common, output_dir=str(tmp_path / "post"),
                                                        postprocess=str(tmp_path / "chose.json")))
    ellipse, read = ChosenPostprocessd("pred", 2, choice="ellipse", is_onehot=False), LoadImage(image_only=True)
    for plain in segs:  # read as the pipeline reads images (x first), so the ellipse is fitted to the same array
        got, pred = np.asarray(read(tmp_path / "post" / plain.name)), read(plain).as_tensor().float()[None]
        np.testing.assert_array_equal(got, ellipse({"pred": pred})["pred"][0].numpy(), err_msg=plain.name)


def test_inference_applies_the_chosen_postprocessing(tmp_path):
    """inference.json's postprocessing (before it saves) applies the choice a postprocess.json names: a disc with a
    ragged edge and a stray blob becomes the moment ellipse of the disc."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    (tmp_path / "chose.json").write_text(json.dumps({"postprocess": "ellipse"}))
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "tsdk_teacher" / "configs" / "inference.json"))
    parser.update({"num_classes": 2, "postprocess": str(tmp_path / "chose.json")})  # num_classes: the saved teacher's
    steps = parser.get_parsed_content("postprocessing").transforms
    assert type(steps[-1]).__name__ == "SaveImaged"
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    fg = ((yy - 20) ** 2 + (xx - 22) ** 2 < 100) & ((yy + xx) % 5 != 0) | ((yy > 40) & (xx > 40))
    logits = torch.stack([(~fg).float(), fg.float()]) * 4.0
    got = Compose(steps[:-1])({"pred": logits})["pred"]
    plain = fg[None].float()
    want = ChosenPostprocessd("pred", 2, choice="ellipse", is_onehot=False)({"pred": plain})["pred"]
    assert torch.equal(torch.as_tensor(got), want) and not torch.equal(want, plain)


def test_full_finetune_save_load(tmp_path):
    torch.manual_seed(0)
    net = LoRASegTeacher(num_classes=2, img_size=SIZE, finetune="full")
    _train_steps(net, steps=1, lr=1e-3)
    save_teacher(net, tmp_path / "full")
    assert (tmp_path / "full" / "encoder.safetensors").is_file() and not (tmp_path / "full" / "adapter").exists()
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        ref = net(x)
        for merged in (True, False):
            torch.testing.assert_close(load_teacher(tmp_path / "full", merged=merged)(x), ref, rtol=0, atol=0)


def test_sam_vit_teacher_with_lora(tmp_path):
    """A SAM ViT teacher (tiny random official-layout checkpoint): LoRA lands on timm's qkv, artefacts round-trip."""
    from tsdk_monai.networks.vfm import load_vfm, sam_layout_state_dict

    arch = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=7)
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(sam_layout_state_dict(load_vfm("sam_vit_b", pretrained=False, img_size=1024, arch=arch)), ckpt)
    net = LoRASegTeacher(num_classes=2, vfm="sam_vit_b", checkpoint=ckpt, img_size=64, arch=arch)
    lora = [n for n, p in net.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == 4 and all(".attn.qkv." in n for n in lora)  # 2 blocks x (A, B)
    _train_steps(net, steps=1)
    save_teacher(net, tmp_path / "t")
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        logits, emb = net.forward_with_features(x)
        assert logits.shape == (2, 2, 40, 40) and emb.shape == (2, 256, 4, 4)
        torch.testing.assert_close(load_teacher(tmp_path / "t", merged=False)(x), logits, rtol=0, atol=0)
        torch.testing.assert_close(load_teacher(tmp_path / "t", merged=True)(x), logits, rtol=0, atol=1e-5)
