"""How the members of an ensemble differ: how often two of them disagree, and which classes
each one confuses."""

from __future__ import annotations

import numpy as np
import sklearn.metrics
import torch


def pairwise_disagreement(probs: torch.Tensor) -> np.ndarray:
    """(members, N, classes) -> (members, members): the share of the N images on which two
    members' predicted classes differ."""
    predictions = probs.argmax(-1)
    return (predictions[:, None] != predictions[None]).double().mean(-1).numpy()


def confusion_matrix(probs: torch.Tensor, labels: torch.Tensor, classes: int) -> np.ndarray:
    """Row-normalised: row t, column p is the share of class t's images predicted as p (a
    class without images gets a row of zeros)."""
    return sklearn.metrics.confusion_matrix(labels.numpy(), probs.argmax(-1).numpy(),
                                            labels=range(classes), normalize="true")


def disagreement_text(trial_ids: list[str], matrix: np.ndarray, split: str,
                      images: int) -> str:
    """The matrix as a table, and the mean over pairs."""
    width = max(6, *(len(t) for t in trial_ids))
    lines = [f"pairwise disagreement on {split} (share of the {images} images that two "
             "members label differently):",
             " " * width + "".join(f"  {t:>{width}}" for t in trial_ids)]
    for i, t in enumerate(trial_ids):
        cells = ("-" if i == j else f"{matrix[i, j]:.4f}" for j in range(len(trial_ids)))
        lines.append(f"{t:<{width}}" + "".join(f"  {c:>{width}}" for c in cells))
    pairs = matrix[np.triu_indices(len(trial_ids), 1)]
    lines.append(f"mean over {len(pairs)} pairs: {pairs.mean():.4f}")
    return "\n".join(lines)
