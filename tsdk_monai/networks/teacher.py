"""The TS-KD teacher: a SAM-family VFM fine-tuned with LoRA and a prompt-free multi-class mask decoder (as SAMed).

``LoRASegTeacher`` maps images (B, 1|3, H, W) with intensities in [0, 1] to class logits (B, C, H, W) at the
input size. The VFM's own input handling (grey to 3 channels, resize to its input size, normalisation) happens
inside the encoder (:class:`~tsdk_monai.networks.vfm.VFMEncoder`). It speaks the students' protocol:
``forward_features(x)`` (the encoder embedding) and ``forward_with_features(x)`` (logits and embedding from one pass).
Its artefacts (adapter, decoder, merged state dict) are written and read by :mod:`tsdk_monai.networks.teacher_io`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsdk_monai.networks.vfm import VFMEncoder, load_vfm
from tsdk_monai.utils import TSDKInputError, unwrap

__all__ = ["FINETUNE_MODES", "PromptFreeMaskDecoder", "LoRASegTeacher", "count_parameters", "log_trainable"]

FINETUNE_MODES = ("lora", "decoder", "full")


class PromptFreeMaskDecoder(nn.Module):
    """SAM's mask decoder made prompt-free and multi-class (SAMed-style).

    The two-way transformer and the upscaling path come from the pretrained SAM decoder. Prompts are replaced by
    learned default prompt embeddings: a dense one (initialised from the prompt encoder's ``no_mask_embed``) and,
    with ``default_prompt="box"``, two sparse tokens initialised from the embedding of a box covering the whole
    image (LiteMedSAM was trained with box prompts only). There is one mask token and one hypernetwork MLP per
    class, initialised from SAM's single-mask output (token 0); the background's MLP is negated so the initial
    two-class prediction is the pretrained whole-image box mask.

    ``forward(embedding)``: embedding (B, 256, h, w) -> logits (B, num_classes, 4h, 4w).

    Args:
        mask_decoder: a SAM ``MaskDecoder`` (pretrained weights are copied).
        prompt_encoder: a SAM ``PromptEncoder`` (its positional encoding and default embeddings are copied).
        num_classes: output channels, background included (>= 2).
        default_prompt: ``"box"`` (two learned sparse tokens from the whole-image box) or ``"none"``.
    """

    def __init__(
        self, mask_decoder: nn.Module, prompt_encoder: nn.Module, num_classes: int, default_prompt: str = "box"
    ) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        if default_prompt not in ("box", "none"):
            raise ValueError(f"default_prompt must be 'box' or 'none', got {default_prompt!r}")
        self.num_classes = int(num_classes)
        self.transformer = copy.deepcopy(mask_decoder.transformer)
        self.output_upscaling = copy.deepcopy(mask_decoder.output_upscaling)
        self.iou_token = copy.deepcopy(mask_decoder.iou_token)  # kept: part of SAM's token sequence
        dim = mask_decoder.transformer_dim
        self.mask_tokens = nn.Embedding(self.num_classes, dim)
        mlps = []
        with torch.no_grad():
            for c in range(self.num_classes):
                self.mask_tokens.weight[c].copy_(mask_decoder.mask_tokens.weight[0])
                mlp = copy.deepcopy(mask_decoder.output_hypernetworks_mlps[0])
                if c == 0:  # background = -foreground at initialisation
                    mlp.layers[-1].weight.neg_()
                    mlp.layers[-1].bias.neg_()
                mlps.append(mlp)
        self.output_hypernetworks_mlps = nn.ModuleList(mlps)
        self.pe_layer = copy.deepcopy(prompt_encoder.pe_layer)  # random Fourier features (a buffer, not trained)
        self.dense_prompt = nn.Parameter(prompt_encoder.no_mask_embed.weight.detach().clone().reshape(1, dim, 1, 1))
        self.default_prompt = default_prompt
        if default_prompt == "box":
            s = float(prompt_encoder.input_image_size[0])
            with torch.no_grad():
                box = torch.tensor([[[0.0, 0.0, s - 1.0, s - 1.0]]])
                sparse, _ = prompt_encoder(points=None, boxes=box, masks=None)
            self.sparse_prompt = nn.Parameter(sparse.detach().clone())  # (1, 2, dim)
        else:
            self.register_parameter("sparse_prompt", None)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        b, c, h, w = embedding.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
        if self.sparse_prompt is not None:
            tokens = torch.cat([tokens, self.sparse_prompt.expand(b, -1, -1)], dim=1)
        src = embedding + self.dense_prompt
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + self.num_classes, :]
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        bu, cu, hu, wu = up.shape
        return (hyper @ up.view(bu, cu, hu * wu)).view(bu, self.num_classes, hu, wu)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def log_trainable(network: nn.Module) -> str:
    """Log and print the trainable share of a network's parameters (a bundle's ``initialize`` step); return it."""
    import logging

    net = unwrap(network)
    if isinstance(net, LoRASegTeacher):
        line = net.trainable_summary()
    else:
        trainable, total = count_parameters(net)
        line = f"{type(net).__name__}: trainable {trainable:,} of {total:,} parameters ({100.0 * trainable / max(total, 1):.2f}%)"
    logging.getLogger("tsdk_monai").info(line)
    print(line, flush=True)
    return line


class LoRASegTeacher(nn.Module):
    """VFM encoder (frozen, with peft LoRA) + prompt-free multi-class SAM decoder -> logits at the input size.

    ``forward(x)``: x (B, 1|3, H, W), intensities in [0, 1] -> logits (B, num_classes, H, W).
    ``forward_features(x)``: the encoder embedding (B, 256, h, w) (LiteMedSAM at 256: (B, 256, 64, 64)) for
    feature KD. ``forward_with_features(x)``: both from one encoder pass.

    Args:
        num_classes: output channels, background included.
        vfm: a name of :data:`~tsdk_monai.networks.vfm.VFM_NAMES` (default ``litemedsam``).
        checkpoint: the VFM's SAM-layout checkpoint (default for ``litemedsam``: the verified packaged one).
        img_size: the encoder's input side (default: the VFM's native size, 256 for LiteMedSAM).
        finetune: ``"lora"`` (encoder frozen, LoRA adapters + decoder trained), ``"decoder"`` (encoder frozen,
            decoder only; also the plain architecture a merged state dict loads into) or ``"full"`` (everything).
        lora_rank, lora_alpha, lora_dropout, target_modules: peft ``LoraConfig`` (``r``, ``lora_alpha`` (default:
            the rank, i.e. scale 1 as in SAMed), ``lora_dropout``, ``target_modules``: default the attention qkv
            linear layers; add ``"proj"``, ``"fc1"``, ``"fc2"`` (TinyViT) or ``"mlp.fc1"`` etc. for more).
        default_prompt: ``"box"`` or ``"none"`` (see :class:`PromptFreeMaskDecoder`).
        arch: SAM ViT architecture overrides (small test checkpoints).
        pretrained: ``False`` skips reading the VFM checkpoint (for loading a merged state dict afterwards).
    """

    def __init__(
        self,
        num_classes: int = 2,
        vfm: str = "litemedsam",
        checkpoint: str | os.PathLike | None = None,
        img_size: int | None = None,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] | str = ("qkv",),
        default_prompt: str = "box",
        arch: Mapping[str, Any] | None = None,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise TSDKInputError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
        if finetune == "lora" and int(lora_rank) < 1:
            raise TSDKInputError(f"lora_rank must be >= 1 with finetune='lora', got {lora_rank}")
        targets = [target_modules] if isinstance(target_modules, str) else [str(t) for t in target_modules]
        parts = load_vfm(vfm, checkpoint=checkpoint, img_size=img_size, arch=arch, pretrained=pretrained)
        self.config: dict[str, Any] = {
            # None = the VFM's default (LiteMedSAM's packaged checkpoint, verified again on every load)
            "num_classes": int(num_classes), "vfm": vfm,
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).absolute()),
            "img_size": parts.encoder.img_size, "finetune": finetune, "lora_rank": int(lora_rank),
            "lora_alpha": float(lora_alpha if lora_alpha is not None else lora_rank),
            "lora_dropout": float(lora_dropout), "target_modules": targets, "default_prompt": default_prompt,
            "arch": dict(arch) if arch else None,
        }
        self.num_classes = int(num_classes)
        self.finetune = finetune
        self.encoder: VFMEncoder = parts.encoder
        self.decoder = PromptFreeMaskDecoder(parts.mask_decoder, parts.prompt_encoder, num_classes, default_prompt)
        if finetune != "full":
            self.encoder.requires_grad_(False)
        if finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=int(lora_rank), lora_alpha=self.config["lora_alpha"], lora_dropout=float(lora_dropout),
                target_modules=targets, bias="none",
            )
            try:
                self.encoder.backbone = get_peft_model(self.encoder.backbone, lora)
            except ValueError as exc:  # peft: target modules not found
                raise TSDKInputError(f"LoRA target_modules {targets} do not match the {vfm} encoder: {exc}") from exc

    def train(self, mode: bool = True) -> "LoRASegTeacher":
        """As ``nn.Module.train``, but a frozen encoder's BatchNorm layers (TinyViT has them) stay in eval mode:
        otherwise their running statistics would drift during LoRA/decoder training although the base is frozen."""
        super().train(mode)
        if mode and self.finetune != "full":
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def has_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.encoder.backbone, PeftModel)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder embedding (B, 256, h, w) of images x (B, 1|3, H, W) in [0, 1] (LoRA applied)."""
        return self.encoder(x)

    def decode(self, embedding: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Logits (B, C, *size) from an embedding (B, 256, h, w); ``size`` default: the decoder's (4h, 4w)."""
        logits = self.decoder(embedding)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
        return logits

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C, H, W), embedding (B, 256, h, w)) from one encoder pass."""
        emb = self.encoder(x)
        return self.decode(emb, x.shape[-2:]), emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def trainable_summary(self) -> str:
        trainable, total = count_parameters(self)
        return (
            f"{type(self).__name__}({self.config['vfm']}, finetune={self.finetune}): trainable {trainable:,} of "
            f"{total:,} parameters ({100.0 * trainable / max(total, 1):.2f}%)"
        )

    # ------------------------------------------------------------------------------------------ artefacts
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain state dict with LoRA folded into the base weights (peft ``merge_and_unload``), on the CPU.

        It loads into ``LoRASegTeacher(**config, finetune="decoder")``; ``self`` is left unchanged.
        """
        if not self.has_adapter:
            return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        merged = copy.deepcopy(self).cpu()
        merged.encoder.backbone = merged.encoder.backbone.merge_and_unload()
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights only (peft ``get_peft_model_state_dict``)."""
        from peft import get_peft_model_state_dict

        if not self.has_adapter:
            raise TSDKInputError("this teacher has no LoRA adapter (finetune is not 'lora')")
        return get_peft_model_state_dict(self.encoder.backbone)

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Save the LoRA adapter with peft (``adapter_config.json`` + ``adapter_model.safetensors``) into ``path``."""
        if not self.has_adapter:
            raise TSDKInputError("this teacher has no LoRA adapter (finetune is not 'lora')")
        path = Path(path)
        self.encoder.backbone.save_pretrained(str(path), safe_serialization=True)
        return path

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load LoRA weights saved by :meth:`save_adapter` (strict: every LoRA weight must be present)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not self.has_adapter:
            raise TSDKInputError("this teacher has no LoRA adapter (finetune is not 'lora')")
        file = Path(path) / "adapter_model.safetensors"
        if not file.is_file():
            raise TSDKInputError(f"{file}: LoRA adapter file not found")
        try:
            state = load_file(str(file))
        except Exception as exc:
            raise TSDKInputError(f"{file}: cannot read LoRA adapter ({type(exc).__name__}: {exc})") from exc
        expected = set(self.adapter_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise TSDKInputError(
                f"{file}: adapter does not fit this teacher (missing {missing[:3]}, unexpected {extra[:3]}); "
                "check lora_rank/target_modules/vfm"
            )
        set_peft_model_state_dict(self.encoder.backbone, state)
        self.encoder.train(self.encoder.training)  # refresh cached attention biases
