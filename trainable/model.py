"""ResNet18 for fine-tuning: weights, stem, unfreeze depth and layer-wise lr groups."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models import ResNet, resnet18

from trainable.augment import IMAGENET_MEAN, IMAGENET_STD, resize
from trainable.config import TrainConfig
from trainable.weights import load_pretrained

# Stages counted from the head: unfreeze_depth d trains STAGES[:d + 1]; the stage at
# distance k from the head gets lr * layer_decay**k.
STAGES = (("fc",), ("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))


def build_model(cfg: TrainConfig, num_classes: int) -> ResNet:
    """ResNet18 with the requested stem and weights, a new fc, and frozen stages frozen."""
    model = resnet18(weights=None)
    if cfg.stem == "cifar":
        # A 3x3 stride-1 stem without max-pool keeps 32px images at a useful size.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()  # type: ignore[assignment]
    loaded = load_pretrained(model, cfg.weights)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    # A CIFAR stem the weights lack (ImageNet's conv1 is 7x7) is new, so it trains like fc.
    new_stem = cfg.stem == "cifar" and "conv1.weight" not in loaded
    for name, param in model.named_parameters():
        param.requires_grad_(stage_distance(name) <= cfg.unfreeze_depth
                             or (new_stem and name.startswith("conv1.")))
    return model


_initial: dict[tuple[object, ...], tuple[ResNet, torch.Tensor]] = {}  # one entry at most


def initial_model(cfg: TrainConfig, num_classes: int) -> tuple[ResNet, dict[str, torch.Tensor]]:
    """`build_model` after `torch.manual_seed(cfg.seed)`, leaving the CPU random state where
    building leaves it, and its weights (shared, never to be written). A process that trains
    trial after trial (a reused Ray actor) builds each seed's model once and copies it after
    (building initialises every layer twice, nn's init then torchvision's: most of a trial's
    start). Weights from a file or URI are read each time: the file may have changed."""
    key = (cfg.seed, cfg.stem, cfg.weights, cfg.unfreeze_depth, num_classes)
    if key not in _initial:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, num_classes)
        if cfg.weights not in ("none", "imagenet"):
            return model, copy.deepcopy(model.state_dict())
        _initial.clear()
        _initial[key] = (model, torch.get_rng_state())
    model, random_state = _initial[key]
    torch.set_rng_state(random_state)
    return copy.deepcopy(model), model.state_dict()


def split_frozen(model: ResNet, depth: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(frozen prefix, trainable rest) of a ResNet at unfreeze depth `depth`, made of its own
    modules: rest(prefix(x)) is model(x). The prefix holds the stages farther from the head
    than `depth`, as far as none of their parameters trains (a new CIFAR stem always does):
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
