"""Synthesis stage (issue 4): diffusion training on MONAI engines, sampling, synthetic datalist, quality report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from ignite.engine import Events

from helpers import run_bundle, verify_metadata
from tsdk_monai.data import load_split, read_array
from tsdk_monai.handlers import EMAWarmup, latest_checkpoint
from tsdk_monai.engines import (
    SYNTHETIC_DATALIST,
    DiffusionSampler,
    DiffusionTrainer,
    MinSNRLoss,
    diffusion_training_cases,
    load_weights,
    sample_images,
)
from tsdk_monai.metrics import SyntheticQualityReport, frechet_distance, load_images, pooled_features, quality_report
from tsdk_monai.networks.diffusion import build_diffusion_unet
from tsdk_monai.utils import TSDKInputError

BUNDLE = "tsdk_synthesis"
TINY_NET = [16, 32, 32]  # block_out_channels of the test UNet (32x32 images, ~0.28M parameters)


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_diffusion_unet(32, block_out_channels=TINY_NET, norm_num_groups=8)


def small_extractor() -> torch.nn.Module:
    """A fixed random conv net standing in for the VFM encoder: (B, 1, H, W) -> (B, 32, H/4, W/4)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
    ).eval()


@pytest.fixture(scope="module")
def real_images(demo_datalist) -> torch.Tensor:
    paths = [c["image"] for c in diffusion_training_cases(demo_datalist)]
    return load_images(paths, 32, progress=False)  # (N, 1, 32, 32) in [0, 1]


def test_training_cases_never_use_test(demo_datalist):
    cases = diffusion_training_cases(demo_datalist)
    test = {c["image"] for c in load_split(demo_datalist, "test")}
    expected = {c["image"] for s in ("training", "unlabeled") for c in load_split(demo_datalist, s, allow_empty=True)}
    assert {c["image"] for c in cases} == expected and not expected & test
    assert all(set(c) == {"image"} for c in cases)
    with pytest.raises(TSDKInputError, match="test"):
        diffusion_training_cases(demo_datalist, ["training", "test"])


def test_unet_factory_checks_sizes():
    net = build_diffusion_unet(32, block_out_channels=TINY_NET)
    out = net(torch.zeros(2, 1, 32, 32), torch.tensor([0, 999]), return_dict=False)[0]
    assert out.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        build_diffusion_unet(30, block_out_channels=TINY_NET)
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_diffusion_unet(32, block_out_channels=[12, 32], norm_num_groups=8)


def test_training_lowers_loss(real_images):
    """DiffusionTrainer (SupervisedTrainer + DiffusionPrepareBatch + DiffusersInferer) fits a small batch."""
    net = tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = real_images[:8] * 2 - 1
    g = torch.Generator().manual_seed(1)
    noise, t = torch.randn(x.shape, generator=g), torch.randint(0, 1000, (8,), generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            pred = net(sched.add_noise(x, noise, t), t, return_dict=False)[0]
        return float(torch.nn.functional.mse_loss(pred, noise))

    before = eval_loss()
    trainer = DiffusionTrainer(
        device="cpu", max_epochs=1, train_data_loader=[{"image": x}] * 25, network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3), scheduler=sched,
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    after = eval_loss()
    assert len(losses) == 25
    assert after < 0.6 * before, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_min_snr_loss_weights_and_training(real_images):
    """Min-SNR-gamma: the weights follow the rule for both targets, and training with it still fits a batch."""
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=kind)
        net = tiny_unet()
        trainer = DiffusionTrainer(
            device="cpu", max_epochs=1, train_data_loader=[], network=net,
            optimizer=torch.optim.Adam(net.parameters(), 1e-3), scheduler=sched, snr_gamma=5.0,
        )
        loss = trainer.loss_function
        assert isinstance(loss, MinSNRLoss)
        t = torch.tensor([0, 300, 600, 999])
        ab = sched.alphas_cumprod[t]
        snr = ab / (1 - ab)
        expect = torch.minimum(snr, torch.tensor(5.0)) / (snr if kind == "epsilon" else snr + 1)
        torch.testing.assert_close(loss.weights(t), expect.float())
        assert loss.weights(t)[0] < 0.01, "nearly clean images must be down-weighted"
        # the per-image weighting is applied: with a unit error on every image the loss is the mean of the weights
        pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
        trainer.prepare_batch.last_timesteps = t
        torch.testing.assert_close(loss(pred, target), expect.float().mean())
    with pytest.raises(ValueError, match="not both"):
        DiffusionTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=net,
                         optimizer=torch.optim.Adam(net.parameters()), scheduler=sched,
                         loss_function=torch.nn.MSELoss(), snr_gamma=5.0)

    net = tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    trainer = DiffusionTrainer(
        device="cpu", max_epochs=1, train_data_loader=[{"image": real_images[:8] * 2 - 1}] * 25, network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3), scheduler=sched, snr_gamma=5.0,
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    assert len(losses) == 25 and np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_ema_warmup_schedules_the_ema_handler():
    """EMAWarmup sets the momentum ignite's EMAHandler uses at each iteration: (1 + t)^-power, floored."""
    from ignite.engine import Engine
    from ignite.handlers import EMAHandler

    warm = EMAWarmup(momentum=0.01, power=2 / 3)
    assert warm.value(0) == 1.0 and warm.value(7) == pytest.approx(8 ** (-2 / 3)) and warm.value(10**6) == 0.01
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)

    def step(engine, batch):
        with torch.no_grad():
            net.weight += 1.0  # the online weight after iteration t is t

    engine = Engine(step)
    ema = EMAHandler(net, momentum=0.01)
    warm.attach(engine)  # before the EMAHandler: it must set the momentum this iteration's update reads
    ema.attach(engine)
    engine.run([0] * 3, max_epochs=1)
    expect = 0.0
    for t in (1, 2, 3):
        m = (1 + t) ** (-2 / 3)
        expect = (1 - m) * expect + m * t
    assert float(ema.ema_model.weight) == pytest.approx(expect, rel=1e-6)
    assert float(ema.ema_model.weight) > 1.5, "the EMA must follow the online weights (a constant 0.01 gives 0.06)"
    assert engine.state.ema_momentum == pytest.approx(4 ** (-2 / 3))
    with pytest.raises(ValueError, match="momentum"):
        EMAWarmup(momentum=0.0)


def test_sampling_is_deterministic(tmp_path):
    net = tiny_unet()
    ddim = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    a = sample_images(net, ddim, 5, batch_size=2, num_inference_steps=4, seed=3, progress=False)
    b = sample_images(net, ddim, 5, batch_size=5, num_inference_steps=4, seed=3, progress=False)
    c = sample_images(net, ddim, 5, batch_size=5, num_inference_steps=4, seed=4, progress=False)
    assert a.shape == (5, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-4), "a sample must not depend on the batch size (up to float rounding)"
    assert not torch.allclose(a, c, atol=1e-3), "another seed must give other samples"

    # the sampler writes files that LoadImage reads back as the sampled tensors, and a datalist load_split reads
    out = tmp_path / "synthetic"
    path = DiffusionSampler(net, ddim, out, num_images=5, batch_size=2, num_inference_steps=4, seed=3, progress=False).run()
    assert path == out / SYNTHETIC_DATALIST
    cases = load_split(path, "unlabeled")
    assert [Path(c["image"]).name for c in cases] == [f"synth_{i:05d}.png" for i in range(5)]
    for i, case in enumerate(cases):
        arr = read_array(case["image"])
        assert arr.shape == (1, 32, 32)
        np.testing.assert_array_equal(arr, np.round((a[i].numpy() + 1) / 2 * 255))
    assert not [p for p in out.rglob(".*")], "no temporary file may be left behind"
    meta = json.loads(path.read_text())
    assert meta["seed"] == 3 and meta["num_inference_steps"] == 4 and meta["scheduler"] == "DDIMScheduler"

    # NIfTI output holds the data's intensity range
    nii = DiffusionSampler(net, ddim, tmp_path / "nii", num_images=2, batch_size=2, num_inference_steps=4, seed=3,
                           file_format="nii.gz", progress=False).run()
    arr = read_array(load_split(nii, "unlabeled")[0]["image"])
    np.testing.assert_allclose(arr[0], (a[0, 0].numpy() + 1) / 2 * 255, atol=1e-3)


class _FailingUNet(torch.nn.Module):
    """Wraps a UNet and fails after a number of forward passes (a crash during sampling)."""

    def __init__(self, net, fail_after):
        super().__init__()
        self.net, self.config, self.calls, self.fail_after = net, net.config, 0, fail_after

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.net(*args, **kwargs)


def test_crash_during_sampling_leaves_no_datalist(tmp_path):
    net = tiny_unet()
    ddim = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    out = tmp_path / "synthetic"
    DiffusionSampler(net, ddim, out, num_images=2, batch_size=2, num_inference_steps=2, progress=False).run()
    assert (out / SYNTHETIC_DATALIST).is_file()
    # a second run that crashes in its second batch: the old datalist is gone, no new one appears
    failing = _FailingUNet(net, fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        DiffusionSampler(failing, ddim, out, num_images=4, batch_size=2, num_inference_steps=2, progress=False).run()
    assert not (out / SYNTHETIC_DATALIST).exists()
    assert not [p for p in out.rglob(".*")]


def test_quality_report_known_cases(real_images, tmp_path):
    ext = small_extractor()
    real = real_images
    # identical sets: distance ~0 and every synthetic image is a copy of the real image at the same index
    same = quality_report(real, real.clone(), ext, progress=False, noise_baseline=True)
    mem = same["memorisation"]
    assert same["frechet_distance"] < 1e-6
    assert same["noise_baseline"]["frechet_distance"] > 0 and same["noise_baseline"]["synthetic_to_noise_ratio"] < 1e-3
    assert mem["num_copies"] == len(real) and mem["copy_fraction"] == 1.0
    assert all(e["copy"] and e["similarity"] > 0.9999 and e["nearest_real"] == e["image"] for e in mem["per_image"])
    # unrelated noise (uniform): far larger than the distance between two halves of the real set, no copies.
    # (Gaussian noise with the data's mean/std is the HC18 bench's baseline; with this random conv net's pooled
    # features it is only ~2x the half-split distance, so the real VFM features are needed to judge it.)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    far = quality_report(real, noise, ext, progress=False)
    half = frechet_distance(pooled_features(ext, real[::2], progress=False), pooled_features(ext, real[1::2], progress=False))
    assert far["frechet_distance"] > 20 * half > 0, (far["frechet_distance"], half)
    assert far["memorisation"]["num_copies"] == 0
    assert far["memorisation"]["real_to_other_real"]["max"] < 1


def test_quality_report_files(demo_datalist, tmp_path):
    """SyntheticQualityReport on a 'synthetic' set made of copies of real images: all flagged, grid written."""
    from tsdk_monai.utils import atomic_copy, atomic_write_json

    real = [c["image"] for c in diffusion_training_cases(demo_datalist)][:4]
    out = tmp_path / "synthetic"
    for i, p in enumerate(real):
        atomic_copy(p, out / "images" / f"synth_{i:05d}.png")
    atomic_write_json(out / SYNTHETIC_DATALIST, {"unlabeled": [{"image": f"images/synth_{i:05d}.png"} for i in range(4)]})
    report = SyntheticQualityReport(demo_datalist, out / SYNTHETIC_DATALIST, small_extractor(), image_size=32,
                                    grid_columns=2, grid_rows=2, progress=False).run()
    assert report["memorisation"]["num_copies"] == 4
    saved = json.loads((out / "quality.json").read_text())
    assert saved["memorisation"]["num_copies"] == 4 and saved["num_synthetic"] == 4
    from PIL import Image

    grid = np.asarray(Image.open(out / "quality_grid.png"))
    assert grid.ndim == 2 and grid.shape[0] > 3 * 2 * 32 and grid.shape[1] > 2 * 32


def test_load_weights_errors(tmp_path):
    net = tiny_unet()
    with pytest.raises(TSDKInputError, match="model.pt: checkpoint not found"):
        load_weights(net, tmp_path / "model.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TSDKInputError, match="bad.pt: not a complete checkpoint file"):
        load_weights(net, bad)
    torch.save({"optimizer": {}}, tmp_path / "other.pt")
    with pytest.raises(TSDKInputError, match="other.pt: checkpoint has none of the entries"):
        load_weights(net, tmp_path / "other.pt")
    torch.save({"model": build_diffusion_unet(32, block_out_channels=[16, 16, 32]).state_dict()}, tmp_path / "m.pt")
    with pytest.raises(TSDKInputError, match="m.pt: the weights do not fit"):
        load_weights(net, tmp_path / "m.pt")
    torch.save({"model": net.state_dict()}, tmp_path / "ok.pt")
    assert load_weights(tiny_unet(1), tmp_path / "ok.pt") == "model"
    assert latest_checkpoint(tmp_path, "checkpoint") == ""


def test_metadata(tmp_path):
    verify_metadata(BUNDLE, tmp_path)


def _overrides(datalist: Path, tmp_path: Path, **extra) -> dict:
    return {
        "dataset_dir": str(datalist.parent),
        "ckpt_dir": str(tmp_path / "models"),
        "log_dir": str(tmp_path / "logs"),
        "output_dir": str(tmp_path / "synthetic"),
        "image_size": 32,
        "network_def#block_out_channels": TINY_NET,
        "batch_size": 8,
        **extra,
    }


@pytest.mark.slow
def test_bundle_train_resume_sample(demo_datalist, tmp_path):
    """train.json (2 epochs) -> resume to 3 epochs -> inference.json (DDIM, 6 images, quality report)."""
    ov = _overrides(demo_datalist, tmp_path)
    run_bundle(BUNDLE, ["train.json"], {**ov, "train#trainer#max_epochs": 2})
    models = tmp_path / "models"
    assert (models / "model.pt").is_file() and latest_checkpoint(models, "checkpoint").endswith("checkpoint_epoch=2.pt")
    proc = run_bundle(BUNDLE, ["train.json"], {**ov, "train#trainer#max_epochs": 3})
    assert "Restored all variables" in proc.stdout + proc.stderr
    assert latest_checkpoint(models, "checkpoint").endswith("checkpoint_epoch=3.pt")
    ckpt = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert {"model", "ema", "optimizer", "trainer"} <= set(ckpt) and ckpt["trainer"]["iteration"] == 3 * ckpt["trainer"]["epoch_length"]

    run_bundle(BUNDLE, ["train.json", "inference.json"], {
        **ov, "num_images": 6, "sample_batch_size": 4, "num_inference_steps": 4,
        # a small stand-in for the LiteMedSAM encoder keeps the test fast; the bundle default is the VFM encoder
        "quality#feature_extractor": "$torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU())",
    })
    out = tmp_path / "synthetic"
    cases = load_split(out / SYNTHETIC_DATALIST, "unlabeled")
    assert len(cases) == 6 and all(read_array(c["image"]).shape == (1, 32, 32) for c in cases)
    quality = json.loads((out / "quality.json").read_text())
    assert quality["num_synthetic"] == 6 and len(quality["memorisation"]["per_image"]) == 6
    assert quality["frechet_distance"] >= 0 and (out / "quality_grid.png").is_file()
    # the bundle measures its noise baseline (the report's scale for the distance) unless told not to
    assert quality["noise_baseline"]["frechet_distance"] > 0


def test_preprocessing_and_image_errors(tmp_path):
    """The bundle's preprocessing (from train.json) and load_images turn RGB PNGs into one grey channel; bad files
    give an error naming them."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose
    from PIL import Image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / BUNDLE / "configs" / "train.json"))
    parser["image_size"] = 32
    out = Compose(parser.get_parsed_content("preprocessing"))({"image": str(tmp_path / "rgb.png")})["image"]
    assert out.shape == (1, 32, 32) and float(out.min()) >= -1 and float(out.max()) <= 1
    imgs = load_images([tmp_path / "rgb.png"], 16, progress=False)
    assert imgs.shape == (1, 1, 16, 16) and torch.allclose(imgs, torch.full_like(imgs, 0.299 * 255 / 255), atol=1e-3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(TSDKInputError, match="broken.png"):
        load_images([tmp_path / "broken.png"], 16, progress=False)
