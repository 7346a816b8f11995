"""What "best" means, defined once: the search metric and its direction pick the best epoch
of a run (the weights `fit` keeps, early stopping, the checkpoint, the Tune adapter's running
best, trials.parquet's best_* columns) and the best trial of a search (the summary, `best`,
`results`, `ensemble`).

Ties go to the earlier epoch, and between trials to the smaller trial id, so every caller
agrees on one answer. A NaN or infinite value (a diverged epoch) is never best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

from trainable import result_keys

# The metrics an epoch reports that can rank runs, with the direction that is better.
METRIC_MODES = {"val_acc": "max", "val_loss": "min", "train_loss": "min"}

Row = TypeVar("Row", bound=Mapping[str, Any])
T = TypeVar("T")


def metric_mode(metric: str) -> str:
    """'max' or 'min': which direction of `metric` is better."""
    return METRIC_MODES[metric]


def study_direction(mode: str) -> Literal["maximize", "minimize"]:
    """An Optuna study's direction for Tune's `mode`."""
    return "maximize" if mode == "max" else "minimize"


def objective_name(metric: str) -> str:
    """What a trial reports as its running best of `metric` (best_val_acc, ...): what the
    sampler and ASHA see, and the study's objective."""
    return f"best_{metric}"


def is_scored(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def is_better(value: Any, incumbent: Any, mode: str) -> bool:
    """Whether `value` beats `incumbent` (None: nothing yet); equal is not better."""
    if not is_scored(value):
        return False
    if incumbent is None or not is_scored(incumbent):
        return True
    return value > incumbent if mode == "max" else value < incumbent


def best_of(items: Iterable[T], value: Callable[[T], Any], mode: str) -> T | None:
    """The item whose value is best; the first of equals. None when no value is finite."""
    best: T | None = None
    for item in items:
        if is_better(value(item), None if best is None else value(best), mode):
            best = item
    return best


def best_epoch_row(rows: Iterable[Row], metric: str, mode: str) -> Row | None:
    """The epoch row (with `epoch` and `metric`) with the best value; the earliest on ties.
    None when no row has a finite value."""
    return best_of(sorted(rows, key=lambda r: r["epoch"]), lambda r: r.get(metric), mode)


def rank_trials(trials: Iterable[Row], metric_column: str, mode: str) -> list[Row]:
    """Trials with a finite `metric_column` that did not fail, best first (ties: trial id)."""
    scored = [t for t in trials
              if t.get("status") != result_keys.ERROR and is_scored(t.get(metric_column))]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(scored, key=lambda t: (sign * t[metric_column], str(t["trial_id"])))
