"""The self-supervised baselines (MAE, MoCo v3): objectives on tiny tensors, the trainer, and the tsdk_ssl bundle."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from helpers import run_bundle, verify_metadata
from tsdk_monai.handlers import latest_checkpoint
from tsdk_monai.networks.students import build_student, load_student_weights
from tsdk_monai.ssl import (
    InfoNCELoss,
    MaskedReconstructionLoss,
    MoCoV3,
    ObjectiveLoss,
    PatchMasker,
    SSLPrepareBatch,
    build_ssl_model,
    random_patch_mask,
    save_pretrained_student,
)
from tsdk_monai.utils import TSDKInputError

torch.set_num_threads(2)
BUNDLE = "tsdk_ssl"


# ----------------------------------------------------------------------------------------------- MAE
def test_patch_mask_honours_the_ratio():
    torch.manual_seed(0)
    mask = random_patch_mask(4, 64, 48, patch_size=16, mask_ratio=0.75)
    assert mask.shape == (4, 1, 64, 48)
    patches = mask.view(4, 4, 16, 3, 16).permute(0, 1, 3, 2, 4).reshape(4, 12, 256)
    assert torch.all(patches.min(-1).values == patches.max(-1).values)  # constant on each 16x16 patch
    assert patches[..., 0].sum(1).tolist() == [9.0] * 4  # round(0.75 * 12) patches in every image
    assert not torch.equal(mask[0], mask[1])  # drawn per image
    assert random_patch_mask(2, 32, 32, 16, 0.0).sum() == 0
    with pytest.raises(ValueError, match="multiple"):
        random_patch_mask(1, 40, 32)
    with pytest.raises(ValueError, match="mask_ratio"):
        PatchMasker(mask_ratio=1.0)


def test_patch_masker_fills_only_masked_pixels():
    x = torch.rand(2, 1, 32, 32)
    mask = random_patch_mask(2, 32, 32, 16, 0.5)
    zero, _ = PatchMasker(fill="zero")(x, mask)
    mean, _ = PatchMasker(fill="mean")(x, mask)
    vis = mask == 0
    assert torch.equal(zero[vis], x[vis]) and torch.equal(mean[vis], x[vis])
    assert torch.all(zero[~vis] == 0)
    for b in range(2):  # the fill is the mean of the visible pixels (nothing of the hidden content)
        torch.testing.assert_close(mean[b][~vis[b]], x[b][vis[b]].mean().expand(int((~vis[b]).sum())))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_only_counts_masked_patches(norm_pix_loss):
    torch.manual_seed(0)
    target, pred = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32, requires_grad=True)
    mask = random_patch_mask(2, 32, 32, 16, 0.5)
    loss_fn = MaskedReconstructionLoss(patch_size=16, norm_pix_loss=norm_pix_loss)
    loss = loss_fn(pred, target, mask)
    loss.backward()
    assert torch.all(pred.grad[mask.expand_as(pred) == 0] == 0)  # no gradient on visible pixels
    changed = pred.detach().clone()
    changed[mask.expand_as(pred) == 0] = 123.0  # anything on the visible pixels: same loss
    torch.testing.assert_close(loss_fn(changed, target, mask), loss.detach())
    changed[mask.expand_as(pred) == 1] += 0.1  # the masked pixels count
    assert loss_fn(changed, target, mask) != loss.detach()
    if not norm_pix_loss:  # the mean over masked pixels
        m = mask.bool().expand_as(pred)
        torch.testing.assert_close(loss.detach(), ((pred.detach() - target)[m] ** 2).mean())


# ----------------------------------------------------------------------------------------------- MoCo v3
def test_infonce_identical_views_beat_shuffled_views():
    torch.manual_seed(0)
    loss = InfoNCELoss(temperature=0.2)
    q = torch.randn(8, 16)
    same, shuffled = loss(q, q.clone()), loss(q, q[torch.roll(torch.arange(8), 1)])
    assert same < shuffled
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(q, dim=1)
    manual = torch.nn.functional.cross_entropy(qn @ kn.t() / 0.2, torch.arange(8)) * 0.4  # 2 tau CE
    torch.testing.assert_close(same, manual)


def test_moco_momentum_encoder_gets_no_gradient_and_moves_by_ema():
    torch.manual_seed(0)
    model = MoCoV3(build_student("unet_small", img_size=32), dim=16, proj_hidden_dim=32, pred_hidden_dim=32,
                   momentum=0.9, head_norm="layer")
    mom = dict(model.momentum_student.named_parameters())
    assert all(not p.requires_grad for p in list(mom.values()) + list(model.momentum_projector.parameters()))
    base_before = {k: v.detach().clone() for k, v in model.student.named_parameters()}
    mom_before = {k: v.detach().clone() for k, v in mom.items()}
    assert all(torch.equal(base_before[k], mom_before[k]) for k in mom)  # starts as a copy
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.rand(4, 1, 32, 32)
    out = model(x, x.flip(-1))  # the first step's keys: the momentum encoder moved towards itself (unchanged)
    for k in mom:
        torch.testing.assert_close(mom[k].detach(), mom_before[k], rtol=1e-6, atol=1e-7)
    first = {k: v.detach().clone() for k, v in mom.items()}
    out["loss"].backward()
    assert all(p.grad is None for p in model.momentum_student.parameters())
    assert all(p.grad is None for p in model.momentum_projector.parameters())
    opt.step()
    assert all(torch.equal(mom[k], first[k]) for k in mom)  # the optimiser never touches it
    stepped = {k: p.detach().clone() for k, p in model.student.named_parameters()}
    model.eval()(x, x)  # no move outside training
    assert all(torch.equal(mom[k], first[k]) for k in mom)
    model.train()(x, x)  # the next training step moves it towards the stepped weights before taking its keys
    moved = 0
    for k in stepped:
        torch.testing.assert_close(mom[k].detach(), 0.9 * first[k] + 0.1 * stepped[k])
        moved += not torch.equal(mom[k], first[k])
    assert moved > 0  # the encoder's parameters that got gradients moved, by EMA


# ----------------------------------------------------------------------------------------------- trainer
def _tiny_batch(n: int = 8, size: int = 32) -> dict[str, torch.Tensor]:
    """Discs of random centre, radius and brightness: ``(n, 1, size, size)`` in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for _ in range(n):
        cx, cy, r, v = torch.rand(4, generator=g)
        imgs.append(((xx - cx + 0.5) ** 2 + (yy - cy + 0.5) ** 2 < (0.3 + 0.4 * r) ** 2).float() * (0.4 + 0.6 * v))
    return {"image": torch.stack(imgs)[:, None]}


def _trainer(net, max_epochs: int, data: list, augment=None):
    """The tsdk_ssl bundle's trainer: MONAI's SupervisedTrainer with the views prepare-batch and the objective's loss."""
    from monai.engines import SupervisedTrainer

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    return SupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=data, network=net, optimizer=opt,
                             loss_function=ObjectiveLoss(), prepare_batch=SSLPrepareBatch(net.num_views, augment),
                             decollate=False)


@pytest.mark.parametrize("method", ["mae", "mocov3"])
def test_a_few_steps_lower_the_loss(method):
    torch.manual_seed(0)
    net = build_ssl_model(method, "unet_small", img_size=32)
    trainer = _trainer(net, 8, [_tiny_batch()])
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert len(losses) == 8
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses


def test_trainer_makes_independent_views():
    from monai.transforms import RandFlipd

    prepare = SSLPrepareBatch(2, RandFlipd("image", prob=0.5, spatial_axis=1))
    x = _tiny_batch(16)["image"]
    v1, targets, (v2,), kwargs = prepare({"image": x}, "cpu")
    assert targets is None and kwargs == {}
    flipped1 = [torch.equal(a, b.flip(-1)) for a, b in zip(v1, x)]
    flipped2 = [torch.equal(a, b.flip(-1)) for a, b in zip(v2, x)]
    assert all(torch.equal(a, b) or f for a, b, f in zip(v1, x, flipped1))
    assert flipped1 != flipped2  # per sample and per view draws


def test_pretrained_weights_reach_the_segmentation_student(tmp_path):
    torch.manual_seed(0)
    mae = build_ssl_model("mae", "unet_small", img_size=32)
    target = build_student("unet_small", num_classes=3, img_size=32)
    fresh_out = target.final_conv.weight.detach().clone()
    path = save_pretrained_student(mae, target, tmp_path / "student_pretrained.pt")
    state = torch.load(path, weights_only=True)
    student = load_student_weights(build_student("unet_small", num_classes=3, img_size=32), path)  # strict
    assert set(state) == set(student.state_dict())
    src = mae.network.state_dict()
    kept = [k for k in state if not torch.equal(state[k], src[k])]
    assert kept == ["final_conv.weight", "final_conv.bias"]  # only the output layer stays fresh
    assert torch.equal(state["final_conv.weight"], fresh_out)
    # MoCo v3 pre-trains the encoder; all the student's weights match by name and shape
    moco = build_ssl_model("mocov3", "vit_tiny", img_size=32, num_classes=3)
    path = save_pretrained_student(moco, build_student("vit_tiny", num_classes=3, img_size=32), tmp_path / "moco.pt")
    state = torch.load(path, weights_only=True)
    assert state.keys() == moco.student.state_dict().keys()
    assert all(torch.equal(v, moco.student.state_dict()[k]) for k, v in state.items())
    with pytest.raises(TSDKInputError, match="pre-train and fine-tune the same student"):
        save_pretrained_student(mae, torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_build_errors_and_method_guard():
    with pytest.raises(ValueError, match="mae, mocov3"):
        build_ssl_model("simclr", "unet_small")
    with pytest.raises(ValueError, match="unknown student"):
        build_ssl_model("mae", "resnet50")
    moco = build_ssl_model("mocov3", "unet_small", img_size=32)
    mae = build_ssl_model("mae", "unet_small", img_size=32)
    with pytest.raises(TSDKInputError, match="written by mocov3 pre-training, this run is mae"):
        mae.load_state_dict(moco.state_dict())
    mae.load_state_dict(build_ssl_model("mae", "unet_small", img_size=32).state_dict())  # same method: fine


# ----------------------------------------------------------------------------------------------- the bundle
def test_metadata(tmp_path):
    verify_metadata(BUNDLE, tmp_path)


def _overrides(demo_datalist: Path, ckpt_dir: Path, **extra) -> dict:
    o = {"dataset_dir": str(Path(demo_datalist).parent), "ckpt_dir": str(ckpt_dir), "image_size": 64,
         "batch_size": 8, "train#trainer#max_epochs": 1, "use_synthetic": False, "progress": False}
    o.update(extra)
    return o


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "logs" not in p.parts)


@pytest.mark.slow
def test_bundle_mae_resumes_and_initialises_the_student(demo_datalist, tmp_path):
    ckpt = tmp_path / "mae"
    o = _overrides(demo_datalist, ckpt, method="mae", student="unet_small")
    run_bundle(BUNDLE, ["train.json"], o)
    assert _files(ckpt) == ["ssl/checkpoint_epoch=1.pt", "student_pretrained.pt"]
    # the saved student is the pre-trained network, with a fresh segmentation output layer
    state = torch.load(ckpt / "student_pretrained.pt", weights_only=True)
    model = torch.load(ckpt / "ssl" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    assert state["final_conv.weight"].shape == (2, 16, 1, 1)
    assert all(torch.equal(v, model[f"network.{k}"]) for k, v in state.items() if not k.startswith("final_conv"))
    # a rerun with more epochs resumes from the last checkpoint instead of starting over
    log = run_bundle(BUNDLE, ["train.json"], {**o, "train#trainer#max_epochs": 2}).stdout
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in log and "Epoch[1] Complete" not in log
    assert re.search(r"Epoch: 2/2, Iter: 1/2 -- train_loss: \d", log)
    assert Path(latest_checkpoint(ckpt / "ssl")).name == "checkpoint_epoch=2.pt"
    # the tsdk_student bundle fine-tunes from it (strict load, weights_only)
    student_out = tmp_path / "student"
    log = run_bundle("tsdk_student", ["train.json"], {
        "dataset_dir": str(Path(demo_datalist).parent), "ckpt_dir": str(student_out / "models"),
        "output_dir": str(student_out / "eval"), "image_size": 64, "batch_size": 2, "train#trainer#max_epochs": 1,
        "init_ckpt": str(ckpt / "student_pretrained.pt"),
    }).stdout
    assert "Epoch[1] Complete" in log and (student_out / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_bundle_mocov3_with_synthetic_images(demo_datalist, tmp_path):
    syn_dir = tmp_path / "synthetic"
    (syn_dir / "images").mkdir(parents=True)
    data = json.loads(Path(demo_datalist).read_text())
    shutil.copy(Path(demo_datalist).parent / data["unlabeled"][0]["image"], syn_dir / "images" / "syn_0.png")
    (syn_dir / "synthetic_datalist.json").write_text(json.dumps({"unlabeled": [{"image": "images/syn_0.png"}]}))
    ckpt = tmp_path / "moco"
    o = _overrides(demo_datalist, ckpt, method="mocov3", student="vit_tiny", use_synthetic=True,
                   synthetic_datalist=str(syn_dir / "synthetic_datalist.json"))
    log = run_bundle(BUNDLE, ["train.json"], o).stdout
    assert "transfer set: 17 images (unlabeled 10, training 6, synthetic 1)" in log
    assert "Epoch: 1/1, Iter: 2/2" in log  # 17 images, batch 8: the last (incomplete) batch is dropped for BN heads
    assert _files(ckpt) == ["ssl/checkpoint_epoch=1.pt", "student_pretrained.pt"]
    # what tsdk_student's init_ckpt does: a strict load of the plain state dict with weights_only=True
    net = build_student("vit_tiny", num_classes=2, img_size=64)
    net.load_state_dict(torch.load(ckpt / "student_pretrained.pt", weights_only=True))
    model = torch.load(ckpt / "ssl" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    assert torch.equal(net.vit.patch_embed.proj.weight, model["student.vit.patch_embed.proj.weight"])
    assert not torch.equal(model["student.vit.patch_embed.proj.weight"],
                           model["momentum_student.vit.patch_embed.proj.weight"])  # trained, EMA lags behind


@pytest.mark.slow
def test_bundle_multi_gpu_train(demo_datalist, tmp_path, monkeypatch):
    """torchrun with 2 processes (gloo): keys gathered across ranks, identical weights, only rank 0 writes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    with socket.socket() as s:  # a free port: other tests may run torchrun at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --tee=3: every line of rank R's output comes prefixed with "[defaultR]:"
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={port}",
                "--tee=3", "-m"]
    ckpt, ranks = tmp_path / "ddp", tmp_path / "ranks"
    o = _overrides(demo_datalist, ckpt, method="mocov3", student="unet_small", batch_size=4,
                   rank_weights_dir=str(ranks))
    proc = run_bundle(BUNDLE, ["train.json", "multi_gpu_train.json"], o, launcher=launcher, timeout=600)
    logs = {0: "", 1: ""}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"\[default(\d)\]:(.*)", line)
        if m:
            logs[int(m.group(1))] += m.group(2) + "\n"
    assert "Epoch: 1/1, Iter: 2/2" in logs[0]  # 16 images over 2 ranks, 4 per step
    w0, w1 = (torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and any(k.startswith("network.momentum_student.") for k in w0)
    differ = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not differ, f"{len(differ)} tensors differ between the ranks, e.g. {differ[:5]}"
    key = next(k for k in w0 if k.startswith("network.student.conv_0.") and k.endswith("weight"))
    assert not torch.equal(w0[key], w0[key.replace(".student.", ".momentum_student.")])  # trained; EMA lags behind
    # only rank 0 wrote: its log reports the saves, rank 1's none; the files are there once
    assert "Saved checkpoint at epoch: 1" in logs[0] and "saved the pre-trained student" in logs[0]
    assert "Saved checkpoint" not in logs[1] and "saved the pre-trained student" not in logs[1]
    assert _files(ckpt) == ["ssl/checkpoint_epoch=1.pt", "student_pretrained.pt"]
    state = torch.load(ckpt / "student_pretrained.pt", weights_only=True)
    assert all(torch.equal(v, w0[f"network.student.{k}"]) for k, v in state.items())
