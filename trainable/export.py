"""ONNX export of a trained model, preprocessing included."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainable.augment import IMAGENET_MEAN, IMAGENET_STD
from trainable.errors import UserError


class ImageClassifier(nn.Module):
    """RGB images as float in [0, 1], any square size -> logits: resize, normalise, model."""

    def __init__(self, model: nn.Module, resolution: int):
        super().__init__()
        self.model, self.resolution = model, resolution
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution),
                                   mode="bilinear", antialias=True, align_corners=False)
        return self.model((images - self.mean) / self.std)


def export_onnx(model: nn.Module, resolution: int, path: Path) -> None:
    """Write `path`: input `images` (N x 3 x R x R float in [0, 1]), output `logits`."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("--onnx needs the onnx extra: pip install 'resnet-hpo[onnx]'") from None
    wrapped = ImageClassifier(model, resolution).cpu().eval()
    example = torch.rand(2, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), str(path), input_names=["images"],
                          output_names=["logits"], dynamo=True, verbose=False,
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
