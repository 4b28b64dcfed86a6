"""The diffusion UNet of the synthesis stage: a ``diffusers.UNet2DModel`` with its sizes from config.

The network predicts the noise (or velocity) added to an image: ``(B, C, H, W), (B,) timesteps ->
(B, C, H, W)``. Images are expected in ``[-1, 1]``, the range the DDPM/DDIM schedulers assume.
"""

from __future__ import annotations

from typing import Sequence

from diffusers import UNet2DModel

__all__ = ["build_diffusion_unet"]


def build_diffusion_unet(
    image_size: int = 64,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] = (32, 64, 128, 128),
    attention_levels: Sequence[bool] | None = None,
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
    dropout: float = 0.0,
) -> UNet2DModel:
    """A ``UNet2DModel`` for unconditional DDPM training on ``image_size`` x ``image_size`` images.

    Args:
        image_size: spatial size ``H = W`` of the images (recorded as ``config.sample_size``; sampling
            pipelines use it). It must be divisible by ``2 ** (len(block_out_channels) - 1)``.
        in_channels: image channels (1 for greyscale).
        out_channels: predicted channels; default ``in_channels``.
        block_out_channels: channels of each resolution level; one level per entry.
        attention_levels: whether each level has self-attention; default: attention on the last (coarsest)
            level only, which is cheap and enough for global layout.
        layers_per_block: ResNet blocks per level.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        attention_head_dim: channels per attention head.
        dropout: dropout in the ResNet blocks.

    Returns:
        ``UNet2DModel`` mapping ``(sample (B, C, H, W), timestep (B,) or scalar)`` to a
        ``UNet2DOutput`` whose ``sample`` is ``(B, out_channels, H, W)`` (``return_dict=False``: a tuple).

    Raises:
        ValueError: inconsistent sizes.
    """
    levels = len(block_out_channels)
    if levels < 1:
        raise ValueError("block_out_channels needs at least one level")
    if attention_levels is None:
        attention_levels = [False] * (levels - 1) + [True]
    if len(attention_levels) != levels:
        raise ValueError(f"attention_levels has {len(attention_levels)} entries for {levels} levels")
    if image_size % (2 ** (levels - 1)) != 0:
        raise ValueError(f"image_size {image_size} is not divisible by 2**{levels - 1} ({levels} levels)")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"norm_num_groups={norm_num_groups} does not divide block_out_channels {list(block_out_channels)}")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return UNet2DModel(
        sample_size=int(image_size),
        in_channels=int(in_channels),
        out_channels=int(out_channels if out_channels is not None else in_channels),
        block_out_channels=tuple(int(c) for c in block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=int(layers_per_block),
        norm_num_groups=int(norm_num_groups),
        attention_head_dim=int(attention_head_dim),
        dropout=float(dropout),
    )
