"""How good an ensemble of trained models is: every member's outputs on the splits, each
method's fitted combiner, its predictions and its accuracies.

No combiner scores images it was fitted on. `weighted` and `stack` are fitted on the
validation split, so their val predictions are cross-validated (each image predicted by a
combiner fitted on the other folds) and their test predictions come from a fit on all of
val. `concat`'s head is fitted on the training split's features, early-stopped on val, and
predicts val and test.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainable.config import TrainConfig
from trainable.data import Split, load_dataset
from trainable.device_images import DeviceImages
from trainable.errors import UserError
from trainable.fusion import (
    FeatureHead,
    StackedLogistic,
    WeightedAverage,
    make_combiner,
    stack_features,
)
from trainable.model import Backbone
from trainable.runtime import Runtime
from trainable.saved import SavedModel
from trainable.train import predict_outputs

CV_MAX_FOLDS = 5
WEIGHTS_MAX_ITER = 200
HEAD_LR = 1e-2
HEAD_WEIGHT_DECAY = 1e-4
HEAD_BATCH_SIZE = 256
HEAD_MAX_EPOCHS = 200
HEAD_PATIENCE = 10  # epochs without a lower val loss before the head stops
# A feature nearly constant on the training split would otherwise be scaled up by orders of
# magnitude wherever it does vary.
HEAD_MIN_STD = 1e-2


@dataclass
class Member:
    trial_id: str
    saved: SavedModel


@dataclass
class SplitOutputs:
    """The members' outputs on one split, members in rank order."""
    labels: torch.Tensor  # (N,)
    probs: torch.Tensor  # (members, N, classes)
    features: torch.Tensor | None = None  # (N, members * 512): penultimate, member by member


@dataclass
class MemberOutputs:
    train: SplitOutputs | None  # only for concat, which trains its head there
    val: SplitOutputs
    test: SplitOutputs | None
    train_seconds: float = 0.0  # spent running the members over the training split


def member_outputs(members: list[Member], device: torch.device, decoded_resolution: int | None,
                   with_features: bool = False) -> MemberOutputs:
    """Every member's probabilities on the val and test splits of the data it was trained on;
    `with_features` adds its penultimate features there and on the training split.

    The data is decoded at `decoded_resolution` (the search's, from search.json) and each
    member resizes it to its own resolution, as its trial did; without it (or below a
    member's resolution), at the member's. Members sharing (data, decoded resolution,
    val_fraction) share one decoded dataset.
    """
    names = ("train", "val", "test") if with_features else ("val", "test")
    groups: dict[tuple[str, int, float], list[int]] = {}
    for i, m in enumerate(members):
        cfg = m.saved.cfg
        decoded = max(cfg.resolution, decoded_resolution or 0)
        groups.setdefault((cfg.data, decoded, cfg.val_fraction), []).append(i)
    per_split: dict[str, list[SplitOutputs | None]] = {name: [None] * len(members)
                                                        for name in names}
    train_seconds = 0.0
    for key, indices in groups.items():
        data = load_dataset(*key)
        if data.class_names != members[0].saved.class_names:
            raise UserError(f"data {key[0]}: its classes differ from the checkpoints'; was it "
                            "changed since the search?")
        splits: dict[str, Split | None] = {"train": data.train, "val": data.val,
                                           "test": data.test}
        for name in names:
            split = splits[name]
            if split is None:
                continue
            start = time.perf_counter()
            images = DeviceImages(split, device)
            for i in indices:
                per_split[name][i] = run_member(members[i].saved, images, device, with_features)
            if name == "train":
                train_seconds += time.perf_counter() - start
    return MemberOutputs(
        _gather(members, per_split["train"], "train") if with_features else None,
        _gather(members, per_split["val"], "val"),
        _gather(members, per_split["test"], "test")
        if any(out is not None for out in per_split["test"]) else None,
        train_seconds)


@torch.no_grad()
def run_member(saved: SavedModel, images: DeviceImages, device: torch.device,
               with_features: bool) -> SplitOutputs:
    """One member on one split: its features, and its probabilities computed from them."""
    model = saved.model.to(device)
    features = predict_outputs(Backbone(model), images, eval_runtime(saved.cfg, device),
                               saved.cfg.eval_batch_size)
    return SplitOutputs(images.labels.cpu(), model.fc(features).softmax(-1).cpu(),
                        features.cpu() if with_features else None)


def eval_runtime(cfg: TrainConfig, device: torch.device) -> Runtime:
    """The trial's runtime, but fp32 on the CPU, where bf16 is slow and fp16 unsupported."""
    return Runtime.for_config(cfg if device.type == "cuda" else cfg.replace(amp="off"), device)


def _gather(members: list[Member], outputs: list[SplitOutputs | None],
            split: str) -> SplitOutputs:
    present = [out for out in outputs if out is not None]
    for m, out in zip(members, outputs, strict=True):
        if out is None or not torch.equal(out.labels, present[0].labels):
            raise UserError(f"trial {m.trial_id}: its {split} split differs from trial "
                            f"{members[0].trial_id}'s (other data or val_fraction); members "
                            "must be evaluated on the same images")
    features = [out.features for out in present if out.features is not None]
    return SplitOutputs(present[0].labels, torch.stack([out.probs for out in present]),
                        torch.cat(features, 1) if features else None)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(-1) == labels).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean negative log-probability of the true class: a trial's val_loss, for
    probabilities."""
    return -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean().item()


@dataclass
class Scores:
    val_acc: float
    test_acc: float | None
    val_loss: float


def score(val_probs: torch.Tensor, test_probs: torch.Tensor | None,
          outputs: MemberOutputs) -> Scores:
    test = outputs.test
    return Scores(accuracy(val_probs, outputs.val.labels),
                  accuracy(test_probs, test.labels)
                  if test is not None and test_probs is not None else None,
                  nll(val_probs, outputs.val.labels))


def scores_of_members(outputs: MemberOutputs) -> list[Scores]:
    """Each member's own scores, in rank order."""
    test = outputs.test
    return [score(outputs.val.probs[i], test.probs[i] if test is not None else None, outputs)
            for i in range(len(outputs.val.probs))]


@dataclass
class Fitted:
    """One method's combiner and its predictions, none on images it was fitted on."""
    method: str
    combiner: nn.Module
    val_probs: torch.Tensor  # (N, classes)
    test_probs: torch.Tensor | None
    scores: Scores
    fit_seconds: float  # spent fitting the combiner: 0 for average and vote


def fitted(method: str, combiner: nn.Module, val_probs: torch.Tensor,
           test_probs: torch.Tensor | None, outputs: MemberOutputs,
           fit_seconds: float) -> Fitted:
    return Fitted(method, combiner, val_probs, test_probs,
                  score(val_probs, test_probs, outputs), fit_seconds)


@torch.no_grad()
def combine(method: str, outputs: MemberOutputs) -> Fitted:
    """`method`'s combiner, fitted where it has parameters, and its predictions."""
    if method == "weighted":
        return cross_fitted(method, outputs, fit_weights)
    if method == "stack":
        return cross_fitted(method, outputs, fit_logistic)
    if method == "concat":
        return fit_concat(outputs)
    members, _, classes = outputs.val.probs.shape
    combiner = make_combiner(method, members, classes, 0)
    return fitted(method, combiner, combiner(outputs.val.probs),
                  combiner(outputs.test.probs) if outputs.test is not None else None,
                  outputs, 0.0)


def rows(split: SplitOutputs, index: np.ndarray) -> SplitOutputs:
    idx = torch.from_numpy(index)
    return SplitOutputs(split.labels[idx], split.probs[:, idx])


def cross_fitted(method: str, outputs: MemberOutputs,
                 fit: Callable[[SplitOutputs], nn.Module]) -> Fitted:
    """Val predictions out of fold (each fold by a combiner fitted on the others); test
    predictions by a combiner fitted on all of val, which is the one kept."""
    from sklearn.model_selection import StratifiedKFold

    val = outputs.val
    labels = val.labels.numpy()
    folds = min(CV_MAX_FOLDS, int(np.bincount(labels, minlength=val.probs.shape[-1]).min()))
    if folds < 2:
        raise UserError(f"--method {method}: needs at least 2 validation images of every "
                        "class for cross-validation; use average or vote")
    start = time.perf_counter()
    held_out = torch.empty(val.probs.shape[1:])
    for fit_rows, predict_rows in StratifiedKFold(folds, shuffle=True,
                                                  random_state=0).split(labels, labels):
        held_out[torch.from_numpy(predict_rows)] = fit(rows(val, fit_rows))(
            val.probs[:, torch.from_numpy(predict_rows)])
    combiner = fit(val)
    seconds = time.perf_counter() - start
    return fitted(method, combiner, held_out,
                  combiner(outputs.test.probs) if outputs.test is not None else None,
                  outputs, seconds)


def fit_weights(split: SplitOutputs) -> WeightedAverage:
    """Weights on the simplex (the softmax of free logits) minimising the negative log
    likelihood of the weighted average on `split`."""
    true_class = split.probs[:, torch.arange(len(split.labels)), split.labels].double()
    logits = torch.zeros(len(true_class), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=WEIGHTS_MAX_ITER, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -(logits.softmax(0) @ true_class).clamp_min(1e-12).log().mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(nll)
    module = WeightedAverage(len(true_class))
    module.weights.copy_(logits.detach().softmax(0))
    return module


def fit_logistic(split: SplitOutputs) -> StackedLogistic:
    from sklearn.linear_model import LogisticRegression

    members, _, classes = split.probs.shape
    regression = LogisticRegression(max_iter=1000).fit(stack_features(split.probs).numpy(),
                                                       split.labels.numpy())
    return stacked_module(regression, members, classes)


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


def fit_concat(outputs: MemberOutputs) -> Fitted:
    train, val, test = outputs.train, outputs.val, outputs.test
    if train is None or train.features is None or val.features is None:
        raise ValueError("concat needs member_outputs(..., with_features=True)")
    start = time.perf_counter()
    head = train_feature_head(train.features, train.labels, val.features, val.labels,
                              val.probs.shape[-1])
    seconds = time.perf_counter() - start
    return fitted("concat", head, head(val.features),
                  head(test.features) if test is not None and test.features is not None
                  else None, outputs, seconds)


def train_feature_head(features: torch.Tensor, labels: torch.Tensor,
                       val_features: torch.Tensor, val_labels: torch.Tensor,
                       classes: int) -> FeatureHead:
    """A linear head fitted on (features, labels) only; val picks the epoch it stops at
    (lowest val cross-entropy) and is never trained on."""
    head = FeatureHead(features.shape[1], classes)
    head.mean.copy_(features.mean(0))
    head.std.copy_(features.std(0).clamp_min(HEAD_MIN_STD))
    nn.init.zeros_(head.linear.weight)
    nn.init.zeros_(head.linear.bias)
    optimizer = torch.optim.AdamW(head.linear.parameters(), lr=HEAD_LR,
                                  weight_decay=HEAD_WEIGHT_DECAY)
    order = torch.Generator().manual_seed(0)
    best_loss, best_state, stale = float("inf"), copy.deepcopy(head.state_dict()), 0
    for _ in range(HEAD_MAX_EPOCHS):
        with torch.enable_grad():
            for batch in torch.randperm(len(labels), generator=order).split(HEAD_BATCH_SIZE):
                loss = F.cross_entropy(head.logits(features[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        val_loss = F.cross_entropy(head.logits(val_features), val_labels).item()
        if val_loss < best_loss:
            best_loss, best_state, stale = val_loss, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= HEAD_PATIENCE:
                break
    head.load_state_dict(best_state)
    return head
