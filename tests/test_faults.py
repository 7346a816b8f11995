"""Faults during a search: failing and diverging trials, a killed driver resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest

from search.rundir import EPOCHS_FILE, TRIALS_FILE
from tests.conftest import search_space_file
from trainable.train import TrainingDiverged

pytestmark = pytest.mark.ray


def resnet_hpo(*args: str) -> list[str]:
    return [sys.executable, "-c", "from search.cli import main; main()", *args]


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_a_raising_trial_is_marked_failed_and_the_search_goes_on(
        tmp_path: Path, ray_session: None) -> None:
    from search.cli import main

    space = search_space_file(tmp_path, max_epochs=1, extra_fixed="")
    space.write_text(space.read_text() + "  amp: {type: categorical, choices: [off, fp16]}\n")
    main(["search", "--space", str(space), "--data", "digits", "--trials", "4", "--seed", "3",
          "--storage", str(tmp_path), "--name", "f", "--max-failures", "0"])
    trials = pq.read_table(tmp_path / "f" / TRIALS_FILE).to_pandas()
    failed, done = trials[trials.amp == "fp16"], trials[trials.amp == "off"]
    assert len(failed) and len(done), "the seed should sample both amp values"
    assert set(failed.status) == {"ERROR"} and set(done.status) == {"TERMINATED"}
    assert failed.error.str.contains("UserError: config key 'amp': fp16 needs CUDA").all()


def test_a_diverging_trial_reports_its_reason_instead_of_raising(
        monkeypatch: pytest.MonkeyPatch, ray_session: None) -> None:
    """Raising would make Tune retry a config that diverges again; the adapter reports."""
    from trainable import tune_adapter

    reports: list[dict[str, Any]] = []

    def diverge(*args: Any, **kwargs: Any) -> None:
        raise TrainingDiverged("training loss became nan in epoch 1 (lr 10)")

    monkeypatch.setattr(tune_adapter, "fit", diverge)
    monkeypatch.setattr(tune_adapter.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune_adapter.tune, "report", lambda metrics, **_: reports.append(metrics))
    tune_adapter.train_trial({"weights": "none"}, data=None)  # type: ignore[arg-type]
    assert reports[-1]["diverged"] == "training loss became nan in epoch 1 (lr 10)"


def test_the_results_writer_marks_a_diverged_trial_failed(tmp_path: Path) -> None:
    from search.results_writer import ResultsWriter

    writer = ResultsWriter(str(tmp_path), "val_acc", "max", 0.0, 1.0)
    writer.setup()
    trial = SimpleNamespace(trial_id="t1", config={"weights": "none"}, last_result={})
    writer.on_trial_result(0, [], trial, {"diverged": "training loss became nan"})  # type: ignore
    writer.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    row = pq.read_table(tmp_path / TRIALS_FILE).to_pylist()[0]
    assert (row["status"], row["error"]) == ("ERROR", "training loss became nan")


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_or_duplicating(
        tmp_path: Path, ray_session: None) -> None:
    import ray

    from search.cli import main

    space = search_space_file(tmp_path, max_epochs=3)
    space.write_text(space.read_text().replace("name: asha", "name: fifo"))
    address = ray.get_runtime_context().gcs_address
    run = tmp_path / "k"
    driver = subprocess.Popen(
        resnet_hpo("search", "--space", str(space), "--data", "digits", "--trials", "5",
                   "--storage", str(tmp_path), "--name", "k", "--address", address,
                   "--max-concurrent", "2"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        finished = [r for r in read_rows(run / TRIALS_FILE) if r["status"] == "TERMINATED"]
        if len(finished) >= 2:
            break
        time.sleep(1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert len(finished) >= 2, "no trial finished before the deadline"
    before = {(r["trial_id"], r["epoch"]): r["end_time"] for r in read_rows(run / EPOCHS_FILE)}

    main(["search", "--storage", str(tmp_path), "--name", "k", "--resume"])
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    epochs = pq.read_table(run / EPOCHS_FILE).to_pandas()
    assert len(trials) == 5 and set(trials.status) == {"TERMINATED"}
    assert sorted(epochs.groupby("trial_id").epoch.apply(list).sum()) == sorted([1, 2, 3] * 5)
    for row in finished:  # finished trials were not trained again
        for epoch in (1, 2, 3):
            ended = epochs[(epochs.trial_id == row["trial_id"]) & (epochs.epoch == epoch)]
            assert ended.end_time.item() == before[row["trial_id"], epoch]
