"""A Tune callback that prints one line per event: trial started, epoch, stopped, failed."""

from __future__ import annotations

import time
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from trainable import result_keys
from trainable.config import TrainConfig


class ProgressPrinter(tune.Callback):
    def __init__(self, metric: str, searched: list[str], num_trials: int | None):
        """num_trials: None when a budget, not a number, ends the search."""
        self.metric, self.searched, self.num_trials = metric, searched, num_trials
        self.start = time.monotonic()

    def setup(self, *args: Any, **info: Any) -> None:
        self.start = time.monotonic()

    def _print(self, trial: Trial, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f}s] trial {trial.trial_id} {text}",
              flush=True)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        cfg = TrainConfig.from_dict(trial.config)
        values = "  ".join(f"{name}={_short(getattr(cfg, name))}" for name in self.searched
                           if name in trial.config)
        self._print(trial, f"started: {values}")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        if result_keys.DIVERGED in result:
            return
        self._print(trial, f"epoch {result['epoch']:>3}/{trial.config['epochs']}  "
                           f"{self.metric} {result[self.metric]:.4f}  "
                           f"({result['images_per_s']:.0f} img/s)")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        last = trial.last_result or {}
        if result_keys.DIVERGED in last:
            how = f"failed: {last['diverged']}"
        elif last.get("epoch", 0) < trial.config["epochs"]:
            how = f"stopped early after {last.get('epoch', 0)} epochs"
        else:
            how = "finished"
        self._print(trial, f"{how} ({self._done(trials, trial)} done)")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._print(trial, f"failed ({self._done(trials, trial)} done); see trials.parquet")

    def _done(self, trials: list[Trial], ending: Trial) -> str:
        done = _finished(trials, ending)
        return f"{done}/{self.num_trials}" if self.num_trials else str(done)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _finished(trials: list[Trial], ending: Trial) -> int:
    """Trials done, counting the one that is ending now (its status may not say so yet)."""
    return sum(t is ending or t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
