"""A Tune callback that keeps trials.parquet and epochs.parquet current as trials report.

Both files are replaced atomically, after every finished trial and at most every
FLUSH_EVERY_S seconds in between, so a killed search leaves valid files. On `--resume` the
callback starts from the files on disk, and an epoch reported again (a trial resumed from
an older checkpoint) replaces its earlier row instead of duplicating it.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pyarrow as pa
from ray import tune
from ray.tune.experiment import Trial

from search.rundir import EPOCHS_FILE, TRIALS_FILE, RunDir, epochs_schema, trials_schema
from trainable.config import TrainConfig

FLUSH_EVERY_S = 10.0


class ResultsWriter(tune.Callback):
    def __init__(self, run_uri: str, metric: str, mode: str, gpu_fraction: float,
                 cpu_count: float):
        self.run_uri, self.metric, self.mode = run_uri, metric, mode
        self.gpu_fraction, self.cpu_count = gpu_fraction, cpu_count
        self._reset()

    def _reset(self) -> None:
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self.checkpoints: dict[str, dict[int, str]] = {}
        self.last_flush = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the experiment state; the rows live in the Parquet files.
        state = dict(self.__dict__)
        state.update(trials={}, epochs={}, checkpoints={})
        return state

    def setup(self, *args: Any, **info: Any) -> None:
        self._reset()
        run = RunDir.open(self.run_uri)
        if run.exists(TRIALS_FILE):
            for row in run.read_table(TRIALS_FILE).to_pylist():
                self.trials[row["trial_id"]] = row
                if row["checkpoint_path"]:
                    self.checkpoints[row["trial_id"]] = {row["best_epoch"]: row["checkpoint_path"]}
        if run.exists(EPOCHS_FILE):
            for row in run.read_table(EPOCHS_FILE).to_pylist():
                self.epochs[row["trial_id"], row["epoch"]] = row

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._update(trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        if "diverged" in result:
            self._update(trial, "ERROR", error=result["diverged"])
            self.flush()
            return
        row = {key: result.get(key) for key in epochs_schema().names}
        row["trial_id"] = trial.trial_id
        self.epochs[trial.trial_id, int(result["epoch"])] = row
        self._update(trial, "RUNNING")
        if time.monotonic() - self.last_flush > FLUSH_EVERY_S:
            self.flush()

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial,
                      checkpoint: tune.Checkpoint, **info: Any) -> None:
        epoch = int(trial.last_result.get("epoch", 0))
        path = checkpoint.path
        if "://" in self.run_uri:
            path = f"{self.run_uri.split('://', 1)[0]}://{path}"
        self.checkpoints.setdefault(trial.trial_id, {})[epoch] = path

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        if self.trials.get(trial.trial_id, {}).get("status") != "ERROR":  # diverged stays
            self._update(trial, "TERMINATED")
        self.flush()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._update(trial, "ERROR", error=_error_line(trial))
        self.flush()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.flush()

    def _update(self, trial: Trial, status: str, error: str | None = None) -> None:
        row = self.trials.get(trial.trial_id) or {"trial_id": trial.trial_id, "error": None}
        cfg = TrainConfig.from_dict(trial.config)
        row.update(cfg.to_dict())
        row.update(status=status, gpu_fraction=self.gpu_fraction, cpu_count=self.cpu_count)
        if error is not None:
            row["error"] = error
        epochs = sorted((e, r) for (tid, e), r in self.epochs.items() if tid == trial.trial_id)
        if epochs:
            row.update(self._summary(trial.trial_id, [r for _, r in epochs], cfg.epochs))
        last = trial.last_result or {}
        if "time_total_s" in last:
            row["wall_time_s"] = float(last["time_total_s"])
            row["gpu_hours"] = row["wall_time_s"] * self.gpu_fraction / 3600
        self.trials[trial.trial_id] = row

    def _summary(self, trial_id: str, epochs: list[dict[str, Any]], budget: int
                 ) -> dict[str, Any]:
        sign = 1 if self.mode == "max" else -1
        scored = [r for r in epochs if r[self.metric] is not None
                  and math.isfinite(r[self.metric])] or epochs
        best = max(scored, key=lambda r: (sign * r[self.metric], -r["epoch"]))
        # Ray keeps the latest of equally good checkpoints; all hold the best weights.
        tied = [r["epoch"] for r in scored if r[self.metric] == best[self.metric]]
        saved = self.checkpoints.get(trial_id, {})
        path = next((saved[e] for e in sorted(tied, reverse=True) if e in saved), None)
        return {"best_metric": best[self.metric], "best_epoch": best["epoch"],
                "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
                "last_val_acc": epochs[-1]["val_acc"], "epochs_run": epochs[-1]["epoch"],
                "stopped_early": epochs[-1]["epoch"] < budget, "node_id": epochs[-1]["node_id"],
                "checkpoint_path": path}

    def flush(self) -> None:
        run = RunDir.open(self.run_uri)
        schema = trials_schema()
        rows = [{name: row.get(name) for name in schema.names} for row in self.trials.values()]
        for row in rows:
            if row["status"] != "TERMINATED":
                row["stopped_early"] = False
        run.write_table(TRIALS_FILE, pa.Table.from_pylist(rows, schema=schema))
        epochs = [self.epochs[key] for key in sorted(self.epochs)]
        run.write_table(EPOCHS_FILE, pa.Table.from_pylist(epochs, schema=epochs_schema()))
        self.last_flush = time.monotonic()


def _error_line(trial: Trial) -> str:
    """The exception that ended the trial, in one line: `Type: message`. Read from the
    driver's copy of the trial's error file, which exists before storage is synced."""
    try:
        with open(trial.error_file) as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, TypeError):
        lines = []
    if not lines:
        return "trial failed (no error message)"
    qualified = re.match(r"(?:[\w.]+\.)?(\w+: .*)$", lines[-1])  # drop the module path
    return qualified.group(1) if qualified else lines[-1]
