"""The run directory of a search (STORAGE/NAME, local or any pyarrow filesystem URI).

    trials.parquet   one row per trial (see TRIAL_COLUMNS), replaced atomically as trials report
    epochs.parquet   one row per reported epoch (see EPOCH_COLUMNS)
    search.json      how the search was started: space text, sampler, seed, versions, command
    *.json.copy      a copy of each JSON file, which Ray Tune leaves alone (RunDir.write_json)
    study.journal    the Optuna study (Optuna's journal file storage): every trial the sampler
                     saw, for `--add-trials`, `--warm-start` and optuna-dashboard
    tensorboard/     one sub-directory per trial: scalars and HParams
    plots/           PNGs written by `resnet-hpo results` (and confusion_matrices.png by
                     `resnet-hpo ensemble`)
    best.yaml        the best trial's full TrainConfig, written by `resnet-hpo best`
    ensemble.json    the last ensemble evaluated by `resnet-hpo ensemble`
    data/KEY/        the decoded images every trial maps (trainable.data_file), published by
                     the driver, fetched once by each other node
    budget/          what a search with --budget has spent while it runs, for --resume
                     (search/run/budget.py); search.json's budgets_spent once it has ended
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainable.config import DEFAULT_METRIC, field_names, field_type
from trainable.errors import UserError
from trainable.ranking import METRIC_MODES, metric_mode, rank_trials
from trainable.storage import open_uri

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
SEARCH_FILE = "search.json"
STUDY_FILE = "study.journal"  # optuna.storages.journal.JournalFileBackend's file
STUDY_NAME = "search"  # the study's name inside STUDY_FILE
BEST_FILE = "best.yaml"
ENSEMBLE_FILE = "ensemble.json"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
CONFUSION_MATRICES_FILE = "confusion_matrices.png"  # in PLOTS_DIR and in the ensemble's DIR

# trials.parquet: these, then every TrainConfig key as its own typed column. best_* are the
# values at best_epoch, the epoch with the best search metric (not the last epoch).
TRIAL_COLUMNS = {
    "trial_id": pa.string(),
    "status": pa.string(),  # PENDING | RUNNING | TERMINATED | ERROR
    "error": pa.string(),  # one-line reason when status is ERROR
    "best_metric": pa.float64(),  # the search metric (search.json "metric") at best_epoch
    "best_epoch": pa.int64(),
    "best_val_acc": pa.float64(),
    "best_val_loss": pa.float64(),
    "last_val_acc": pa.float64(),
    "epochs_run": pa.int64(),
    "stopped_early": pa.bool_(),  # ended before its epoch budget without an error (ASHA)
    "wall_time_s": pa.float64(),
    "gpu_fraction": pa.float64(),
    "gpu_hours": pa.float64(),  # wall time x GPU share
    "cpu_count": pa.float64(),
    "node_id": pa.string(),
    # directory with checkpoint.pt + config.yaml of best_epoch; none once deleted, past the
    # search's --keep-checkpoints best finished trials
    "checkpoint_path": pa.string(),
}
# epochs.parquet: trial_id, node_id, start_time and end_time (UNIX seconds), then every
# metric that trainable.fit reports (epoch, train_loss, val_loss, val_acc, lr, ...).
EPOCH_KEY_COLUMNS = {"trial_id": pa.string(), "node_id": pa.string(),
                     "start_time": pa.float64(), "end_time": pa.float64()}

EPOCH_METRICS = ("epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_s",
                 "epoch_time_s")


def config_columns() -> dict[str, pa.DataType]:
    arrow = {int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    return {name: arrow.get(field_type(name), pa.string()) for name in field_names()}


def trials_schema() -> pa.Schema:
    return pa.schema({**TRIAL_COLUMNS, **config_columns()})


def epochs_schema() -> pa.Schema:
    metrics = {name: pa.int64() if name == "epoch" else pa.float64() for name in EPOCH_METRICS}
    return pa.schema({**EPOCH_KEY_COLUMNS, **metrics})


@dataclass(frozen=True)
class RunDir:
    """A run directory on a local disk or behind a pyarrow filesystem (s3://, gs://, ...)."""
    fs: pafs.FileSystem
    path: str  # inside fs
    uri: str  # as the user wrote it

    @classmethod
    def open(cls, uri: str | Path) -> RunDir:
        fs, path = open_uri(uri)
        return cls(fs, path.rstrip("/"), str(uri).rstrip("/"))

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri_of(self, *parts: str) -> str:
        return posixpath.join(self.uri, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pafs.FileType.NotFound

    def local_path(self, *parts: str) -> Path | None:
        """A local path when the run directory is on this machine's disk."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return Path(self.join(*parts))
        return None

    def require(self, name: str) -> None:
        if not self.exists(name):
            raise UserError(f"{self.uri}: no {name} here; is this the run directory of a "
                            "search (STORAGE/NAME)?")

    def read_table(self, name: str) -> pa.Table:
        self.require(name)
        with self.fs.open_input_file(self.join(name)) as f:
            return pq.read_table(f)

    def write_table(self, name: str, table: pa.Table, metadata: dict[str, str] | None = None
                    ) -> None:
        """Write next to the target, then rename: readers never see a half-written file."""
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        self.write_bytes(name, buffer.getvalue().to_pybytes())

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON file of the run; one cut short (see write_json) is mended from its copy."""
        self.require(name)
        try:
            return self._parsed_json(name)
        except ValueError as e:
            if not self.exists(json_copy(name)):
                raise UserError(f"{self.uri_of(name)}: not a whole JSON file ({e}); it has no "
                                f"{json_copy(name)} to mend it from") from None
        values = self._parsed_json(json_copy(name))
        self.write_text(name, json.dumps(values, indent=2, default=str) + "\n")
        return values

    def _parsed_json(self, name: str) -> dict[str, Any]:
        with self.fs.open_input_stream(self.join(name)) as f:
            return dict(json.loads(f.read().decode()))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write next to the target, then rename: readers never see a half-written file."""
        self.fs.create_dir(self.path, recursive=True)
        tmp = self.join(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.join(name))

    def write_json(self, name: str, values: dict[str, Any]) -> None:
        """The file, and its copy first. A resumed Ray Tune run (2.60) copies every top-level
        .json of its run directory (search.json, ensemble.json) into its staging directory
        when it restores and back over the original, in place, each time it saves its state
        (tune/execution/experiment_state.py, sync_down_experiment_state): a kill during that
        copy cuts the file short. Tune leaves the copy alone (not a .json)."""
        text = json.dumps(values, indent=2, default=str) + "\n"
        self.write_text(json_copy(name), text)
        self.write_text(name, text)


def json_copy(name: str) -> str:
    """The name of the copy RunDir.write_json keeps of a JSON file."""
    return f"{name}.copy"


Trial = dict[str, Any]  # one row of trials.parquet


@dataclass(frozen=True)
class SearchRun:
    """A run directory with its trials and how the search was started (search.json)."""
    rundir: RunDir
    info: dict[str, Any]
    trials: list[Trial]

    @classmethod
    def open(cls, uri: str) -> SearchRun:
        rundir = RunDir.open(uri)
        info = rundir.read_json(SEARCH_FILE)
        run = cls(rundir, info, rundir.read_table(TRIALS_FILE).to_pylist())
        if run.metric not in METRIC_MODES:
            raise UserError(f"{rundir.uri_of(SEARCH_FILE)}: 'metric' must be one of "
                            f"{', '.join(METRIC_MODES)}, got {run.metric!r}")
        return run

    @property
    def metric(self) -> str:
        return str(self.info.get("metric", DEFAULT_METRIC))

    @property
    def mode(self) -> str:
        return metric_mode(self.metric)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or posixpath.basename(self.rundir.path))

    @cached_property
    def ranked(self) -> list[Trial]:
        """Trials that did not fail and reported the metric, best first (at their best epoch)."""
        return rank_trials(self.trials, "best_metric", self.mode)

    @cached_property
    def handed_over(self) -> Trial | None:
        """The trial whose config the search hands over (`best`, the summary): the best
        mean of the confirm stage where it ran (search/run/confirm.py), else the best ranked."""
        chosen = (self.info.get("confirm") or {}).get("handed_over")
        confirmed = [t for t in self.trials if chosen is not None and t["trial_id"] == chosen]
        return next(iter(confirmed), self.ranked[0] if self.ranked else None)

