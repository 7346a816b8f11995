"""The thin Ray Tune adapter around `fit`: the only module of trainable/ that imports Ray.

Each epoch's metrics go to `tune.report` with a checkpoint; the running best of the search
metric is reported too (`best_<metric>`), because OptunaSearch tells the sampler the value
of a trial's last result, and ASHA should rank a trial by the best it has reached.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainable.config import TrainConfig
from trainable.data import Dataset
from trainable.train import SaveCheckpoint, TrainingDiverged, fit

SEARCH_STATE_FILE = "search_state.json"  # the running best, saved beside each checkpoint


def objective_name(metric: str) -> str:
    return f"best_{metric}"


def train_trial(config: dict[str, Any], data: Dataset, metric: str, mode: str) -> None:
    """A Tune function trainable; `data` arrives once per node through the object store."""
    cfg = TrainConfig.from_dict(config)
    node_id = ray.get_runtime_context().get_node_id()
    # Ray hides the GPUs a trial was not given; a fake GPU (a CPU-only node that declares
    # one) has nothing behind it, so fall back to the CPU.
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    better = max if mode == "max" else min
    state = {"best": math.nan, "epoch_start": time.time(), "epoch": 0.0}

    def report(metrics: dict[str, float], save_checkpoint: SaveCheckpoint) -> None:
        value = metrics[metric]
        state["best"] = value if math.isnan(state["best"]) else better(state["best"], value)
        end, state["epoch"] = time.time(), metrics["epoch"]
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory))
            (Path(directory) / SEARCH_STATE_FILE).write_text(json.dumps({"best": state["best"]}))
            tune.report({**metrics, objective_name(metric): state["best"], "node_id": node_id,
                         "start_time": state["epoch_start"], "end_time": end},
                        checkpoint=tune.Checkpoint.from_directory(directory))
        state["epoch_start"] = time.time()

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            fit(cfg, report, data=data, device=device)
            return
        with checkpoint.as_directory() as directory:
            state["best"] = json.loads((Path(directory) / SEARCH_STATE_FILE).read_text())["best"]
            fit(cfg, report, data=data, device=device, resume_from=Path(directory))
    except TrainingDiverged as e:
        # Report instead of raising: Tune would retry a raised error (FailureConfig), and
        # the same config diverges again. The results writer marks the trial failed.
        tune.report({"diverged": str(e), "epoch": state["epoch"] + 1,
                     objective_name(metric): state["best"],
                     "node_id": node_id, "start_time": state["epoch_start"],
                     "end_time": time.time()})
