"""Ensembles as one module: the members' outputs, fused by a combiner.

Most combiners take the members' class probabilities (members, N, classes); `FeatureHead`
takes their penultimate features side by side (N, members * features). Each returns
probabilities (N, classes). `EnsembleClassifier` runs every member on the same float RGB
images (each resizes and normalises its own input), so an ensemble predicts and exports
like one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from trainable.config import TrainConfig
from trainable.model import ImageClassifier, build_model
from trainable.model_files import ENSEMBLE_METHODS


class MeanProbabilities(nn.Module):
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.mean(0)


class MajorityVote(nn.Module):
    """Each member votes for its argmax; ties go to the higher mean probability.

    Returns (votes + mean probability) / (members + 1): a distribution whose argmax is the
    vote's winner, since a class with one vote more always outscores the mean-probability
    difference (which is below one).
    """

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0).to(probs.dtype)
        return (votes + probs.mean(0)) / (probs.shape[0] + 1)


class WeightedAverage(nn.Module):
    """The members' probabilities weighted by `weights`: non-negative, summing to one."""

    def __init__(self, members: int):
        super().__init__()
        self.weights: torch.Tensor
        self.register_buffer("weights", torch.full((members,), 1.0 / members))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return (self.weights.view(-1, 1, 1) * probs).sum(0)


class StackedLogistic(nn.Module):
    """A multinomial logistic regression on the members' probabilities, side by side."""

    def __init__(self, members: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(members * classes, classes)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.linear(stack_features(probs)).softmax(-1)


def stack_features(probs: torch.Tensor) -> torch.Tensor:
    """(members, N, classes) -> (N, members * classes), member by member."""
    return probs.permute(1, 0, 2).flatten(1)


class FeatureHead(nn.Module):
    """A linear classifier on the members' penultimate features, concatenated member by
    member, each standardised by the mean and std it had on the training split."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.linear = nn.Linear(features, classes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(-1)


def make_combiner(method: str, members: int, classes: int, features: int) -> nn.Module:
    """The combiner of `method` with fresh parameters; `features` is the members' feature
    widths summed (concat's input)."""
    if method == "average":
        return MeanProbabilities()
    if method == "vote":
        return MajorityVote()
    if method == "weighted":
        return WeightedAverage(members)
    if method == "stack":
        return StackedLogistic(members, classes)
    if method == "concat":
        return FeatureHead(features, classes)
    raise ValueError(f"unknown ensemble method {method!r}; "
                     f"one of {', '.join(ENSEMBLE_METHODS)}")


class EnsembleClassifier(nn.Module):
    """RGB images as float in [0, 1], N x 3 x R x R -> class probabilities (N, classes)."""

    def __init__(self, members: list[ImageClassifier], combiner: nn.Module):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combiner = combiner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.combiner, FeatureHead):
            return self.combiner(torch.cat([cast(ImageClassifier, member).features(images)
                                            .float() for member in self.members], -1))
        probs = torch.stack([member(images).float().softmax(-1) for member in self.members])
        return self.combiner(probs)


@dataclass
class EnsembleSpec:
    """What rebuilds an ensemble: the method, the classes and each member's config."""
    method: str
    class_names: list[str]
    trial_ids: list[str]
    configs: list[TrainConfig]

    @property
    def resolution(self) -> int:
        """Input side length: the largest member's, so no member upsamples its input."""
        return max(cfg.resolution for cfg in self.configs)

    def build(self) -> EnsembleClassifier:
        """The module with fresh weights, ready for a state dict."""
        members = [ImageClassifier(build_model(cfg.replace(weights="none"),
                                               len(self.class_names)), cfg.resolution)
                   for cfg in self.configs]
        features = sum(member.model.fc.in_features for member in members)
        return EnsembleClassifier(members, make_combiner(self.method, len(members),
                                                         len(self.class_names), features))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "class_names": self.class_names,
                "input_resolution": self.resolution,
                "members": [{"trial_id": t, "config": cfg.to_dict()}
                            for t, cfg in zip(self.trial_ids, self.configs, strict=True)]}
