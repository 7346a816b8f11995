"""The one model format: every directory a model is written to and read from.

    model directory (resnet-hpo train)  config.yaml, model.pt (state dict), metrics.json
    trial checkpoint (every epoch)      config.yaml, checkpoint.pt (training state and the
                                        best epoch's weights), epochs.json (the reported rows)
    ensemble (resnet-hpo ensemble)      ensemble.yaml, ensemble.pt (state dict), metrics.json

`load_classifier` opens any of them as one module that takes float RGB images in [0, 1]
and returns class probabilities. A missing or malformed file is one UserError naming it. The
file names live in trainable/model_files.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchvision.models import ResNet

from trainable.config import TrainConfig, read_yaml_mapping
from trainable.errors import UserError
from trainable.fusion import EnsembleClassifier, EnsembleSpec
from trainable.model import ImageClassifier, build_model
from trainable.model_files import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ENSEMBLE_CONFIG_FILE,
    ENSEMBLE_METHODS,
    ENSEMBLE_WEIGHTS_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TRIAL_EPOCHS_FILE,
)
from trainable.ranking import best_epoch_row, metric_mode
from trainable.weights import load_torch_file

_COPIED_WHOLE = "was it written by resnet-hpo and copied whole?"  # advice on an unreadable file


@dataclass
class SavedModel:
    cfg: TrainConfig
    model: ResNet
    class_names: list[str]
    metrics: dict[str, Any]


@dataclass
class SavedEnsemble:
    spec: EnsembleSpec
    module: EnsembleClassifier
    metrics: dict[str, Any]


@dataclass
class Classifier:
    """Any saved model as one module: float RGB images in [0, 1], N x 3 x R x R -> class
    probabilities (N, classes)."""
    module: nn.Module
    resolution: int
    class_names: list[str]


# --- reading with one-line errors ----------------------------------------------------------

def _require(directory: Path, names: tuple[str, ...], what: str) -> None:
    for name in names:
        if not (directory / name).is_file():
            raise UserError(f"{directory}: not {what} (no {name})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return values


def _field(values: dict[str, Any], key: str, path: Path) -> Any:
    if key not in values:
        raise UserError(f"{path}: no '{key}'; was it written by resnet-hpo?")
    return values[key]


def _load_weights(module: nn.Module, state: Any, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: the weights do not fit the config beside them ({first})"
                        ) from None


def _class_names(values: Any, path: Path) -> list[str]:
    if not isinstance(values, list) or not values:
        raise UserError(f"{path}: 'class_names' must be a non-empty list")
    return [str(v) for v in values]


# --- a trained model -----------------------------------------------------------------------

def save_model_dir(directory: Path, cfg: TrainConfig, model: nn.Module,
                   metrics: dict[str, Any]) -> None:
    """`metrics` must hold `class_names`, so the directory alone can label predictions."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(directory / CONFIG_FILE)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def load_model_dir(directory: Path) -> SavedModel:
    """A model written by `resnet-hpo train`, on the CPU, in eval mode."""
    _require(directory, (CONFIG_FILE, MODEL_FILE, METRICS_FILE),
             "a model directory written by resnet-hpo train")
    cfg = TrainConfig.from_yaml(directory / CONFIG_FILE)
    metrics = _read_json(directory / METRICS_FILE)
    names = _class_names(_field(metrics, "class_names", directory / METRICS_FILE),
                         directory / METRICS_FILE)
    model = build_model(cfg.replace(weights="none"), len(names))
    _load_weights(model, load_torch_file(directory / MODEL_FILE, _COPIED_WHOLE),
                  directory / MODEL_FILE)
    return SavedModel(cfg, model.eval(), names, metrics)


# --- a trial checkpoint --------------------------------------------------------------------

def write_checkpoint(directory: Path, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """`state` as `fit` makes it: model, optimizer, scaler, ema (the moving average's state,
    None without one), best_model, epoch, history, class_names."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / CHECKPOINT_FILE)
    cfg.to_yaml(directory / CONFIG_FILE)


def read_checkpoint(directory: Path, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    _require(directory, (CONFIG_FILE, CHECKPOINT_FILE), "a trial checkpoint")
    state = load_torch_file(directory / CHECKPOINT_FILE, _COPIED_WHOLE, map_location)
    for key in ("model", "optimizer", "scaler", "best_model", "epoch", "history",
                "class_names"):
        _field(state, key, directory / CHECKPOINT_FILE)
    return dict(state)


def load_checkpoint_dir(directory: Path) -> SavedModel:
    """The best epoch's weights of a trial checkpoint, on the CPU, in eval mode."""
    state = read_checkpoint(directory)
    cfg = TrainConfig.from_yaml(directory / CONFIG_FILE)
    names = _class_names(state["class_names"], directory / CHECKPOINT_FILE)
    model = build_model(cfg.replace(weights="none"), len(names))
    _load_weights(model, state["best_model"], directory / CHECKPOINT_FILE)
    best = best_epoch_row(state["history"], cfg.metric, metric_mode(cfg.metric)) or {}
    metrics = {"best_epoch": best.get("epoch"), "best": best, "epochs_run": state["epoch"],
               "class_names": names}
    return SavedModel(cfg, model.eval(), names, metrics)


def write_trial_epochs(directory: Path, rows: list[dict[str, Any]]) -> None:
    """The rows a trial has reported, beside its checkpoint, for the results writer."""
    (directory / TRIAL_EPOCHS_FILE).write_text(json.dumps(rows))


def parse_trial_epochs(text: str, where: str) -> list[dict[str, Any]]:
    try:
        rows = json.loads(text)
    except ValueError:
        raise UserError(f"{where}: not readable JSON") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "epoch" in r
                                             for r in rows):
        raise UserError(f"{where}: must be a list of epoch rows")
    return rows


# --- an ensemble ---------------------------------------------------------------------------

def save_ensemble_dir(directory: Path, spec: EnsembleSpec, module: EnsembleClassifier,
                      metrics: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ENSEMBLE_CONFIG_FILE).write_text(yaml.safe_dump(spec.to_dict(),
                                                                 sort_keys=False))
    torch.save(module.state_dict(), directory / ENSEMBLE_WEIGHTS_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def load_ensemble_dir(directory: Path) -> SavedEnsemble:
    """An ensemble written by `resnet-hpo ensemble`, on the CPU, in eval mode."""
    _require(directory, (ENSEMBLE_CONFIG_FILE, ENSEMBLE_WEIGHTS_FILE),
             "an ensemble directory written by resnet-hpo ensemble")
    path = directory / ENSEMBLE_CONFIG_FILE
    values = read_yaml_mapping(path)
    members = _field(values, "members", path)
    if not isinstance(members, list) or not members:
        raise UserError(f"{path}: 'members' must be a non-empty list")
    configs, trial_ids = [], []
    for i, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("config"), dict):
            raise UserError(f"{path}: member {i + 1} needs a 'config' mapping")
        configs.append(TrainConfig.from_dict(member["config"], source=f"{path} member {i + 1}"))
        trial_ids.append(str(member.get("trial_id", i + 1)))
    method = str(_field(values, "method", path))
    if method not in ENSEMBLE_METHODS:
        raise UserError(f"{path}: method '{method}' is not one of {', '.join(ENSEMBLE_METHODS)}")
    spec = EnsembleSpec(method, _class_names(_field(values, "class_names", path), path),
                        trial_ids, configs)
    module = spec.build()
    _load_weights(module, load_torch_file(directory / ENSEMBLE_WEIGHTS_FILE, _COPIED_WHOLE),
                  directory / ENSEMBLE_WEIGHTS_FILE)
    metrics = (_read_json(directory / METRICS_FILE) if (directory / METRICS_FILE).is_file()
               else {})
    return SavedEnsemble(spec, module.eval(), metrics)


# --- any of them ---------------------------------------------------------------------------

def load_classifier(directory: Path) -> Classifier:
    """A model directory, a trial checkpoint or an ensemble, as one probability module."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    if (directory / ENSEMBLE_CONFIG_FILE).is_file():
        ensemble = load_ensemble_dir(directory)
        return Classifier(ensemble.module, ensemble.spec.resolution, ensemble.spec.class_names)
    if (directory / MODEL_FILE).is_file():
        saved = load_model_dir(directory)
    elif (directory / CHECKPOINT_FILE).is_file():
        saved = load_checkpoint_dir(directory)
    else:
        raise UserError(f"{directory}: not a model directory (no {MODEL_FILE}, "
                        f"{ENSEMBLE_CONFIG_FILE} or {CHECKPOINT_FILE}); use one written by "
                        "resnet-hpo train or resnet-hpo ensemble, or a trial checkpoint")
    module = nn.Sequential(ImageClassifier(saved.model, saved.cfg.resolution), nn.Softmax(-1))
    return Classifier(module.eval(), saved.cfg.resolution, saved.class_names)
