"""Mixed precision and channels-last: the bundles' switches, and a real bfloat16 autocast step of the distillation's
trainer on the CPU (``AutocastInferer``; bfloat16 autocast works there; GPU runs use the same switches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from tsdk_monai.engines import DistillationPrepareBatch, amp_dtype, autocast
from tsdk_monai.inferers import AutocastInferer, FeatureInferer
from tsdk_monai.losses import TaskSpecificKDLoss
from tsdk_monai.networks.students import build_student

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SIZE = 32


def test_amp_helpers():
    assert amp_dtype("cpu") == torch.bfloat16 and amp_dtype("cuda") == torch.float16
    assert amp_dtype("cpu", {"dtype": "float16"}) == torch.float16
    with autocast("cpu", True, {"dtype": torch.bfloat16}):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", False, {"dtype": torch.bfloat16}):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _distill_steps(amp: bool) -> tuple[list[torch.dtype], list[float], torch.nn.Module, dict]:
    """Two distillation steps of a tiny student from a tiny frozen teacher; the dtypes of the student's logits."""
    torch.manual_seed(0)
    teacher = build_student("unet_small", num_classes=2, img_size=SIZE).eval()
    student = build_student("unet_small", num_classes=2, img_size=SIZE)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loss = TaskSpecificKDLoss(student.feature_channels, teacher.feature_channels)
    opt = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-3)
    data = [{"image": torch.rand(1, SIZE, SIZE)} for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    from monai.engines import SupervisedTrainer

    kwargs = {"dtype": torch.bfloat16}
    trainer = SupervisedTrainer(
        "cpu", 1, loader, student, opt, loss, decollate=False, amp=amp, amp_kwargs=kwargs,
        prepare_batch=DistillationPrepareBatch(teacher, True, True, amp=amp, amp_kwargs=kwargs),
        inferer=AutocastInferer(FeatureInferer(True), enabled=amp, amp_kwargs=kwargs))
    dtypes, losses = [], []
    student.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))  # inside the autocast region
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (
        losses.append(e.state.output["loss"]),
        # what leaves the inferer is float32 again, for the loss and the handlers
        dtypes.append(e.state.output["pred"]["logits"].dtype)))
    trainer.run()
    return dtypes, losses, student, before


def test_distillation_trainer_bf16_autocast_on_cpu():
    dtypes, losses, student, before = _distill_steps(amp=True)
    # the student's forward ran under bfloat16 autocast; its logits reached the trainer in float32
    assert dtypes == [torch.bfloat16, torch.float32] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses)  # the loss in float32
    assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights stay float32
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the bfloat16 step did not update the student"
    off, _, _, _ = _distill_steps(amp=False)
    assert off == [torch.float32] * 4


class _Denoiser(torch.nn.Module):
    """The call signature of a diffusers ``UNet2DModel`` (``net(noisy, t, return_dict=False)[0]``) on one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
        return (self.conv(x),)


@pytest.mark.parametrize("bundle", ["tsdk_teacher", "tsdk_synthesis", "tsdk_distill", "tsdk_student"])
def test_bundle_amp_and_channels_last_switches(bundle):
    """``amp``/``amp_dtype`` reach the trainer (and the evaluator); ``channels_last`` the network, in both the
    single-process and the multi-process config; everything is off by default."""
    from monai.bundle import ConfigParser

    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    assert parser["amp"] is False and parser["channels_last"] is False
    assert parser.get_parsed_content("memory_format") == torch.preserve_format
    parser["amp"], parser["amp_dtype"], parser["channels_last"] = True, "float16", True
    parser["num_classes"] = 2
    parser["image_size"] = SIZE if bundle != "tsdk_teacher" else 64
    parser["device"] = "$torch.device('cpu')"  # not the process group of a torchrun launch (no torchrun here)
    assert parser.get_parsed_content("train#trainer#amp") is True
    assert parser.get_parsed_content("train#trainer#amp_kwargs") == {"dtype": torch.float16}
    if bundle != "tsdk_synthesis":
        assert parser.get_parsed_content("validate#evaluator#amp") is True
    if bundle in ("tsdk_teacher", "tsdk_student"):  # MONAI autocasts on CUDA only: the inferers do it on the CPU too
        net = torch.nn.Conv2d(1, 2, 3, padding=1)
        seen = []
        net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        for key in ("train#inferer", "validate#inferer"):
            out = parser.get_parsed_content(key)(torch.rand(1, 1, 64, 48), net)
            assert seen.pop() == torch.float16 and out.dtype == torch.float32, key  # float32 for loss and metrics
    if bundle == "tsdk_synthesis":  # the diffusion trainer's inferer autocasts too (it did nothing on the CPU before)
        net = _Denoiser()
        seen = []
        net.conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        x = torch.rand(2, 1, 64, 48)
        out = parser.get_parsed_content("train#inferer")(x, net, noise=torch.randn_like(x), timesteps=torch.tensor([3, 900]))
        assert seen == [torch.float16] and out.dtype == torch.float32
    assert parser.get_parsed_content("memory_format") == torch.channels_last
    assert "@memory_format" in parser["network#module"]  # the DDP-wrapped network gets the same layout
    if bundle in ("tsdk_student", "tsdk_synthesis"):  # cheap networks: build one and look at its conv weights
        net = parser.get_parsed_content("network#module")
        convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert not all(w.is_contiguous() for w in convs)  # (a 1x1 conv's weight is both)
