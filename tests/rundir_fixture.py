"""Synthetic run directories, as a finished search would leave them, without running one.

Trials are sampled from a real space file; their learning curves peak before their last
epoch, some stop early as ASHA would stop them, and one fails. On request the run also
holds the Optuna study (study.journal) and TensorBoard's events, as the search writes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import optuna
import pyarrow as pa

from search.rundir import (
    EPOCHS_FILE,
    SEARCH_FILE,
    STUDY_NAME,
    TRIALS_FILE,
    RunDir,
    trials_schema,
)
from search.study import open_storage, open_study
from spaces.space import DefineByRun, SearchSpace, load_space
from trainable.config import field_names
from trainable.ranking import study_direction

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


def curve(peak: float, best_epoch: int, epochs_run: int) -> list[float]:
    """val_acc per epoch: rises to `peak` at `best_epoch`, then sags a little."""
    return [peak * (1 - 0.5 * math.exp(-2 * e / best_epoch)) / (1 - 0.5 * math.exp(-2))
            if e <= best_epoch else peak - 0.01 * (e - best_epoch)
            for e in range(1, epochs_run + 1)]


Row = dict[str, Any]


def trial_rows(config: Row, trial_id: str, peak: float, best_epoch: int, epochs_run: int,
               failed: bool = False) -> tuple[Row, list[Row]]:
    accs = curve(peak, best_epoch, epochs_run)
    best = min(best_epoch, epochs_run)
    epochs = [{"trial_id": trial_id, "node_id": "node-a", "start_time": 1000.0 + 10 * e,
               "end_time": 1010.0 + 10 * e, "epoch": e, "train_loss": 2.0 - acc,
               "val_loss": 2.2 - acc, "val_acc": acc, "lr": config["lr"],
               "images_per_s": 500.0, "epoch_time_s": 10.0}
              for e, acc in enumerate(accs, start=1)]
    wall = 10.0 * epochs_run
    trial = {"trial_id": trial_id, "status": "ERROR" if failed else "TERMINATED",
             "error": "RuntimeError: CUDA out of memory" if failed else None,
             "best_metric": accs[best - 1], "best_epoch": best,
             "best_val_acc": accs[best - 1], "best_val_loss": 2.2 - accs[best - 1],
             "last_val_acc": accs[-1], "epochs_run": epochs_run,
             "stopped_early": not failed and epochs_run < config["epochs"],
             "wall_time_s": wall, "gpu_fraction": 0.25, "gpu_hours": wall * 0.25 / 3600,
             "cpu_count": 2.0, "node_id": "node-a", "checkpoint_path": f"/ckpt/{trial_id}",
             **config}
    return trial, epochs


def write_run(run: Path, trials: list[dict[str, Any]], epochs: list[dict[str, Any]],
              search: dict[str, Any]) -> Path:
    rundir = RunDir.open(run)
    rundir.write_table(TRIALS_FILE, pa.Table.from_pylist(trials, schema=trials_schema()))
    rundir.write_table(EPOCHS_FILE, pa.Table.from_pylist(epochs))
    rundir.write_json(SEARCH_FILE, search)
    return run


def search_json(space_name: str, name: str, searched: list[str]) -> dict[str, Any]:
    space = load_space(space_name)
    return {"name": name, "metric": space.metric, "mode": space.mode, "sampler": space.sampler,
            "scheduler": {"name": space.scheduler.name,
                          "max_epochs": space.scheduler.max_epochs,
                          "grace_period": space.scheduler.grace_period,
                          "reduction_factor": space.scheduler.reduction_factor},
            "seed": 0, "space_file": space.source, "space_text": space.text,
            "searched": searched, "command": f"resnet-hpo search --space {space_name}",
            "versions": {"optuna": optuna.__version__}, "data": "digits",
            "started": "2025-01-01T00:00:00"}


def sampled_run(run: Path, n_trials: int = 12, space_name: str = "default",
                seed: int = 0, study: bool = False) -> Path:
    """A search over a shipped space: the metric peaks at lr = 1e-2 and rises with depth.
    With `study`, the Optuna study is kept in RUN/study.journal, each trial with its running
    best per epoch as intermediate values (as StudySearch records them)."""
    space = load_space(space_name)
    if study:  # created as the driver creates it
        optuna_study = open_study(open_storage(RunDir.open(run)), space)
    else:
        optuna_study = optuna.create_study(
            study_name=STUDY_NAME, direction=study_direction(space.mode))
    optuna_study.sampler = optuna.samplers.RandomSampler(seed=seed)
    rng = np.random.default_rng(seed)
    max_epochs = space.scheduler.max_epochs
    trials, epochs = [], []
    for i in range(n_trials):
        asked = optuna_study.ask()
        sampled = DefineByRun(space)(asked)
        config = space.config({k: v for k, v in sampled.items() if k != "epochs"}).to_dict()
        peak = 0.9 - 0.1 * abs(math.log10(config["lr"]) + 2) + 0.02 * config["unfreeze_depth"]
        epochs_run = max_epochs if i % 3 == 0 else space.scheduler.grace_period
        best_epoch = max(1, min(epochs_run, int(rng.integers(2, max_epochs))))
        trial, rows = trial_rows(config, f"t{i:03d}", float(np.clip(peak, 0.05, 0.99)),
                                 best_epoch, epochs_run, failed=i == n_trials - 1)
        trials.append(trial)
        epochs += rows
        for row, best in zip(rows, running_best(space, rows), strict=True):
            asked.report(best, row["epoch"])
        if trial["status"] == "ERROR":
            optuna_study.tell(asked, state=optuna.trial.TrialState.FAIL)
        else:
            optuna_study.tell(asked, trial["best_metric"])
    searched = [p.name for p in space.params]
    return write_run(run, trials, epochs, search_json(space_name, run.name, searched))


def running_best(space: SearchSpace, epochs: list[Row]) -> list[float]:
    """The search metric's best so far at each epoch: the objective trials report."""
    pick = max if space.mode == "max" else min
    values = [e[space.metric] for e in epochs]
    return [pick(values[:i]) for i in range(1, len(values) + 1)]


def write_tensorboard(run: Path, space_name: str) -> Path:
    """RUN/tensorboard/, written by the search's TensorBoardWriter from the run's Parquet
    files, as the trials' results would have arrived."""
    from search.record.tensorboard_writer import TensorBoardWriter
    from trainable.ranking import objective_name

    space = load_space(space_name)
    rundir = RunDir.open(run)
    epochs = rundir.read_table(EPOCHS_FILE).to_pylist()
    writer = TensorBoardWriter(str(run), space.metric, space.params)
    for row in rundir.read_table(TRIALS_FILE).to_pylist():
        trial = cast("Trial", SimpleNamespace(trial_id=row["trial_id"], config={
            name: row[name] for name in field_names()}))
        rows = [e for e in epochs if e["trial_id"] == row["trial_id"]]
        for epoch, best in zip(rows, running_best(space, rows), strict=True):
            writer.on_trial_result(0, [], trial, {**epoch, objective_name(space.metric): best})
        if row["status"] == "ERROR":
            writer.on_trial_error(0, [], trial)
        else:
            writer.on_trial_complete(0, [], trial)
    return run


def read_search(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / SEARCH_FILE).read_text()))
