"""The pretrained weights a model starts from (TrainConfig's `weights`), read with one-line
errors and loaded into everything but its fc:

    imagenet     torchvision's ImageNet weights (its download and cache)
    none         none: every parameter starts random
    LOCATION     a local path (absolute in a config) or a storage URI (s3://...) of
                 a state-dict file (a checkpoint.pt file of ours: its best epoch's weights),
                 a model directory (resnet-hpo train: its model.pt) or
                 a trial checkpoint (checkpoint.pt: its best epoch's weights)

A search's run directory is a location too, for the commands (search/): they resolve it to
its best trial's checkpoint before a config holds it.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torchvision.models import ResNet, ResNet18_Weights

from trainable.errors import UserError
from trainable.model_files import CHECKPOINT_FILE, MODEL_FILE
from trainable.storage import local_copy

ALLOWED = ("use imagenet, none, or ResNet18 weights: a state-dict file, a model directory "
           "(resnet-hpo train --output), a trial checkpoint or a search's run directory")


def load_pretrained(model: ResNet, weights: str) -> set[str]:
    """Load `weights` into everything but the model's fc; the names of the entries loaded."""
    if weights == "none":
        return set()
    if weights == "imagenet":
        return load_backbone(model, _imagenet_state_dict(), "weights 'imagenet'")
    return load_backbone(model, read_weights(weights), f"weights {weights}")


def read_weights(location: str) -> dict[str, torch.Tensor]:
    """The state dict at `location`: a file, a model directory or a trial checkpoint."""
    with ExitStack() as stack:  # only a location that cannot be had gets ALLOWED appended
        try:
            path = stack.enter_context(local_copy(location))
        except UserError as e:
            raise UserError(f"weights {e}; {ALLOWED}") from None
        return read_state_dict(weights_file(path))


def weights_file(path: Path) -> Path:
    """The file that holds the weights of `path`: itself, or a directory's model.pt or
    checkpoint.pt."""
    if not path.is_dir():
        return path
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        if (path / name).is_file():
            return path / name
    raise UserError(f"weights {path}: a directory with neither {MODEL_FILE} (a model "
                    f"directory) nor {CHECKPOINT_FILE} (a trial checkpoint); {ALLOWED}")


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from its cache ($TORCH_HOME) or downloaded once."""
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(
            f"weights 'imagenet': not in torchvision's cache ({torch.hub.get_dir()}) and the "
            f"download failed ({e}); use --weights PATH (a ResNet18 state-dict file) or "
            "--weights none") from None


def load_torch_file(path: Path, advice: str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True, so nothing in the file runs. A missing file, or one
    torch.save did not write, is one UserError naming it, then `advice`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; {advice}") from None
    except Exception as e:  # unpickling errors come in many types
        raise UserError(f"{path}: not a loadable PyTorch file ({type(e).__name__}); {advice}"
                        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain one, or the best epoch's weights of a checkpoint of
    ours (`best_model`; else its `model`)."""
    state = load_torch_file(path, ALLOWED)
    if isinstance(state, dict):
        state = next((state[key] for key in ("best_model", "model")
                      if isinstance(state.get(key), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"weights file {path}: not a ResNet18 state dict (expected a mapping "
                        "of parameter names to tensors)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_backbone(model: ResNet, state: dict[str, torch.Tensor], origin: str) -> set[str]:
    """Load everything but fc; the names loaded. ImageNet's 7x7 conv1 does not fit the 3x3
    CIFAR stem, which then stays new; the CIFAR stem's conv1 does not fit the ImageNet
    stem."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise UserError(f"{origin}: not a ResNet18 state dict ({what})")
    kernels = (backbone["conv1.weight"].shape[-2:], expected["conv1.weight"].shape[-2:])
    if kernels == ((3, 3), (7, 7)):
        raise UserError(f"{origin}: its conv1 is the CIFAR stem's (3x3), which the ImageNet "
                        "stem (7x7) cannot take; use stem cifar")
    if kernels == ((7, 7), (3, 3)):
        del backbone["conv1.weight"]
    wrong = [k for k in backbone if backbone[k].shape != expected[k].shape]
    if wrong:
        raise UserError(f"{origin}: not a ResNet18 state dict ({wrong[0]} has shape "
                        f"{tuple(backbone[wrong[0]].shape)})")
    model.load_state_dict(backbone, strict=False)
    return set(backbone)
