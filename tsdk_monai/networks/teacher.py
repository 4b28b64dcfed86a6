"""The TS-KD teacher: a SAM-family VFM fine-tuned with LoRA and a prompt-free multi-class mask decoder (as SAMed).

``LoRASegTeacher`` maps images (B, 1|3, H, W) with intensities in [0, 1] to class logits (B, C, H, W) at the
input size. The VFM's own input handling (grey to 3 channels, resize to its input size, normalisation) happens
inside the encoder (:class:`~tsdk_monai.networks.vfm.VFMEncoder`).

Saved artefacts (:func:`save_teacher`, in one folder, e.g. ``models/teacher``)::

    teacher.json                 constructor arguments (rebuilds the architecture)
    adapter/adapter_config.json  peft LoRA adapter of the encoder (finetune="lora")
    adapter/adapter_model.safetensors
    decoder.safetensors          prompt-free decoder and learned default prompts
    encoder.safetensors          the whole encoder (finetune="full" only)
    model.pt                     merged plain state dict (LoRA folded in with merge_and_unload), for inference

:func:`load_teacher` rebuilds a teacher from either the merged state dict (no VFM checkpoint needed) or the
VFM checkpoint + adapter + decoder.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsdk_monai.networks.vfm import VFMEncoder, load_vfm
from tsdk_monai.utils import TSDKInputError, atomic_write_bytes, atomic_write_json, load_error

__all__ = [
    "FINETUNE_MODES",
    "PromptFreeMaskDecoder",
    "LoRASegTeacher",
    "TEACHER_CONFIG",
    "TEACHER_MERGED",
    "TEACHER_DECODER",
    "TEACHER_ENCODER",
    "TEACHER_ADAPTER_DIR",
    "save_teacher",
    "read_teacher_config",
    "build_teacher",
    "load_teacher",
    "count_parameters",
    "log_trainable",
]

FINETUNE_MODES = ("lora", "decoder", "full")
TEACHER_CONFIG = "teacher.json"
TEACHER_MERGED = "model.pt"
TEACHER_DECODER = "decoder.safetensors"
TEACHER_ENCODER = "encoder.safetensors"
TEACHER_ADAPTER_DIR = "adapter"


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

    net = network.module if isinstance(getattr(network, "module", None), nn.Module) else network
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
    ``embed(x)``: the encoder embedding (B, 256, h, w) (LiteMedSAM at 256: (B, 256, 64, 64)) for feature KD.
    ``forward_with_embedding(x)``: both from one encoder pass.

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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder embedding (B, 256, h, w) of images x (B, 1|3, H, W) in [0, 1] (LoRA applied)."""
        return self.encoder(x)

    def decode(self, embedding: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Logits (B, C, *size) from an embedding (B, 256, h, w); ``size`` default: the decoder's (4h, 4w)."""
        logits = self.decoder(embedding)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
        return logits

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C, H, W), embedding (B, 256, h, w)) from one encoder pass."""
        emb = self.encoder(x)
        return self.decode(emb, x.shape[-2:]), emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x)[0]

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


def read_teacher_config(path: str | os.PathLike) -> dict[str, Any]:
    """The constructor arguments saved in ``path/teacher.json`` (``path``: a teacher folder or the JSON file)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / TEACHER_CONFIG
    if not file.is_file():
        raise TSDKInputError(f"{file}: teacher config not found (train the teacher bundle first)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TSDKInputError(f"{file}: not a valid teacher config ({exc})") from exc
    if not isinstance(cfg, dict) or "num_classes" not in cfg or "vfm" not in cfg:
        raise TSDKInputError(f"{file}: teacher config lacks 'num_classes'/'vfm'")
    return cfg


def _safetensors_save(state: Mapping[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save

    atomic_write_bytes(file, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def save_teacher(teacher: nn.Module, path: str | os.PathLike) -> Path:
    """Write a teacher's artefacts into the folder ``path`` (see the module docstring); return ``path``.

    Every file is written through a temporary file and a rename; ``model.pt`` is written last.
    """
    net = teacher.module if hasattr(teacher, "module") and isinstance(teacher.module, LoRASegTeacher) else teacher
    if not isinstance(net, LoRASegTeacher):
        raise TypeError(f"save_teacher needs a LoRASegTeacher, got {type(net).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(net.config)
    if net.has_adapter:
        tmp = path / f".{TEACHER_ADAPTER_DIR}.tmp"
        net.save_adapter(tmp)
        target = path / TEACHER_ADAPTER_DIR
        for f in tmp.iterdir():
            target.mkdir(exist_ok=True)
            os.replace(f, target / f.name)
        tmp.rmdir()
    _safetensors_save(net.decoder.state_dict(), path / TEACHER_DECODER)
    if net.finetune == "full":
        _safetensors_save(net.encoder.state_dict(), path / TEACHER_ENCODER)
    trainable, total = count_parameters(net)
    config["parameters"] = {"trainable": trainable, "total": total}
    atomic_write_json(path / TEACHER_CONFIG, config)
    import io

    buf = io.BytesIO()
    torch.save(net.merged_state_dict(), buf)
    atomic_write_bytes(path / TEACHER_MERGED, buf.getvalue())
    return path


_CTOR_KEYS = (
    "num_classes", "vfm", "checkpoint", "img_size", "finetune", "lora_rank", "lora_alpha", "lora_dropout",
    "target_modules", "default_prompt", "arch",
)


def build_teacher(path: str | os.PathLike, merged: bool = True, checkpoint: str | None = None) -> LoRASegTeacher:
    """The architecture of a saved teacher, weights not loaded (for a bundle's ``network_def``).

    ``merged=True``: the plain architecture (``finetune="decoder"``, no VFM checkpoint read) that ``model.pt``
    loads into. ``merged=False``: the saved fine-tuning set-up on the VFM checkpoint (``checkpoint`` overrides
    the saved path), ready for :meth:`LoRASegTeacher.load_adapter`.
    """
    cfg = read_teacher_config(path)
    kwargs = {k: cfg[k] for k in _CTOR_KEYS if k in cfg}
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    if merged:
        kwargs.update(finetune="decoder", pretrained=False)
    return LoRASegTeacher(**kwargs)


def load_teacher(
    path: str | os.PathLike,
    merged: bool = True,
    checkpoint: str | None = None,
    map_location: str | torch.device = "cpu",
    freeze: bool = True,
) -> LoRASegTeacher:
    """Rebuild a teacher saved by :func:`save_teacher` in the folder ``path``.

    Args:
        path: the teacher folder (e.g. ``<bundle>/models/teacher``).
        merged: ``True`` loads ``model.pt`` (plain weights, LoRA merged; no VFM checkpoint needed);
            ``False`` rebuilds from the VFM checkpoint + ``adapter/`` + ``decoder.safetensors``.
        checkpoint: the VFM checkpoint for ``merged=False`` when it moved since training.
        map_location: device of the returned teacher.
        freeze: eval mode and gradients off (a distillation teacher).
    """
    from safetensors.torch import load_file

    path = Path(path)
    net = build_teacher(path, merged=merged, checkpoint=checkpoint)
    if merged:
        file = path / TEACHER_MERGED
        if not file.is_file():
            raise TSDKInputError(f"{file}: merged teacher weights not found")
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise load_error(file, "teacher weights", exc) from exc
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise TSDKInputError(f"{file}: weights do not fit the saved teacher config ({exc})") from exc
    else:
        if net.has_adapter:
            net.load_adapter(path / TEACHER_ADAPTER_DIR)
        parts = [(TEACHER_DECODER, net.decoder)] + ([(TEACHER_ENCODER, net.encoder)] if net.finetune == "full" else [])
        for name, module in parts:
            file = path / name
            if not file.is_file():
                raise TSDKInputError(f"{file}: teacher weights not found")
            try:
                module.load_state_dict(load_file(str(file)), strict=True)
            except Exception as exc:
                raise TSDKInputError(f"{file}: cannot load teacher weights ({type(exc).__name__}: {exc})") from exc
    net = net.to(map_location)
    if freeze:
        net.requires_grad_(False)
        net.eval()
    return net
