"""How good an ensemble of trained models is: every member's class probabilities on the
validation and test splits, combined by averaging, majority vote or a logistic regression
fitted on the validation split (stacking), and the accuracies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainable.config import TrainConfig
from trainable.data import load_dataset
from trainable.errors import UserError
from trainable.fusion import StackedLogistic, make_combiner, stack_features
from trainable.saved import SavedModel
from trainable.train import DeviceImages, Runtime, predict_logits

STACK_MAX_FOLDS = 5


@dataclass
class Member:
    trial_id: str
    saved: SavedModel


@dataclass
class SplitProbs:
    labels: torch.Tensor  # (N,)
    probs: torch.Tensor  # (members, N, classes), members in rank order


def member_probabilities(members: list[Member], device: torch.device
                         ) -> tuple[SplitProbs, SplitProbs | None]:
    """Every member's probabilities on the val and test splits of the data it was trained on.

    Members sharing (data, resolution, val_fraction) share one decoded dataset.
    """
    groups: dict[tuple[str, int, float], list[int]] = {}
    for i, m in enumerate(members):
        cfg = m.saved.cfg
        groups.setdefault((cfg.data, cfg.resolution, cfg.val_fraction), []).append(i)
    per_split: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {
        "val": [None] * len(members), "test": [None] * len(members)}
    for key, indices in groups.items():
        data = load_dataset(*key)
        if data.class_names != members[0].saved.class_names:
            raise UserError(f"data {key[0]}: its classes differ from the checkpoints'; was it "
                            "changed since the search?")
        for name, split in (("val", data.val), ("test", data.test)):
            if split is None:
                continue
            images = DeviceImages(split, device)
            for i in indices:
                cfg = members[i].saved.cfg
                logits = predict_logits(members[i].saved.model.to(device), images,
                                        eval_runtime(cfg, device), 2 * cfg.batch_size)
                per_split[name][i] = (images.labels.cpu(), logits.softmax(-1).cpu())
    return _combine_split(members, per_split["val"], "val"), (
        _combine_split(members, per_split["test"], "test")
        if any(p is not None for p in per_split["test"]) else None)


def eval_runtime(cfg: TrainConfig, device: torch.device) -> Runtime:
    """The trial's runtime, but fp32 on the CPU, where bf16 is slow and fp16 unsupported."""
    return Runtime.for_config(cfg if device.type == "cuda" else cfg.replace(amp="off"), device)


def _combine_split(members: list[Member],
                   outputs: list[tuple[torch.Tensor, torch.Tensor] | None],
                   split: str) -> SplitProbs:
    present = [out for out in outputs if out is not None]
    for m, out in zip(members, outputs, strict=True):
        if out is None or not torch.equal(out[0], present[0][0]):
            raise UserError(f"trial {m.trial_id}: its {split} split differs from trial "
                            f"{members[0].trial_id}'s (other data or val_fraction); members "
                            "must be evaluated on the same images")
    return SplitProbs(present[0][0], torch.stack([probs for _, probs in present]))


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(-1) == labels).double().mean().item()


@dataclass
class Scores:
    val_acc: float
    test_acc: float | None


def scores_of_members(val: SplitProbs, test: SplitProbs | None) -> list[Scores]:
    """Each member's own accuracy, in rank order."""
    return [Scores(accuracy(val.probs[i], val.labels),
                   accuracy(test.probs[i], test.labels) if test is not None else None)
            for i in range(len(val.probs))]


def combine(method: str, val: SplitProbs, test: SplitProbs | None
            ) -> tuple[nn.Module, Scores]:
    """The fitted combiner and the ensemble's accuracy. Stacking's val_acc is cross-validated
    and its test_acc comes from a fit on all of val, so it never scores data it was fit on."""
    if method == "stack":
        return fit_stack(val, test)
    members, _, classes = val.probs.shape
    combiner = make_combiner(method, members, classes)
    test_acc = accuracy(combiner(test.probs), test.labels) if test is not None else None
    return combiner, Scores(accuracy(combiner(val.probs), val.labels), test_acc)


def fit_stack(val: SplitProbs, test: SplitProbs | None) -> tuple[StackedLogistic, Scores]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    members, _, classes = val.probs.shape
    features, labels = stack_features(val.probs).numpy(), val.labels.numpy()
    folds = min(STACK_MAX_FOLDS, int(np.bincount(labels, minlength=classes).min()))
    if folds < 2:
        raise UserError("--method stack: needs at least 2 validation images of every class "
                        "for cross-validation; use average or vote")
    regression = LogisticRegression(max_iter=1000)
    held_out = cross_val_predict(regression, features, labels,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    regression.fit(features, labels)
    test_acc = (float(regression.score(stack_features(test.probs).numpy(), test.labels.numpy()))
                if test is not None else None)
    return (stacked_module(regression, members, classes),
            Scores(float(np.mean(held_out == labels)), test_acc))


def stacked_module(regression: Any, members: int, classes: int) -> StackedLogistic:
    """The fitted regression as a torch Linear (so it exports to ONNX)."""
    coef, intercept = regression.coef_, regression.intercept_
    if classes == 2:  # sklearn fits one logit z for class 1; softmax(-z/2, z/2) = sigmoid(z)
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept,
                                                                             intercept]) / 2
    module = StackedLogistic(members, classes)
    with torch.no_grad():
        module.linear.weight.copy_(torch.from_numpy(coef))
        module.linear.bias.copy_(torch.from_numpy(intercept))
    return module
