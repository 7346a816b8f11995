"""`resnet-hpo train`: one run of `trainable.fit`, saved with its config, metrics and test score."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from search.run.request import check_weights, resolve_weights
from trainable import TrainConfig, fit, load_dataset
from trainable.config import read_yaml_mapping
from trainable.device_images import DeviceImages
from trainable.errors import UserError
from trainable.model_files import MODEL_FILE, MODEL_ONNX_FILE
from trainable.runtime import Runtime
from trainable.saved import save_model_dir
from trainable.train import SaveCheckpoint, evaluate


def resolve_config(config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The file's values, then the flags on top; each error names where the value came from.
    Weights that are a search's run directory become its best trial's checkpoint."""
    cfg = TrainConfig.from_dict(read_yaml_mapping(config_file) if config_file else {},
                                source=config_file)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), **overrides}, source="flags")
    return cfg.replace(weights=resolve_weights(cfg.weights))


def print_epoch(metrics: dict[str, float], total_epochs: int) -> None:
    print(f"epoch {metrics['epoch']:>3}/{total_epochs}  train_loss {metrics['train_loss']:.4f}  "
          f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_acc']:.4f}  "
          f"lr {metrics['lr']:.3g}  {metrics['images_per_s']:.0f} img/s  "
          f"{metrics['epoch_time_s']:.1f}s", flush=True)


def train_command(config_file: str | None, overrides: dict[str, Any], output: str | None,
                  onnx: bool = False, device: str | None = None) -> None:
    cfg = resolve_config(config_file, overrides)
    out = Path(output or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / MODEL_FILE).exists():
        raise UserError(f"--output {out}: already holds a model ({MODEL_FILE}); choose another "
                        "directory or remove it")
    check_weights(cfg)
    data = load_dataset(cfg.data, cfg.resolution, cfg.val_fraction)
    print(data.summary(), flush=True)

    def report(metrics: dict[str, float], _save: SaveCheckpoint) -> None:
        print_epoch(metrics, cfg.epochs)

    result = fit(cfg, report, data=data, device=device)
    metrics: dict[str, Any] = {"metric": cfg.metric, "best_epoch": result.best_epoch,
                               "best": result.best, "test_acc": None,
                               "class_names": data.class_names, "history": result.history}
    if data.test is not None:
        rt = Runtime.for_config(cfg, device)
        _, metrics["test_acc"] = evaluate(result.model, DeviceImages(data.test, rt.device), rt,
                                          cfg.eval_batch_size)
    save_model_dir(out, cfg, result.model, metrics)
    if onnx:
        from trainable.export import export_onnx
        from trainable.model import ImageClassifier

        export_onnx(ImageClassifier(result.model, cfg.resolution), cfg.resolution,
                    out / MODEL_ONNX_FILE, "logits")
    test = (f"test_acc {metrics['test_acc']:.4f}" if metrics["test_acc"] is not None
            else "no test split")
    best = result.best
    print(f"best epoch by {cfg.metric}: {result.best_epoch} (val_acc {best.get('val_acc', 0):.4f}, "
          f"val_loss {best.get('val_loss', float('nan')):.4f}); {test}; model in {out}/")
