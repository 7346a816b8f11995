"""The thin Ray Tune adapter around `fit`: the only module of trainable/ that imports Ray.

Each epoch's metrics go to `tune.report` with a checkpoint. The running best of the search
metric is reported too (`best_<metric>`), because the searcher tells the study the value
of a trial's last result, and ASHA should rank a trial by the best it has reached. Every
row reported so far is saved beside the checkpoint (epochs.json), so the results writer can
restore rows that a killed driver never wrote.

An epoch row's start_time is when the epoch's training began (its end_time less fit's
epoch_time_s), so the time between trials (actor start, data, model, the checkpoint of the
last epoch) is in no epoch. For benchmarks/turnover.py each result also carries
`checkpoint_written` (when the checkpoint was written, before Tune copies it to storage),
and the first result of a trial in a process `startup`: the process id (a reused actor
trains trial after trial) and when the trial function was entered, torch configured and the
data opened (UNIX seconds).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainable import result_keys
from trainable.config import TrainConfig
from trainable.data import DecodedData
from trainable.model_files import TRIAL_EPOCHS_FILE
from trainable.ranking import best_epoch_row, metric_mode, objective_name
from trainable.runtime import configure_torch
from trainable.saved import parse_trial_epochs, write_trial_epochs
from trainable.train import SaveCheckpoint, TrainingDiverged, fit


def train_trial(config: dict[str, Any], data: DecodedData) -> None:
    """A Tune function trainable. `data` says where the decoded file is: the trial maps this
    node's copy, which the first trial of a node fetches from the run's storage."""
    startup: dict[str, float] = {"pid": os.getpid(), "entered": time.time()}
    configure_torch()
    startup["torch_configured"] = time.time()
    cfg = TrainConfig.from_dict(config)
    metric, objective = cfg.metric, objective_name(cfg.metric)
    node_id = ray.get_runtime_context().get_node_id()
    # Ray hides the GPUs a trial was not given; a fake GPU (a CPU-only node that declares
    # one) has nothing behind it, so fall back to the CPU.
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    gpu_share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    dataset = data.open()
    startup["data_opened"] = time.time()
    rows: list[dict[str, Any]] = []
    epoch_start = time.time()  # of a diverged epoch, whose time fit does not report

    def running_best() -> float:
        best = best_epoch_row(rows, metric, metric_mode(metric))
        return best[metric] if best else float("nan")

    def report(metrics: dict[str, float], save_checkpoint: SaveCheckpoint) -> None:
        nonlocal epoch_start
        end = time.time()
        rows.append({**metrics, "node_id": node_id, "start_time": end - metrics["epoch_time_s"],
                     "end_time": end})
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory))
            write_trial_epochs(Path(directory), rows)
            timing: dict[str, Any] = {result_keys.CHECKPOINT_WRITTEN: time.time()}
            if startup:  # the first report of this trial in this process
                timing[result_keys.STARTUP] = dict(startup)
                startup.clear()
            tune.report({**rows[-1], objective: running_best(), **timing},
                        checkpoint=tune.Checkpoint.from_directory(directory))
        epoch_start = time.time()

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            fit(cfg, report, data=dataset, device=device, gpu_share=gpu_share)
            return
        with checkpoint.as_directory() as directory:
            path = Path(directory) / TRIAL_EPOCHS_FILE
            rows.extend(parse_trial_epochs(path.read_text(), str(path)))
            restored = len(rows)
            fit(cfg, report, data=dataset, device=device, gpu_share=gpu_share,
                resume_from=Path(directory))
        if rows and len(rows) == restored:
            # The checkpoint held the whole run, and Tune's last result can be older (a
            # checkpoint mended on --resume, search/run/tune_state.py): without a new report,
            # Tune would end the trial on that result, and the scheduler and the searcher
            # would take it for a trial stopped early.
            tune.report({**rows[-1], objective: running_best()})
    except TrainingDiverged as e:
        # Report instead of raising: Tune would retry a raised error (FailureConfig), and
        # the same config diverges again. The results writer marks the trial failed.
        last = rows[-1]["epoch"] if rows else 0
        tune.report({result_keys.DIVERGED: str(e), "epoch": last + 1, objective: running_best(),
                     "node_id": node_id, "start_time": epoch_start, "end_time": time.time()})

