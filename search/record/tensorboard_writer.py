"""A Tune callback that writes RUN/tensorboard/<trial_id>/: per-epoch scalars and the
HParams plugin's data, so `tensorboard --logdir RUN/tensorboard` compares all trials.

The HParams tab holds the searched hyperparameters only (the constants are in search.json
and trials.parquet), then the metrics, the search metric's best first: TensorBoard sorts
the hyperparameters by name and shows the first five of each list, so among all 30 config
keys the searched ones would seldom be shown.

Remote run directories (s3://...) are written to a local staging directory, because
TensorBoard's writer only appends to local files: a trial's folder is copied up when it
ends (its own only: copying them all at every end cost the driver's loop time quadratic in
the search's size, at the moment a slot waits for its next trial), and every folder when
the search ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray import tune
from ray.tune.experiment import Trial
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from torch.utils.tensorboard import SummaryWriter

from search.rundir import EPOCH_METRICS, TENSORBOARD_DIR, RunDir
from search.views.searched_params import active_values
from spaces.space import Param
from trainable import result_keys
from trainable.config import TrainConfig
from trainable.data import cache_dir
from trainable.ranking import objective_name
from trainable.storage import upload_dir


def metric_tags(metric: str) -> list[str]:
    """The scalars of every trial, the search metric at the best epoch so far first."""
    return [objective_name(metric), *EPOCH_METRICS[1:]]


def experiment_summary(params: Sequence[Param], metric: str) -> Summary:
    """The HParams plugin's columns: the searched hyperparameters with their search ranges
    (its table cannot show a log scale), then the metrics."""
    hparams = []
    for param in params:
        d = param.distribution
        if isinstance(d, CategoricalDistribution):
            domain: hp.Domain = hp.Discrete(d.choices)
        elif isinstance(d, IntDistribution):
            domain = hp.IntInterval(d.low, d.high)
        else:
            assert isinstance(d, FloatDistribution)
            domain = hp.RealInterval(d.low, d.high)
        hparams.append(hp.HParam(param.name, domain))
    best = hp.Metric(objective_name(metric),
                     description=f"{metric} at the trial's best epoch so far: the search metric")
    others = [hp.Metric(tag) for tag in metric_tags(metric)[1:]]
    return hp.hparams_config_pb(hparams, [best, *others])


def session_end_summary(status: int) -> Summary:
    """The trial's outcome (api_pb2.STATUS_SUCCESS or STATUS_FAILURE) for the HParams tab;
    tensorboard's own helper for it needs TensorFlow."""
    data = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
        status=status, end_time_secs=time.time()))
    summary = Summary()
    summary.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                      metadata=metadata.create_summary_metadata(data))
    return summary


class TensorBoardWriter(tune.Callback):
    def __init__(self, run_uri: str, metric: str, params: Sequence[Param]):
        self.run_uri, self.metric, self.params = run_uri, metric, tuple(params)
        self.writers: dict[str, SummaryWriter] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "writers": {}}

    @property
    def logdir(self) -> Path:
        local = RunDir.open(self.run_uri).local_path(TENSORBOARD_DIR)
        return local or cache_dir() / "tensorboard" / self.run_uri.replace("://", "/")

    def _writer(self, trial: Trial) -> SummaryWriter:
        if trial.trial_id not in self.writers:
            writer = SummaryWriter(str(self.logdir / trial.trial_id))
            values = active_values(TrainConfig.from_dict(trial.config).to_dict(), self.params)
            assert writer.file_writer is not None  # SummaryWriter opens it on construction
            writer.file_writer.add_summary(experiment_summary(self.params, self.metric))
            writer.file_writer.add_summary(hp.hparams_pb(values, trial_id=trial.trial_id))
            self.writers[trial.trial_id] = writer
        return self.writers[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        if result_keys.DIVERGED in result:
            return
        writer = self._writer(trial)
        step = int(result["epoch"])
        for name in metric_tags(self.metric):
            writer.add_scalar(name, result[name], step)
        writer.flush()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        self._end(trial, api_pb2.STATUS_SUCCESS)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._end(trial, api_pb2.STATUS_FAILURE)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        self._upload()

    def _end(self, trial: Trial, status: int) -> None:
        writer = self._writer(trial)  # a trial that failed before its first epoch, too
        assert writer.file_writer is not None
        writer.file_writer.add_summary(session_end_summary(status))
        writer.close()
        del self.writers[trial.trial_id]
        self._upload(trial.trial_id)

    def _upload(self, trial_id: str | None = None) -> None:
        """Copy the staged folder of `trial_id` (None: of every trial) into a remote run."""
        run = RunDir.open(self.run_uri)
        folder = [] if trial_id is None else [trial_id]
        staged = self.logdir.joinpath(*folder)
        if run.local_path() is None and staged.exists():
            upload_dir(staged, run.fs, run.join(TENSORBOARD_DIR, *folder))
