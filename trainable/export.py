"""ONNX export of any saved classifier (one model or an ensemble), preprocessing included."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from trainable.errors import UserError


def export_onnx(module: nn.Module, resolution: int, path: Path, output_name: str) -> None:
    """Write `path`: input `images` (N x 3 x R x R float RGB in [0, 1]), output `output_name`
    (what `module` returns: logits of a model, probabilities of an ensemble)."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("--onnx needs the onnx extra: pip install 'resnet-hpo[onnx]'") from None
    example = torch.rand(2, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu().eval(), (example,), str(path), input_names=["images"],
                          output_names=[output_name], dynamo=True, verbose=False,
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
