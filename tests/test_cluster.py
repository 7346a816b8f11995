"""A real multi-node Ray cluster on this machine: a head that runs no trials and worker
nodes that each declare one GPU and have a cache of their own, as separate machines would.
Trials spread over the nodes, each node gets the decoded data through the run's storage,
every result lands in the one run directory, and a worker lost mid-search costs no epoch
and duplicates none."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from ray.cluster_utils import Cluster

from search.rundir import EPOCHS_FILE, TRIALS_FILE
from tests.conftest import checkpoint_rows, search_space_file, stopped
from trainable import TrainConfig
from trainable.data import decode_dataset
from trainable.data_file import IMAGES_FILE, RUN_DATA_DIR

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.long]


def add_worker(cluster: Cluster, cache: Path) -> Any:
    """A worker node whose processes use `cache` as RESNET_HPO_CACHE, not the driver's."""
    return cluster.add_node(num_cpus=1, num_gpus=1, env_vars={"RESNET_HPO_CACHE": str(cache)})


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    for i in range(2):
        add_worker(cluster, tmp_path / f"node-{i}-cache")
    yield cluster
    cluster.shutdown()


def start_search(tmp_path: Path, cluster: Cluster, *flags: str, epochs: int = 3
                 ) -> subprocess.Popen[bytes]:
    """The driver runs in its own process, as `ray exec` would run it on a head node."""
    space = search_space_file(tmp_path, max_epochs=epochs, grace_period=epochs)
    return subprocess.Popen(
        [sys.executable, "-c", "from search.cli import main; main()", "search", "--space",
         str(space), "--data", "digits", "--storage", str(tmp_path / "runs"), "--name", "mn",
         "--address", cluster.address, "--scheduler", "fifo", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_trials_spread_over_worker_nodes_and_results_share_one_run_dir(
        tmp_path: Path, cluster: Cluster) -> None:
    driver = start_search(tmp_path, cluster, "--trials", "4", "--gpus-per-trial", "0.5",
                          "--cpus-per-trial", "0.5")
    out = driver.communicate(timeout=600)[0].decode()
    assert driver.returncode == 0, out
    run = tmp_path / "runs" / "mn"
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    workers = {node.node_id for node in cluster.worker_nodes}
    assert set(trials.status) == {"TERMINATED"}
    assert set(trials.node_id) <= workers and len(set(trials.node_id)) == 2
    for row in trials.itertuples():
        assert Path(row.checkpoint_path).is_relative_to(run)
        assert (run / "tensorboard" / row.trial_id).is_dir()
    # Trials never decode: each node's copy came from the run's storage (linked, as the
    # run and the caches share a filesystem here), which holds the driver's decode.
    decoded = decode_dataset("digits", 8, TrainConfig().val_fraction)
    stored = run / RUN_DATA_DIR / decoded.key / IMAGES_FILE
    assert stored.samefile(decoded.directory / IMAGES_FILE)
    for i in range(2):
        assert (tmp_path / f"node-{i}-cache" / "decoded" / decoded.key / IMAGES_FILE).samefile(
            stored)


def test_a_lost_worker_node_costs_no_epoch(tmp_path: Path, cluster: Cluster) -> None:
    epochs = 6
    spare = add_worker(cluster, tmp_path / "spare-cache")
    driver = start_search(tmp_path, cluster, "--trials", "2", "--gpus-per-trial", "1",
                          "--cpus-per-trial", "1", "--max-concurrent", "2", epochs=epochs)
    run = tmp_path / "runs" / "mn"
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()[0].decode()
        # Choose from the checkpoints (on disk before the driver hears of the epoch), with
        # the driver frozen: a trial then finishes at most the epoch it is in, so one whose
        # checkpoint holds epoch <= 4 of 6 is still running when its node goes. Epoch >= 2:
        # a trial starts an epoch only once the driver has taken the last one's report, so
        # the driver has epoch 1 from the lost node.
        with stopped(driver.pid):
            busy = {rows[-1]["node_id"] for rows in checkpoint_rows(run).values()
                    if 2 <= rows[-1]["epoch"] <= epochs - 2} - {spare.node_id}
            victim = next((n for n in cluster.worker_nodes if n.node_id in busy), None)
            if victim is not None:
                cluster.remove_node(victim)
        time.sleep(0.1)
    assert victim is not None, "no trial reported an epoch in time"
    out = driver.communicate(timeout=600)[0].decode()
    assert driver.returncode == 0, out

    run = tmp_path / "runs" / "mn"
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    rows = pq.read_table(run / EPOCHS_FILE).to_pandas()
    assert set(trials.status) == {"TERMINATED"} and (trials.epochs_run == epochs).all()
    assert sorted(rows.groupby("trial_id").epoch.apply(list).sum()) == sorted(
        [*range(1, epochs + 1)] * 2)
    moved = rows[rows.node_id == victim.node_id].trial_id.unique()
    assert len(moved) == 1
    last = rows[(rows.trial_id == moved[0]) & (rows.epoch == epochs)]
    assert last.node_id.item() != victim.node_id  # it went on elsewhere after the loss
