"""The VFM registry: LiteMedSAM from the verified packaged checkpoint, SAM ViTs from official-layout checkpoints."""

from __future__ import annotations

import pytest
import torch

from tsdk_monai.networks.vfm import (
    IMAGENET_MEAN,
    LITEMEDSAM_SIZE,
    VFM_NAMES,
    build_vfm_encoder,
    litemedsam_checkpoint_path,
    load_sam_state_dict,
    load_vfm,
    sam_layout_state_dict,
    vfm_spec,
)
from tsdk_monai.utils import TSDKInputError

TINY = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=7)


@pytest.fixture(scope="module")
def tiny_sam_ckpt(tmp_path_factory):
    """A small random SAM ViT checkpoint saved in the official key layout (native 1024 input, 64x64 grid)."""
    torch.manual_seed(0)
    parts = load_vfm("sam_vit_b", pretrained=False, img_size=1024, arch=TINY)
    with torch.no_grad():
        for p in parts.encoder.backbone.parameters():
            p.normal_(0, 0.02)
    state = sam_layout_state_dict(parts)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(state, path)
    return path, state, parts


def test_registry_names_and_normalisation():
    assert set(VFM_NAMES) == {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    assert vfm_spec("litemedsam").img_size == 256 and vfm_spec("litemedsam").mean == (0.0, 0.0, 0.0)
    assert vfm_spec("sam_vit_b").mean == IMAGENET_MEAN and vfm_spec("sam_vit_l").img_size == 1024
    assert vfm_spec("medsam_vit_b").std == (1.0, 1.0, 1.0)  # MedSAM feeds [0, 1] without mean/std
    with pytest.raises(TSDKInputError, match="unknown VFM"):
        load_vfm("sam_vit_x", pretrained=False)


def test_litemedsam_checkpoint_verified_and_encoder():
    path = litemedsam_checkpoint_path()
    assert path.stat().st_size == LITEMEDSAM_SIZE
    enc = build_vfm_encoder("litemedsam", img_size=64)  # native 256; 64 keeps the test cheap
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.rand(2, 1, 40, 52)
    with torch.no_grad():
        y = enc(x)
        y3 = enc(x.expand(-1, 3, -1, -1))
    assert y.shape == (2, 256, 16, 16)
    torch.testing.assert_close(y, y3, rtol=0, atol=0)  # grey is repeated to 3 channels inside
    with pytest.raises(ValueError, match="B, 1 or 3"):
        enc(torch.rand(1, 2, 8, 8))


def test_litemedsam_loads_all_keys_from_package():
    parts = load_vfm("litemedsam", img_size=64)
    state = load_sam_state_dict(litemedsam_checkpoint_path(verify=False))
    dec = {k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.")}
    for k, v in parts.mask_decoder.state_dict().items():
        assert torch.equal(v, dec[k]), k
    qkv = parts.encoder.backbone.layers[1].blocks[0].attn.qkv.weight
    assert torch.equal(qkv, state["image_encoder.layers.1.blocks.0.attn.qkv.weight"])


def test_sam_checkpoint_official_layout_loads(tiny_sam_ckpt):
    path, state, src = tiny_sam_ckpt
    # the file really is in the official SAM layout
    for key in ("image_encoder.patch_embed.proj.weight", "image_encoder.blocks.0.mlp.lin1.weight",
                "image_encoder.blocks.1.attn.rel_pos_h", "image_encoder.neck.0.weight",
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "mask_decoder.iou_token.weight"):
        assert key in state, key
    assert state["image_encoder.pos_embed"].shape == (1, 64, 64, 32)
    assert state["image_encoder.blocks.1.attn.rel_pos_h"].shape == (127, 16)  # global attention at 1024
    parts = load_vfm("sam_vit_b", checkpoint=path, img_size=1024, arch=TINY)
    for k, v in src.encoder.backbone.state_dict().items():
        assert torch.equal(parts.encoder.backbone.state_dict()[k], v), k
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(parts.encoder.eval()(x), src.encoder.eval()(x))


def test_sam_position_embeddings_interpolated(tiny_sam_ckpt):
    from timm.layers import resample_abs_pos_embed_nhwc

    path, state, _ = tiny_sam_ckpt
    enc = build_vfm_encoder("sam_vit_b", checkpoint=path, img_size=256, arch=TINY)
    bb = enc.backbone
    assert bb.pos_embed.shape == (1, 16, 16, 32)
    torch.testing.assert_close(bb.pos_embed, resample_abs_pos_embed_nhwc(state["image_encoder.pos_embed"], [16, 16]))
    assert bb.blocks[1].attn.rel_pos_h.shape == (31, 16)  # global block: 2 * 16 - 1
    assert bb.blocks[0].attn.rel_pos_h.shape == (13, 16)  # windowed block: 2 * window - 1, unchanged
    torch.testing.assert_close(bb.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"])
    with torch.no_grad():
        y = enc(torch.rand(2, 3, 100, 80))
    assert y.shape == (2, 256, 16, 16)


def test_bad_checkpoints_name_the_file(tmp_path, tiny_sam_ckpt):
    with pytest.raises(TSDKInputError, match="needs a checkpoint"):
        load_vfm("sam_vit_b", arch=TINY)
    missing = tmp_path / "nope.pth"
    with pytest.raises(TSDKInputError, match="nope.pth: VFM checkpoint file not found"):
        load_vfm("sam_vit_b", checkpoint=missing, arch=TINY)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TSDKInputError, match="junk.pth: not a complete VFM checkpoint file"):
        load_vfm("medsam_vit_b", checkpoint=junk, arch=TINY)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(TSDKInputError, match="other.pth: not a SAM-layout checkpoint"):
        load_vfm("sam_vit_b", checkpoint=other, arch=TINY)
    path = tiny_sam_ckpt[0]
    with pytest.raises(TSDKInputError, match="sam_vit_tiny.pth: image_encoder weights do not fit"):
        load_vfm("sam_vit_b", checkpoint=path, img_size=256, arch=dict(TINY, embed_dim=64))
    with pytest.raises(TSDKInputError, match="not a positive multiple"):
        load_vfm("litemedsam", img_size=100, pretrained=False)


def test_tinyvit_fast_path_matches_the_plain_layers():
    """LiteMedSAM's TinyViT runs channels-last with frozen Conv2d+BatchNorm pairs folded into one convolution: the
    same embedding as NCHW with separate layers, refreshed after new weights, and the plain layers when trainable."""
    import copy

    from tsdk_monai.networks.tinyvit import set_tinyvit_fast_path

    torch.manual_seed(0)
    enc = build_vfm_encoder("litemedsam", img_size=64)  # frozen, eval mode
    conv = enc.backbone.patch_embed.seq[0]
    assert type(conv).__name__ == "FoldedConv2dBN"
    assert set(dict(conv.named_parameters())) == {"c.weight", "bn.weight", "bn.bias"}  # the state dict is unchanged
    assert enc.backbone.layers[0].blocks[0].conv2.c.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(enc)
    plain.backbone.to(memory_format=torch.contiguous_format)
    set_tinyvit_fast_path(plain, False)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), plain(x), rtol=1e-4, atol=1e-4)
        # new BatchNorm statistics (as load_state_dict brings) must reach the folded weights
        bn = enc.backbone.layers[0].blocks[0].conv1.bn
        state = {k: v.clone() for k, v in enc.state_dict().items()}
        state["backbone.layers.0.blocks.0.conv1.bn.running_var"] = bn.running_var * 4.0
        enc.load_state_dict(state)
        plain.load_state_dict(state)
        torch.testing.assert_close(enc(x), plain(x), rtol=1e-4, atol=1e-4)
    # trainable (finetune="full"): the plain Conv2d + BatchNorm, so both get gradients
    enc.requires_grad_(True).train()
    enc(x).mean().backward()
    assert conv.c.weight.grad is not None and conv.bn.weight.grad is not None
