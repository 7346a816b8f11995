"""A Tune callback that writes RUN/tensorboard/<trial_id>/: per-epoch scalars and the
HParams plugin's data, so `tensorboard --logdir RUN/tensorboard` compares all trials.

Remote run directories (s3://...) are written to a local staging directory and copied
up whenever a trial ends, because TensorBoard's writer only appends to local files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune
from ray.tune.experiment import Trial
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from search.rundir import EPOCH_METRICS, TENSORBOARD_DIR, RunDir
from trainable.config import TrainConfig
from trainable.data import cache_dir
from trainable.tune_adapter import objective_name


class TensorBoardWriter(tune.Callback):
    def __init__(self, run_uri: str, metric: str):
        self.run_uri, self.metric = run_uri, metric
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
            metrics = [*EPOCH_METRICS[1:], objective_name(self.metric)]
            config = TrainConfig.from_dict(trial.config).to_dict()
            assert writer.file_writer is not None  # SummaryWriter opens it on construction
            for summary in hparams(config, dict.fromkeys(metrics, 0.0)):
                writer.file_writer.add_summary(summary)
            self.writers[trial.trial_id] = writer
        return self.writers[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        if "diverged" in result:
            return
        writer = self._writer(trial)
        step = int(result["epoch"])
        for name in [*EPOCH_METRICS[1:], objective_name(self.metric)]:
            writer.add_scalar(name, result[name], step)
        writer.flush()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        self._close(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._close(trial)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        self._upload()

    def _close(self, trial: Trial) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()
        self._upload()

    def _upload(self) -> None:
        run = RunDir.open(self.run_uri)
        if run.local_path() is None and self.logdir.exists():
            pafs.copy_files(str(self.logdir), run.join(TENSORBOARD_DIR),
                            source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=run.fs)
