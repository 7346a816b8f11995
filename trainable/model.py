"""ResNet18 for fine-tuning: weights, stem, unfreeze depth and layer-wise lr groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet, ResNet18_Weights, resnet18

from trainable.augment import IMAGENET_MEAN, IMAGENET_STD, resize
from trainable.config import TrainConfig
from trainable.errors import UserError

# Stages counted from the head: unfreeze_depth d trains STAGES[:d + 1]; the stage at
# distance k from the head gets lr * layer_decay**k.
STAGES = (("fc",), ("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))


def build_model(cfg: TrainConfig, num_classes: int) -> ResNet:
    """ResNet18 with the requested stem and weights, a new fc, and frozen stages frozen."""
    model = resnet18(weights=None)
    if cfg.stem == "cifar":
        # A 3x3 stride-1 stem without max-pool keeps 32px images at a useful size. ImageNet
        # weights have no such conv1, so the CIFAR stem always trains, like fc.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()  # type: ignore[assignment]
    if cfg.weights == "imagenet":
        load_backbone(model, _imagenet_state_dict(), "weights 'imagenet'")
    elif cfg.weights != "none":
        load_backbone(model, read_state_dict(Path(cfg.weights)), f"weights file {cfg.weights}")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    for name, param in model.named_parameters():
        param.requires_grad_(stage_distance(name) <= cfg.unfreeze_depth
                             or (cfg.stem == "cifar" and name.startswith("conv1.")))
    return model


def split_frozen(model: ResNet, depth: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(frozen prefix, trainable rest) of a ResNet at unfreeze depth `depth`, made of its own
    modules: rest(prefix(x)) is model(x). The prefix holds the stages farther from the head
    than `depth`, as far as none of their parameters trains (the CIFAR stem always does):
    at depth 0 it ends with the flattened pooled features and the rest is fc; at depth 5 it
    is empty."""
    stages = [[model.conv1, model.bn1, model.relu, model.maxpool], [model.layer1],
              [model.layer2], [model.layer3], [model.layer4, model.avgpool, nn.Flatten(1)],
              [model.fc]]  # in forward order: distance 5 from the head first
    frozen = len(STAGES) - 1 - depth
    while any(p.requires_grad for stage in stages[:frozen] for module in stage
              for p in module.parameters()):
        frozen -= 1
    return (nn.Sequential(*(m for stage in stages[:frozen] for m in stage)),
            nn.Sequential(*(m for stage in stages[frozen:] for m in stage)))


def penultimate_features(model: ResNet, x: torch.Tensor) -> torch.Tensor:
    """ResNet18 up to its fc: the globally pooled features, (N, fc.in_features)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


class Backbone(nn.Module):
    """A ResNet without its fc: normalised images -> penultimate features."""

    def __init__(self, model: ResNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return penultimate_features(self.model, x)


class ImageClassifier(nn.Module):
    """RGB images as float in [0, 1], any square size -> logits: resize, normalise, model."""

    def __init__(self, model: ResNet, resolution: int):
        super().__init__()
        self.model, self.resolution = model, resolution
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.model_input(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features (N, fc.in_features) instead of the logits."""
        return penultimate_features(self.model, self.model_input(images))

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        return (resize(images, self.resolution) - self.mean) / self.std


def stage_distance(param_name: str) -> int:
    """Distance of a parameter's stage from the head: fc 0, layer4 1, ..., stem 5."""
    top = param_name.split(".")[0]
    return next(k for k, stage in enumerate(STAGES) if top in stage)


def set_train_mode(model: ResNet, training: bool) -> None:
    """model.train() that keeps BatchNorm of frozen stages in eval mode (frozen statistics)."""
    model.train(training)
    if training:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.requires_grad:
                module.eval()


def param_groups(model: ResNet, cfg: TrainConfig) -> list[dict]:
    """One group per (stage, decay or not), with `lr_scale` = layer_decay**distance.

    Norm weights and biases (all 1-d parameters) get no weight decay. Frozen parameters
    are left out, so they get no optimizer state.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        k, decay = stage_distance(name), param.ndim > 1
        group = groups.setdefault((k, decay), {
            "params": [], "lr_scale": cfg.layer_decay ** k, "stage": k,
            "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: ResNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


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
    """A state dict from a file: a plain one, or the `model` entry of a checkpoint of ours."""
    state = load_torch_file(path, "use a ResNet18 state-dict file, imagenet or none")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"weights file {path}: not a ResNet18 state dict (expected a mapping "
                        "of parameter names to tensors)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_backbone(model: ResNet, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load everything but fc; conv1 is skipped where its shape is another stem's."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    wrong = [k for k in expected.keys() & backbone.keys()
             if backbone[k].shape != expected[k].shape and k != "conv1.weight"]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
                if unexpected else f"{wrong[0]} has shape {tuple(backbone[wrong[0]].shape)}")
        raise UserError(f"{origin}: not a ResNet18 state dict ({what})")
    if backbone["conv1.weight"].shape != expected["conv1.weight"].shape:
        del backbone["conv1.weight"]
    model.load_state_dict(backbone, strict=False)
