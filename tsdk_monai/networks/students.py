"""The students of the distillation: small 2D segmentation networks with one shared contract.

Every student maps an image batch ``(B, in_channels, H, W)`` (intensities in ``[0, 1]``, ``H`` and ``W``
multiples of 16) to logits ``(B, num_classes, H, W)`` at the input size, and exposes the encoder feature
map that feature distillation matches to the teacher's embedding:

- ``forward(x)`` -> logits ``(B, C, H, W)``;
- ``forward_features(x)`` -> encoder features ``(B, feature_channels, H / 16, W / 16)``;
- ``forward_with_features(x)`` -> ``(logits, features)`` from one pass (what the distillation trainer calls);
- ``feature_channels`` and ``feature_stride`` (16) attributes;
- ``features_module``: the submodule whose output *is* that feature map, so a forward hook on it gives the
  features of a plain ``forward`` call (how the distillation trainer reads them through
  ``DistributedDataParallel``, whose gradient sync needs the call to go through ``forward``).

Students:

- ``vit_tiny``: a ViT-Ti/16 encoder (timm ``VisionTransformer``: 192 dim, 12 blocks, 3 heads, position
  embeddings interpolated for any input size) with a light UNETR-style decoder built from MONAI's UNETR
  blocks (skips from blocks 3, 6, 9 and the input). State-dict keys: ``vit.*`` (timm layout), then
  ``encoder1..4.*``, ``decoder2..5.*``, ``out.*`` (MONAI ``UNETR``'s decoder layout). MONAI's own
  ``UNETR``/``ViT`` would need the optional ``einops`` package; timm's ViT does not.
- ``unet_small``: MONAI ``BasicUNet`` (2D, features ``(16, 32, 64, 128, 256, 16)``, about 1.95M parameters);
  its state-dict keys are exactly ``BasicUNet``'s (``conv_0.*``, ``down_1..4.*``, ``upcat_1..4.*``,
  ``final_conv.*``), so a plain ``BasicUNet`` with the same features loads its weights.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.nets import BasicUNet

__all__ = ["STUDENTS", "ViTTinyUNETR", "UNetSmall", "build_student", "student_names", "load_student_weights"]


def _check_input(x: torch.Tensor, in_channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name}: expected input (B, {in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[-2] % 16 or x.shape[-1] % 16:
        raise ValueError(f"{name}: H and W must be multiples of 16, got {tuple(x.shape[-2:])} (resize the input)")


class ViTTinyUNETR(nn.Module):
    """ViT-Ti/16 encoder (timm) + UNETR-style decoder (MONAI blocks), 2D.

    Args:
        in_channels: input channels (1 for grey images).
        num_classes: output channels (background included).
        img_size: the training image size ``H`` (= ``W``) or ``(H, W)``; other sizes work (position
            embeddings are interpolated) as long as they are multiples of 16.
        feature_size: width of the decoder (UNETR's ``feature_size``).
        embed_dim, depth, num_heads, mlp_ratio: the ViT (ViT-Ti/16 defaults: 192, 12, 3, 4).
        skip_blocks: 0-based indices of the three transformer blocks whose tokens feed the decoder skips.
        norm_name: normalisation of the decoder blocks.

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``; features
    ``(B, embed_dim, H / 16, W / 16)`` (the final, layer-normed tokens as a map).
    """

    feature_stride = 16

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        img_size: int | Sequence[int] = 256,
        feature_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        skip_blocks: Sequence[int] = (2, 5, 8),
        norm_name: str | tuple = "instance",
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        img = tuple(img_size) if isinstance(img_size, Sequence) else (int(img_size), int(img_size))
        if len(skip_blocks) != 3 or max(skip_blocks) >= depth:
            raise ValueError(f"skip_blocks must be three block indices below depth={depth}, got {skip_blocks}")
        self.in_channels, self.num_classes, self.feature_channels = in_channels, num_classes, embed_dim
        self.skip_blocks = [int(i) for i in skip_blocks]
        self.vit = VisionTransformer(
            img_size=img, patch_size=16, in_chans=in_channels, num_classes=0, global_pool="", embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, dynamic_img_size=True,
        )
        fs, sd = feature_size, 2
        common = dict(spatial_dims=sd, kernel_size=3, norm_name=norm_name, res_block=True)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=fs, stride=1, **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=embed_dim, out_channels=fs * 2, num_layer=2, stride=1,
                                       upsample_kernel_size=2, conv_block=True, **common)
        self.encoder3 = UnetrPrUpBlock(in_channels=embed_dim, out_channels=fs * 4, num_layer=1, stride=1,
                                       upsample_kernel_size=2, conv_block=True, **common)
        self.encoder4 = UnetrPrUpBlock(in_channels=embed_dim, out_channels=fs * 8, num_layer=0, stride=1,
                                       upsample_kernel_size=2, conv_block=True, **common)
        self.decoder5 = UnetrUpBlock(in_channels=embed_dim, out_channels=fs * 8, upsample_kernel_size=2, **common)
        self.decoder4 = UnetrUpBlock(in_channels=fs * 8, out_channels=fs * 4, upsample_kernel_size=2, **common)
        self.decoder3 = UnetrUpBlock(in_channels=fs * 4, out_channels=fs * 2, upsample_kernel_size=2, **common)
        self.decoder2 = UnetrUpBlock(in_channels=fs * 2, out_channels=fs, upsample_kernel_size=2, **common)
        self.out = UnetOutBlock(spatial_dims=sd, in_channels=fs, out_channels=num_classes)
        self.features_out = nn.Identity()  # no parameters: a named point to hook the feature map

    @property
    def features_module(self) -> nn.Module:
        """The module whose output is the feature map ``(B, embed_dim, H/16, W/16)``."""
        return self.features_out

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token maps ``(B, embed_dim, H/16, W/16)`` of the three skip blocks and of the (normed) last block."""
        _check_input(x, self.in_channels, type(self).__name__)
        idx = self.skip_blocks + [len(self.vit.blocks) - 1]
        maps = self.vit.forward_intermediates(x, indices=idx, norm=False, output_fmt="NCHW", intermediates_only=True)
        last = self.vit.norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return list(maps[:-1]) + [self.features_out(last.contiguous())]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> encoder features ``(B, embed_dim, H/16, W/16)``."""
        return self._encode(x)[-1]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, in_channels, H, W)`` -> ``(logits (B, num_classes, H, W), features (B, embed_dim, H/16, W/16))``."""
        h3, h6, h9, feats = self._encode(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(h3)
        enc3 = self.encoder3(h6)
        enc4 = self.encoder4(h9)
        dec3 = self.decoder5(feats, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        out = self.decoder2(dec1, enc1)
        return self.out(out), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        return self.forward_with_features(x)[0]


class UNetSmall(BasicUNet):
    """MONAI ``BasicUNet`` (2D) that also exposes its bottleneck features.

    Args:
        in_channels: input channels.
        num_classes: output channels (background included).
        img_size: unused (any size that is a multiple of 16 works); accepted so every student builds alike.
        features: ``BasicUNet`` features; the default gives about 1.95M parameters.
        norm, dropout: as in ``BasicUNet``.

    Shapes: ``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``; features
    ``(B, features[4], H / 16, W / 16)`` (the output of ``down_4``).
    """

    feature_stride = 16

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        img_size: int | Sequence[int] | None = None,
        features: Sequence[int] = (16, 32, 64, 128, 256, 16),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, features=features,
                         norm=norm, dropout=dropout)
        self.in_channels, self.num_classes, self.feature_channels = in_channels, num_classes, int(features[4])

    @property
    def features_module(self) -> nn.Module:
        """The module whose output is the feature map ``(B, features[4], H/16, W/16)``: ``down_4``."""
        return self.down_4

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, in_channels, H, W)`` -> ``(logits (B, num_classes, H, W), features (B, features[4], H/16, W/16))``."""
        _check_input(x, self.in_channels, type(self).__name__)
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        u2 = self.upcat_2(u3, x1)
        u1 = self.upcat_1(u2, x0)
        return self.final_conv(u1), x4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> bottleneck features ``(B, features[4], H/16, W/16)``."""
        _check_input(x, self.in_channels, type(self).__name__)
        x0 = self.conv_0(x)
        return self.down_4(self.down_3(self.down_2(self.down_1(x0))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        return self.forward_with_features(x)[0]


STUDENTS = {"vit_tiny": ViTTinyUNETR, "unet_small": UNetSmall}


def student_names() -> list[str]:
    """The names ``build_student`` accepts."""
    return sorted(STUDENTS)


def build_student(
    name: str, in_channels: int = 1, num_classes: int = 2, img_size: int | Sequence[int] = 256, **kwargs
) -> nn.Module:
    """Build a student by name (``vit_tiny`` or ``unet_small``); extra keyword arguments go to its class.

    Returns a module mapping ``(B, in_channels, H, W)`` to logits ``(B, num_classes, H, W)``, with
    ``forward_features``, ``forward_with_features`` and ``feature_channels`` (see the module docstring).
    """
    if name not in STUDENTS:
        raise ValueError(f"unknown student '{name}'; choose one of {', '.join(student_names())}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    return STUDENTS[name](in_channels=int(in_channels), num_classes=int(num_classes), img_size=img_size, **kwargs)


def load_student_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a student's weights from ``path`` (``torch.load(..., weights_only=True)``) into ``network``; return it.

    Accepts a plain state dict (``student_distilled.pt``, ``model.pt``) or one wrapped as ``{"model": ...}`` /
    ``{"state_dict": ...}``; a ``module.`` prefix (saved from ``DistributedDataParallel``) is removed. Strict: every
    name and shape must match.

    Raises:
        TSDKInputError: the file is missing or unreadable, or its keys/shapes do not fit ``network`` (naming the
            file and the first mismatches; was it saved for another student, num_classes or in_channels?).
    """
    from tsdk_monai.utils import load_state_dict_strict, read_state_dict

    return load_state_dict_strict(network, read_state_dict(path, "student weights"), path, "the student")
