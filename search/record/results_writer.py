"""A Tune callback that keeps trials.parquet and epochs.parquet current as trials report.

Both files are replaced atomically at most every FLUSH_EVERY_S seconds while anything
changed, and when the search ends, so a killed search leaves valid files; a remote run
directory gets the driver's copy of the Optuna study with them (search/study.py). A flush
rewrites both files whole, so flushing at every finished trial would cost the driver time
quadratic in the size of the search. No reported epoch is lost to a kill between two flushes: every
trial checkpoint carries the rows its trial has reported (epochs.json), and on `--resume`
(or when a trial restarts from a checkpoint) the writer restores the rows it lacks from
there. An epoch reported again (a trial resumed
from an older checkpoint) replaces its earlier row instead of duplicating it.

The bookkeeping per result is constant: rows are indexed by trial, and a trial's config is
validated once.

For a remote run directory (s3://...) the writes go to a thread of their own: each is a
few requests, and they would hold Tune's event loop, and with it every slot waiting for its
next trial, for about a second. The tables and the journal's bytes are taken on the loop,
a flush waits for the one before (the files are written in order), and the search's end
waits for the last.

A finished trial never trains again, and of its checkpoint only the best epoch's weights are
used again (ensembles, `--weights RUN`), and only of the best trials. So past the
`keep_checkpoints` best finished trials (ranked as SearchRun.ranked ranks them), a finished
trial's checkpoint is deleted, and its row's checkpoint_path cleared: a search's disk use stays
that of its best and its running trials, where a checkpoint is about 100 MB. Not at once, since
`--resume` reads two things from it. Its rows: so it is deleted by a flush, after the files
with its rows are written. And Tune's saved state, which starts a trial it holds as running
again from its checkpoint: Tune calls `get_state` as it saves its state, and a forced save
waits for the copy of the one before into the run directory, so a checkpoint is deleted once
Tune has saved its state SAVES_BEFORE_DELETING times since the trial finished, or when the
search ends (after Tune's last save).
"""

from __future__ import annotations

import functools
import posixpath
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from ray import tune
from ray.tune.experiment import Trial

from search.rundir import EPOCHS_FILE, TRIALS_FILE, RunDir, epochs_schema, trials_schema
from search.study import driver_journal, push_journal
from trainable import result_keys
from trainable.config import TrainConfig
from trainable.model_files import TRIAL_EPOCHS_FILE
from trainable.ranking import best_epoch_row, rank_trials
from trainable.saved import parse_trial_epochs
from trainable.storage import is_uri, open_uri

FLUSH_EVERY_S = 10.0
SAVES_BEFORE_DELETING = 3
EPOCH_COLUMNS = tuple(epochs_schema().names)


class ResultsWriter(tune.Callback):
    keep_checkpoints: int | None = None  # what a writer pickled before the option restores with

    def __init__(self, run_uri: str, metric: str, mode: str, gpu_fraction: float,
                 cpu_count: float, keep_checkpoints: int | None = None):
        self.run_uri, self.metric, self.mode = run_uri, metric, mode
        self.gpu_fraction, self.cpu_count = gpu_fraction, cpu_count
        self.keep_checkpoints = keep_checkpoints
        self._reset()

    def _reset(self) -> None:
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[str, dict[int, dict[str, Any]]] = {}  # trial_id -> epoch -> row
        self.configs: dict[str, dict[str, Any]] = {}  # trial_id -> its validated config
        self.checkpoints: dict[str, str] = {}  # trial_id -> its latest checkpoint
        # finished trial_id -> Tune's state saves after which its checkpoint may be deleted
        self.finished: dict[str, int] = {}
        self.saves = 0
        self.restored = False  # rows restored from the checkpoints after setup
        self.dirty = False
        self.last_flush = 0.0
        self.writing: Future[None] | None = None  # a remote run's flush being written

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the experiment state; the rows live in the Parquet files.
        state = dict(self.__dict__)
        state.update(trials={}, epochs={}, configs={}, checkpoints={}, finished={},
                     writing=None)
        return state

    def setup(self, *args: Any, **info: Any) -> None:
        self._reset()
        run = RunDir.open(self.run_uri)
        if run.exists(TRIALS_FILE):
            for row in run.read_table(TRIALS_FILE).to_pylist():
                self.trials[row["trial_id"]] = row
                if row["checkpoint_path"]:
                    self.checkpoints[row["trial_id"]] = row["checkpoint_path"]
        if run.exists(EPOCHS_FILE):
            for row in run.read_table(EPOCHS_FILE).to_pylist():
                self.epochs.setdefault(row["trial_id"], {})[row["epoch"]] = row

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.restored:
            return
        self.restored = True  # once, after setup: a resumed search's trials all restore
        held = {t.trial_id for t in trials}
        for trial_id, row in list(self.trials.items()):
            if row["status"] not in (result_keys.TERMINATED, result_keys.ERROR) and (
                    trial_id not in held):  # started after Tune's last save: never runs
                del self.trials[trial_id]
                self.epochs.pop(trial_id, None)
                self.dirty = True
        for trial in trials:
            if self._restore_rows(trial):
                known = self.trials.get(trial.trial_id, {}).get("status")
                self._update(trial, result_keys.ERROR if known == result_keys.ERROR
                             else str(trial.status))
        # finished before: Tune's restored state holds them finished, or (earlier parts of
        # the search) does not hold them
        unfinished = {t.trial_id for t in trials if t.status != Trial.TERMINATED}
        self.finished = {trial_id: 0 for trial_id, row in self.trials.items()
                         if row["status"] == result_keys.TERMINATED
                         and trial_id not in unfinished}
        self.flush()

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.dirty and time.monotonic() - self.last_flush > FLUSH_EVERY_S:
            self.flush()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        # Read the checkpoint's rows even when Tune's last result says the files have them:
        # a checkpoint mended on --resume (search/run/tune_state.py) holds later epochs.
        self._restore_rows(trial, trust_last_result=False)
        self._update(trial, result_keys.RUNNING)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        if result_keys.DIVERGED in result:
            self._update(trial, result_keys.ERROR, error=result[result_keys.DIVERGED])
            return
        row = {key: result.get(key) for key in EPOCH_COLUMNS}
        row["trial_id"] = trial.trial_id
        self.epochs.setdefault(trial.trial_id, {})[int(result["epoch"])] = row
        self._update(trial, result_keys.RUNNING)

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial,
                      checkpoint: tune.Checkpoint, **info: Any) -> None:
        # Every checkpoint holds the best epoch's weights so far, and Tune keeps the latest.
        self.checkpoints[trial.trial_id] = self._uri(checkpoint.path)
        self.trials.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "error": None})[
            "checkpoint_path"] = self.checkpoints[trial.trial_id]

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        if self.trials.get(trial.trial_id, {}).get("status") != result_keys.ERROR:  # diverged stays
            self._update(trial, result_keys.TERMINATED)
        self.finished[trial.trial_id] = self.saves + SAVES_BEFORE_DELETING

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._update(trial, result_keys.ERROR, error=_error_line(trial))

    def get_state(self) -> None:
        self.saves += 1  # Tune is saving its state (see the module's docstring)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.flush(tune_saved=True)  # Tune's last save is in the run directory
        self.wait_for_writes()

    def wait_for_writes(self) -> None:
        """Return once the last flush is in the run directory (raising what it raised)."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def _uri(self, path: str) -> str:
        if is_uri(self.run_uri):
            return f"{self.run_uri.split('://', 1)[0]}://{path}"
        return path

    def _restore_rows(self, trial: Trial, trust_last_result: bool = True) -> bool:
        """Add the rows of the trial's latest checkpoint that the files lack; True if the
        trial has a checkpoint."""
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return False
        self.checkpoints[trial.trial_id] = self._uri(checkpoint.path)
        known = self.epochs.setdefault(trial.trial_id, {})
        saved = trial.latest_checkpoint_result
        if (trust_last_result and saved is not None
                and int(saved.metrics.get("epoch", 0)) <= max(known, default=0)):
            return True
        where = posixpath.join(checkpoint.path, TRIAL_EPOCHS_FILE)
        assert checkpoint.filesystem is not None  # a Tune checkpoint always has one
        try:
            with checkpoint.filesystem.open_input_stream(where) as f:
                rows = parse_trial_epochs(f.read().decode(), self._uri(where))
        except OSError:  # gone (see search/run/tune_state.py): Tune reports the trial failed
            return True
        for row in rows:
            if int(row["epoch"]) not in known:
                known[int(row["epoch"])] = {**{key: row.get(key) for key in EPOCH_COLUMNS},
                                            "trial_id": trial.trial_id}
                self.dirty = True
        return True

    def _checkpoints_to_delete(self, tune_saved: bool) -> list[str]:
        """The checkpoints of the finished trials past the `keep_checkpoints` best that may
        be deleted now (`tune_saved`: all of them), taken out of their rows."""
        if self.keep_checkpoints is None:
            return []
        finished = [self.trials[trial_id] for trial_id in self.finished]
        kept = {row["trial_id"] for row in
                rank_trials(finished, "best_metric", self.mode)[:self.keep_checkpoints]}
        deleting = [trial_id for trial_id, saves in self.finished.items()
                    if (tune_saved or saves <= self.saves) and trial_id not in kept
                    and trial_id in self.checkpoints]
        for trial_id in deleting:
            self.trials[trial_id]["checkpoint_path"] = None
        return [self.checkpoints.pop(trial_id) for trial_id in deleting]

    def _config(self, trial: Trial) -> dict[str, Any]:
        if trial.trial_id not in self.configs:
            self.configs[trial.trial_id] = TrainConfig.from_dict(trial.config).to_dict()
        return self.configs[trial.trial_id]

    def _update(self, trial: Trial, status: str, error: str | None = None) -> None:
        row = self.trials.get(trial.trial_id) or {"trial_id": trial.trial_id, "error": None}
        config = self._config(trial)
        row.update(config)
        row.update(status=status, gpu_fraction=self.gpu_fraction, cpu_count=self.cpu_count,
                   checkpoint_path=self.checkpoints.get(trial.trial_id))
        if error is not None:
            row["error"] = error
        epochs = self.epochs.get(trial.trial_id)
        if epochs:
            row.update(self._summary(epochs, config["epochs"]))
        last = trial.last_result or {}
        if "time_total_s" in last:
            row["wall_time_s"] = float(last["time_total_s"])
            row["gpu_hours"] = row["wall_time_s"] * self.gpu_fraction / 3600
        self.trials[trial.trial_id] = row
        self.dirty = True

    def _summary(self, epochs: dict[int, dict[str, Any]], budget: int) -> dict[str, Any]:
        last = epochs[max(epochs)]
        best = best_epoch_row(epochs.values(), self.metric, self.mode)
        summary = {"last_val_acc": last["val_acc"], "epochs_run": last["epoch"],
                   "stopped_early": last["epoch"] < budget, "node_id": last["node_id"],
                   "best_metric": None, "best_epoch": None, "best_val_acc": None,
                   "best_val_loss": None}
        if best is not None:
            summary.update(best_metric=best[self.metric], best_epoch=best["epoch"],
                           best_val_acc=best["val_acc"], best_val_loss=best["val_loss"])
        return summary

    def flush(self, tune_saved: bool = False) -> None:
        """Write both files, then delete the checkpoints that may go (see the module's
        docstring)."""
        deleting = self._checkpoints_to_delete(tune_saved)
        run = RunDir.open(self.run_uri)
        schema = trials_schema()
        rows = [{name: row.get(name) for name in schema.names} for row in self.trials.values()]
        for row in rows:
            if row["status"] != result_keys.TERMINATED:
                row["stopped_early"] = False
        epochs = [self.epochs[trial_id][epoch] for trial_id in sorted(self.epochs)
                  for epoch in sorted(self.epochs[trial_id])]
        write = functools.partial(
            _write_run, run, pa.Table.from_pylist(rows, schema=schema),
            pa.Table.from_pylist(epochs, schema=epochs_schema()), driver_journal(run), deleting)
        self.last_flush = time.monotonic()
        self.dirty = False
        if run.local_path() is not None:
            write()
            return
        self.wait_for_writes()
        self.writing = _remote_writes().submit(write)


@functools.cache
def _remote_writes() -> ThreadPoolExecutor:
    """The driver's one thread for remote runs' flushes."""
    return ThreadPoolExecutor(1, thread_name_prefix="resnet-hpo-results")


def _write_run(run: RunDir, trials: pa.Table, epochs: pa.Table, journal: bytes | None,
               deleting: list[str]) -> None:
    """Write a flush's files, then delete the checkpoints whose rows they hold."""
    run.write_table(TRIALS_FILE, trials)
    run.write_table(EPOCHS_FILE, epochs)
    if journal is not None:
        push_journal(run, journal)
    for location in deleting:
        _delete_trial_checkpoints(location)


def _delete_trial_checkpoints(latest: str) -> None:
    """Delete every checkpoint folder of the trial whose latest checkpoint is `latest`. Its
    folder may also hold checkpoints Tune never registered, and so never deletes: one its
    actor wrote after the driver was killed, or the one --resume mended Tune's state from
    (search/run/tune_state.py)."""
    fs, path = open_uri(latest)
    trial_dir = posixpath.dirname(path.rstrip("/"))
    for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            with suppress(FileNotFoundError):
                fs.delete_dir(info.path)


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
