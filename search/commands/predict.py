"""`resnet-hpo predict`: class predictions for a folder of unlabelled images, as a CSV.

MODEL_DIR is a model written by `resnet-hpo train`, an ensemble written by `resnet-hpo
ensemble`, or a trial checkpoint, on this disk or behind a URI (s3://...). Images are decoded
like the training data (shorter side to the model's resolution, centre crop); unreadable
files are listed and skipped.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainable.data import IMAGE_EXTENSIONS, decode_image
from trainable.errors import UserError
from trainable.saved import Classifier, load_classifier
from trainable.storage import local_dir


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (by extension, sub-folders included), sorted."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of images")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass
class Prediction:
    image: str  # path relative to the images folder
    probs: np.ndarray  # (classes,)


def predict_folder(classifier: Classifier, folder: Path, device: torch.device,
                   batch_size: int) -> tuple[list[Prediction], list[str]]:
    """Predictions for every readable image, and the names of the unreadable ones."""
    files = image_files(folder)
    module = classifier.module.to(device).eval()
    predictions: list[Prediction] = []
    unreadable: list[str] = []
    for chunk in _chunks(files, batch_size):
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            decoded = list(pool.map(lambda p: decode_image(p, classifier.resolution), chunk))
        names = [p.relative_to(folder).as_posix() for p in chunk]
        unreadable += [name for name, image in zip(names, decoded, strict=True) if image is None]
        readable = [(name, image) for name, image in zip(names, decoded, strict=True)
                    if image is not None]
        if not readable:
            continue
        images = torch.from_numpy(np.stack([image for _, image in readable])).to(device)
        with torch.no_grad():
            probs = module(images.float() / 255).float().cpu().numpy()
        predictions += [Prediction(name, p) for (name, _), p in zip(readable, probs, strict=True)]
    return predictions, unreadable


def _chunks(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start:start + size]


def write_csv(path: Path, predictions: list[Prediction], class_names: list[str],
              all_probabilities: bool) -> None:
    """Columns image, label, probability (+ one per class name with `all_probabilities`)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "probability"]
                        + (class_names if all_probabilities else []))
        for p in predictions:
            best = int(p.probs.argmax())
            extra = [f"{q:.6f}" for q in p.probs] if all_probabilities else []
            writer.writerow([p.image, class_names[best], f"{p.probs[best]:.6f}", *extra])


def predict_command(model_dir: str, images: str, output: str, all_probabilities: bool = False,
                    device: str | None = None, batch_size: int = 64) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    with local_dir(model_dir) as directory:
        classifier = load_classifier(directory)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    predictions, unreadable = predict_folder(classifier, Path(images), dev, batch_size)
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} unreadable images: {', '.join(unreadable)}",
                      stacklevel=2)
    if not predictions:
        raise UserError(f"{images}: no readable images (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    try:
        write_csv(Path(output), predictions, classifier.class_names, all_probabilities)
    except OSError as e:
        raise UserError(f"--output {output}: cannot write ({e.strerror or e})") from None
    print(f"wrote {len(predictions)} predictions to {output}")
