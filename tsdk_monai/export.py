"""ONNX export of a trained network (TorchScript export is MONAI's ``python -m monai.bundle ckpt_export``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["export_onnx"]


def export_onnx(network: torch.nn.Module, path: str | os.PathLike, image_size: int = 256, in_channels: int = 1,
                opset_version: int = 18) -> Path:
    """Export ``network`` ((B, in_channels, S, S) -> logits) to ONNX with a dynamic batch axis; input ``image``,
    output ``pred``. Needs the ``onnx`` and ``onnxscript`` packages (``pip install tsdk-monai[export]``).
    The file is written to a temporary name first and renamed, so a failed export leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = network.training
    network.eval()
    dummy = torch.rand(2, in_channels, image_size, image_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(
                network, (dummy,), tmp, input_names=["image"], output_names=["pred"], opset_version=opset_version,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}, dynamo=True, external_data=False,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        network.train(was_training)
    return path
