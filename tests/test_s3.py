"""A search with `--storage s3://...` end to end, against a local S3-compatible server (moto):
search, results, best, the printed retrain command, ensemble and predict on the ensemble."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray.tune.experiment import Trial

import search.record.tensorboard_writer as tensorboard_writer
from benchmarks.common import moto_s3
from search.cli import main
from search.commands.predict import predict_command
from search.record.results_writer import ResultsWriter
from search.rundir import EPOCH_METRICS, EPOCHS_FILE, TRIALS_FILE, RunDir
from spaces.space import load_space
from trainable import load_dataset
from trainable.errors import UserError
from trainable.ranking import objective_name

BUCKET = "resnet-hpo-test"
SPACE = """
metric: val_acc
sampler: random
scheduler: {name: fifo, max_epochs: 1}
resources: {cpus_per_trial: 1}
fixed: {resolution: 16, weights: none, batch_size: 32, warmup_epochs: 0}
search:
  lr: {type: float, low: 0.02, high: 0.05, log: true}
"""


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto S3 server on a free port of 127.0.0.1 with an empty bucket; the environment
    that points this process (pyarrow, boto3) and its children at it, as a user exports it."""
    with moto_s3(tmp_path_factory.mktemp("moto") / "server.log") as env, \
            pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env


def bucket_files(prefix: str) -> dict[str, int]:
    """path inside the bucket -> size, of every object under `prefix`."""
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path.removeprefix(f"{BUCKET}/"): i.size for i in infos
            if i.type == pafs.FileType.File}


def labelled_digits(folder: Path, resolution: int) -> dict[str, str]:
    """The digits test split as PNGs; file name -> its true class."""
    test = load_dataset("digits", resolution, 0.2).test
    assert test is not None
    folder.mkdir()
    labels = {}
    for i, (image, label) in enumerate(zip(test.images, test.labels, strict=True)):
        name = f"{i}.png"
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(folder / name)
        labels[name] = str(label)
    return labels


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.long
def test_a_search_on_s3_then_results_best_retrain_ensemble_and_predict(
        s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # `best` and `ensemble` put their local copies here
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    run_uri = f"s3://{BUCKET}/runs/s3run"
    # The search runs as a user's would: its own process and its own local Ray, whose trial
    # workers inherit the endpoint from the environment (the session's shared Ray started
    # before the server existed, so its workers could not see it).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    search = subprocess.run(
        [sys.executable, "-c", "from search.cli import main; main()", "search", "--space",
         str(space), "--data", "digits", "--trials", "2", "--storage", f"s3://{BUCKET}/runs",
         "--name", "s3run", "--address", "local", "--seed", "0"],
        env=env, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stdout + search.stderr
    assert f"run directory: {run_uri}" in search.stdout

    files = bucket_files("runs/s3run")
    for name in ("trials.parquet", "epochs.parquet", "search.json"):
        assert files.get(f"runs/s3run/{name}", 0) > 0, sorted(files)
    fs, path = pafs.FileSystem.from_uri(run_uri)
    with fs.open_input_file(f"{path}/trials.parquet") as f:
        trials = pq.read_table(f).to_pylist()
    with fs.open_input_file(f"{path}/epochs.parquet") as f:
        epochs = pq.read_table(f).to_pylist()
    assert len(trials) == 2 and {t["status"] for t in trials} == {"TERMINATED"}
    assert len(epochs) == 2
    for trial in trials:
        checkpoint = trial["checkpoint_path"].removeprefix("s3://")
        assert trial["checkpoint_path"].startswith(f"{run_uri}/trial_")
        assert files[f"{checkpoint.removeprefix(f'{BUCKET}/')}/checkpoint.pt"] > 1_000_000
        assert any(f.startswith(f"runs/s3run/tensorboard/{trial['trial_id']}/events.")
                   for f in files), sorted(files)

    main(["results", run_uri])
    out = capsys.readouterr().out
    assert all(t["trial_id"] in out for t in trials)
    assert files.keys() < bucket_files("runs/s3run").keys()  # the plots
    assert "runs/s3run/plots/learning_curves.png" in bucket_files("runs/s3run/plots")

    main(["best", run_uri])
    out = capsys.readouterr().out
    retrain = shlex.split(out.strip().splitlines()[-1])
    assert retrain[:4] == ["resnet-hpo", "train", "--config", "best-s3run.yaml"], out
    assert "runs/s3run/best.yaml" in bucket_files("runs/s3run")
    main(retrain[1:])
    model = tmp_path / retrain[retrain.index("--output") + 1]
    assert (model / "model.pt").is_file() and (model / "metrics.json").is_file()

    main(["ensemble", run_uri, "--top", "2", "--output", "ens"])
    out = capsys.readouterr().out
    assert "average of 2" in out
    assert {"runs/s3run/ensemble.json", "runs/s3run/plots/confusion_matrices.png"} <= (
        bucket_files("runs/s3run").keys())
    assert (tmp_path / "ens" / "ensemble.pt").is_file()

    labels = labelled_digits(tmp_path / "images", 16)
    main(["predict", "ens", "images", "--output", "predictions.csv"])
    with (tmp_path / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(labels)
    correct = sum(r["label"] == labels[r["image"]] for r in rows)
    assert correct / len(rows) > 0.3  # 10 classes: well above chance

    best = max(trials, key=lambda t: t["best_metric"])  # a trial checkpoint, read from S3
    main(["predict", best["checkpoint_path"], "images", "--output", "trial.csv"])
    with (tmp_path / "trial.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(labels)
    assert sum(r["label"] == labels[r["image"]] for r in rows) / len(rows) > 0.3


def test_a_missing_or_broken_checkpoint_in_s3_is_one_line_naming_it(
        s3_env: dict[str, str], tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    missing = f"s3://{BUCKET}/runs/none/trial_x/checkpoint_000001"
    with pytest.raises(UserError, match=f"^{missing}: no such directory$"):
        predict_command(missing, str(images), str(tmp_path / "p.csv"))
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/runs/broken/checkpoint_000001")
    with fs.open_output_stream(f"{path}/config.yaml") as f:
        f.write(b"epochs: 1\n")
    with pytest.raises(UserError, match=rf"^s3://{BUCKET}/runs/broken/checkpoint_000001: "
                       r"not a model directory \(no model\.pt"):
        predict_command(f"s3://{BUCKET}/runs/broken/checkpoint_000001", str(images),
                        str(tmp_path / "p.csv"))
    assert not (tmp_path / "p.csv").exists()


def test_tensorboard_copies_only_the_ended_trials_folder_into_s3(
        s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial's end copies its own staged folder up, not every trial's again (which made
    each end cost time in proportion to the trials before it); the search's end copies all."""
    copied: list[str] = []
    upload_dir = tensorboard_writer.upload_dir

    def recorded_upload_dir(directory: Path, fs: pafs.FileSystem, target: str) -> None:
        copied.append(target.removeprefix(f"{BUCKET}/runs/tb/"))
        upload_dir(directory, fs, target)

    monkeypatch.setattr(tensorboard_writer, "upload_dir", recorded_upload_dir)
    space = load_space("quick")
    writer = tensorboard_writer.TensorBoardWriter(f"s3://{BUCKET}/runs/tb", space.metric,
                                                  space.params)
    trials = [cast("Trial", SimpleNamespace(trial_id=name, config={"weights": "none"}))
              for name in "ab"]
    for trial in trials:
        writer.on_trial_result(0, [], trial, {
            "epoch": 1, objective_name(space.metric): 0.5,
            **dict.fromkeys(EPOCH_METRICS[1:], 0.5)})
    writer.on_trial_complete(0, [], trials[0])
    assert copied == ["tensorboard/a"]
    assert {path.split("/")[3] for path in bucket_files("runs/tb")} == {"a"}
    writer.on_trial_error(0, [], trials[1])
    writer.on_experiment_end([])
    assert copied == ["tensorboard/a", "tensorboard/b", "tensorboard"]
    assert {path.split("/")[3] for path in bucket_files("runs/tb")} == {"a", "b"}


def test_the_results_writer_writes_a_remote_run_off_tunes_loop_and_waits_at_the_end(
        s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush into s3 returns while its files are still being written; the next flush comes
    after it, and the search's end returns once the last is in the bucket."""
    release = threading.Event()
    write_table = RunDir.write_table

    def held_write_table(run: RunDir, name: str, table: Any, metadata: Any = None) -> None:
        assert release.wait(60)
        write_table(run, name, table, metadata)

    monkeypatch.setattr(RunDir, "write_table", held_write_table)
    writer = ResultsWriter(f"s3://{BUCKET}/runs/flush", "val_acc", "max", 0.0, 1.0)
    writer.setup()
    writer.on_step_begin(0, [])  # flushes
    trial = cast("Trial", SimpleNamespace(
        trial_id="a", config={"weights": "none"}, last_result={}, status="RUNNING",
        checkpoint=None, latest_checkpoint_result=None))
    writer.on_trial_start(0, [], trial)
    writer.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5})
    run = RunDir.open(f"s3://{BUCKET}/runs/flush")
    assert not run.exists(TRIALS_FILE)  # the first flush is still being written
    release.set()
    writer.on_experiment_end([])
    assert [row["trial_id"] for row in run.read_table(TRIALS_FILE).to_pylist()] == ["a"]
    assert [(row["trial_id"], row["epoch"]) for row in run.read_table(EPOCHS_FILE).to_pylist()
            ] == [("a", 1)]


def test_options_in_a_storage_uri_are_refused_with_the_variable_to_use() -> None:
    with pytest.raises(UserError, match=r"\?endpoint_override=x/t: options .* AWS_ENDPOINT_URL"):
        RunDir.open("s3://bucket/runs?endpoint_override=x/t")
