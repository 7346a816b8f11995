"""A trained model on disk: DIR/config.yaml, DIR/model.pt (state dict), DIR/metrics.json;
or a trial checkpoint: DIR/config.yaml, DIR/checkpoint.pt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainable.config import TrainConfig
from trainable.errors import UserError
from trainable.model import build_model
from trainable.train import CHECKPOINT_FILE

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"


@dataclass
class SavedModel:
    cfg: TrainConfig
    model: nn.Module
    class_names: list[str]
    metrics: dict[str, Any]


def save_model_dir(directory: Path, cfg: TrainConfig, model: nn.Module,
                   metrics: dict[str, Any]) -> None:
    """`metrics` must hold `class_names`, so the directory alone can label predictions."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(directory / CONFIG_FILE)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def load_model_dir(directory: Path) -> SavedModel:
    """Load a model written by `resnet-hpo train`, on the CPU, in eval mode."""
    for name in (CONFIG_FILE, MODEL_FILE, METRICS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory}: not a model directory (no {name}); use one written "
                            "by resnet-hpo train")
    cfg = TrainConfig.from_yaml(directory / CONFIG_FILE)
    metrics = json.loads((directory / METRICS_FILE).read_text())
    model = build_model(cfg.replace(weights="none"), len(metrics["class_names"]))
    state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return SavedModel(cfg, model.eval(), metrics["class_names"], metrics)


def load_checkpoint_dir(directory: Path) -> SavedModel:
    """Load the best epoch's weights from a trial checkpoint (checkpoint.pt + config.yaml, as
    `trainable.fit` saves them), on the CPU, in eval mode."""
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory}: not a trial checkpoint (no {name})")
    cfg = TrainConfig.from_yaml(directory / CONFIG_FILE)
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = build_model(cfg.replace(weights="none"), len(state["class_names"]))
    model.load_state_dict(state["best_model"])
    metrics = {"best_epoch": state["best_epoch"], "best_val_acc": state["best_val_acc"],
               "epochs_run": state["epoch"], "class_names": state["class_names"]}
    return SavedModel(cfg, model.eval(), list(state["class_names"]), metrics)
