"""The students: one shape contract, exposed feature maps, weights that load with weights_only=True."""

from __future__ import annotations

import pytest
import torch

from tsdk_monai.networks.students import build_student, load_student_weights, student_names
from tsdk_monai.utils import TSDKInputError

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=["vit_tiny", "unet_small"])
def student(request):
    torch.manual_seed(0)
    return request.param, build_student(request.param, in_channels=1, num_classes=3, img_size=64).eval()


def test_names():
    assert student_names() == ["unet_small", "vit_tiny"]
    with pytest.raises(ValueError, match="unknown student"):
        build_student("resnet")
    with pytest.raises(ValueError, match="num_classes"):
        build_student("unet_small", num_classes=1)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (32, 48)])
def test_shape_contract(student, size):
    name, net = student
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        logits = net(x)
        both_logits, feats = net.forward_with_features(x)
        only_feats = net.forward_features(x)
    assert logits.shape == (2, 3, *size), name
    assert feats.shape == (2, net.feature_channels, size[0] // 16, size[1] // 16), name
    torch.testing.assert_close(both_logits, logits)
    torch.testing.assert_close(only_feats, feats)


def test_features_module_gives_the_feature_map(student):
    """The distillation trainer reads features through a hook on features_module (DDP needs forward calls)."""
    _, net = student
    seen = []
    h = net.features_module.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        net(x)
        ref = net.forward_features(x)
    h.remove()
    torch.testing.assert_close(seen[0], ref)


def test_bad_input(student):
    name, net = student
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.rand(1, 1, 40, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.rand(1, 3, 64, 64))


def test_architectures():
    vit = build_student("vit_tiny", img_size=64)
    assert vit.vit.embed_dim == 192 and len(vit.vit.blocks) == 12 and vit.vit.blocks[0].attn.num_heads == 3
    assert vit.feature_channels == 192
    unet = build_student("unet_small")
    n = sum(p.numel() for p in unet.parameters())
    assert 1_000_000 <= n <= 2_000_000, n
    assert unet.feature_channels == 256


def test_weights_round_trip(tmp_path, student):
    """A plain state dict loads with weights_only=True; unet_small's keys are MONAI BasicUNet's."""
    name, net = student
    path = tmp_path / f"{name}.pt"
    torch.save(net.state_dict(), path)
    state = torch.load(path, weights_only=True)
    other = build_student(name, num_classes=3, img_size=64).eval()
    load_student_weights(other, path)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), net(x))
    if name == "unet_small":
        from monai.networks.nets import BasicUNet

        plain = BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=(16, 32, 64, 128, 256, 16),
                          norm=("instance", {"affine": True}))
        plain.load_state_dict(state, strict=True)
    # wrong number of classes: a clear error naming the file
    with pytest.raises(TSDKInputError, match=str(path.name)):
        load_student_weights(build_student(name, num_classes=2, img_size=64), path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TSDKInputError, match="bad.pt"):
        load_student_weights(other, bad)
    with pytest.raises(TSDKInputError, match="missing.pt"):
        load_student_weights(other, tmp_path / "missing.pt")
