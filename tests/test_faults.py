"""Faults during a search: raising, diverging and killed trials, a killed driver resumed.

The faults are real (an exception in the trial, a loss that becomes NaN, SIGKILL of a trial
worker or of the driver). Their moments come from the files a search writes as it goes,
not from sleeps: each trial's checkpoint (with its epoch rows) is on disk before its report
reaches the driver. To look at those files while nothing moves, the test stops the
process that would move them on (SIGSTOP); a stopped driver lets each trial finish at most
the epoch it is in, since a trial's report waits for the driver.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest

from search.run.tune_state import tune_state_problem
from search.rundir import EPOCHS_FILE, SEARCH_FILE, TRIALS_FILE, RunDir, json_copy
from tests.conftest import reported_epochs, stopped, trial_worker_pids, write_class_tree
from trainable.errors import UserError

pytestmark = pytest.mark.ray


def resnet_hpo(*args: str) -> list[str]:
    return [sys.executable, "-c", "from search.cli import main; main()", *args]


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError):
        return []


def tiny_images(tmp_path: Path) -> str:
    """--data for 30 images of 3 colours (27 train, 3 val): an epoch takes a moment."""
    return "imagefolder:" + str(write_class_tree(tmp_path / "images", per_class=10, size=8))


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def tpe_fifo_space(tmp_path: Path, epochs: int) -> Path:
    """TPE over two keys, every trial running all its epochs: what sampler history needs."""
    return space_file(tmp_path, f"""
sampler: tpe
scheduler: {{name: fifo, max_epochs: {epochs}}}
fixed: {{resolution: 8, weights: none, batch_size: 8, unfreeze_depth: 0}}
search:
  lr:              {{type: float, low: 0.01, high: 0.3, log: true}}
  label_smoothing: {{type: float, low: 0.0, high: 0.2}}
""")


def started_lines(out: str) -> dict[str, int]:
    """How often the progress printer said each trial started (once per attempt)."""
    counts: dict[str, int] = {}
    for trial_id in re.findall(r"trial (\w+) started:", out):
        counts[trial_id] = counts.get(trial_id, 0) + 1
    return counts


# A raising trial (fp16 needs CUDA), a diverging one (lr 10 with weight decay 1: each step
# multiplies the weights by about -9: NaN within the first epoch of 13 steps) and a sound one; the
# sampler's seed 11 draws exactly these three.
FAULTS_SPACE = """
metric: val_acc
sampler: random
scheduler: {name: fifo, max_epochs: 1}
resources: {cpus_per_trial: 1}
fixed: {resolution: 8, weights: none, batch_size: 2, warmup_epochs: 0, label_smoothing: 0.0,
        weight_decay: 1.0}
search:
  amp:    {type: categorical, choices: ['off', fp16]}
  lr:     {type: categorical, choices: [0.001, 10.0]}
  min_lr: {type: categorical, choices: [10.0], when: {lr: [10.0]}}
"""


@pytest.mark.slow
def test_a_raising_trial_is_retried_a_diverging_one_is_not_and_the_search_goes_on(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    import optuna

    from search.cli import main
    from search.rundir import STUDY_NAME
    from search.study import TRIAL_ID_ATTR, open_storage

    main(["search", "--space", str(space_file(tmp_path, FAULTS_SPACE)), "--data",
          tiny_images(tmp_path), "--trials", "3", "--seed", "11", "--storage", str(tmp_path),
          "--name", "f", "--max-failures", "2", "--max-concurrent", "3"])
    out = capsys.readouterr().out
    trials = pq.read_table(tmp_path / "f" / TRIALS_FILE).to_pandas().set_index("trial_id")
    epochs = pq.read_table(tmp_path / "f" / EPOCHS_FILE).to_pandas()
    kinds = {"raising": trials.amp == "fp16", "diverging": (trials.amp == "off") &
             (trials.lr == 10.0), "sound": (trials.amp == "off") & (trials.lr < 1)}
    assert [int(rows.sum()) for rows in kinds.values()] == [1, 1, 1], trials[["amp", "lr"]]
    raising, diverging, sound = (trials[rows].iloc[0] for rows in kinds.values())
    starts = started_lines(out)

    assert raising.status == "ERROR"
    assert "UserError: config key 'amp': fp16 needs CUDA" in raising.error
    assert starts[raising.name] == 3, out  # the first attempt and --max-failures 2 retries

    assert diverging.status == "ERROR"
    assert re.fullmatch(r"training loss became (nan|inf|-inf) in epoch 1 \(lr 10\); lower lr",
                        diverging.error), diverging.error
    assert starts[diverging.name] == 1, out  # not retried: the same config diverges again
    assert diverging.name not in set(epochs.trial_id)

    assert sound.status == "TERMINATED" and sound.epochs_run == 1
    assert f"best trial {sound.name}" in out
    # the study: no running best to tell for a failed trial, the diverged one's is NaN
    study = optuna.load_study(study_name=STUDY_NAME,
                              storage=open_storage(RunDir.open(tmp_path / "f")))
    assert {t.user_attrs[TRIAL_ID_ATTR]: t.state.name for t in study.trials} == {
        raising.name: "FAIL", diverging.name: "FAIL", sound.name: "COMPLETE"}


def test_the_results_writer_marks_a_diverged_trial_failed(tmp_path: Path) -> None:
    from search.record.results_writer import ResultsWriter

    writer = ResultsWriter(str(tmp_path), "val_acc", "max", 0.0, 1.0)
    writer.setup()
    trial = SimpleNamespace(trial_id="t1", config={"weights": "none"}, last_result={})
    writer.on_trial_result(0, [], trial, {"diverged": "training loss became nan"})  # type: ignore
    writer.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    writer.on_experiment_end([])
    row = pq.read_table(tmp_path / TRIALS_FILE).to_pylist()[0]
    assert (row["status"], row["error"]) == ("ERROR", "training loss became nan")


def test_the_results_writer_keeps_the_checkpoints_of_the_best_finished_trials(
        tmp_path: Path) -> None:
    """keep_checkpoints 2: a finished trial's checkpoint goes at the first flush after Tune
    has saved its state SAVES_BEFORE_DELETING times since (or at the end), once the files hold
    its rows, unless it is among the 2 best finished; a running trial's never goes, and a
    resumed writer does not name a deleted one again, nor keep the row of a trial Tune's
    saved state never held. A trial's checkpoints go with it, those Tune never registered too."""
    import pyarrow.fs as pafs

    from search.record.results_writer import SAVES_BEFORE_DELETING, ResultsWriter

    def trial(trial_id: str, status: str = "RUNNING") -> Any:
        path = tmp_path / trial_id / "checkpoint_000000"
        return SimpleNamespace(trial_id=trial_id, config={"weights": "none"}, last_result={},
                               status=status, checkpoint=SimpleNamespace(
                                   path=str(path), filesystem=pafs.LocalFileSystem()),
                               latest_checkpoint_result=None)

    def trains(writer: ResultsWriter, t: Any, val_acc: float) -> None:
        Path(t.checkpoint.path).mkdir(parents=True)
        writer.on_trial_start(0, [], t)
        writer.on_trial_result(0, [], t, {"epoch": 1, "val_acc": val_acc})
        writer.on_checkpoint(0, [], t, t.checkpoint)

    def kept() -> set[str]:
        rows = pq.read_table(tmp_path / TRIALS_FILE).to_pylist()
        on_disk = {p.parent.name for p in tmp_path.glob("*/checkpoint_*")}
        assert {r["trial_id"] for r in rows if r["checkpoint_path"]} == on_disk
        # a resume reads the rows of a trial from the files once its checkpoint is gone
        assert {r["trial_id"] for r in pq.read_table(tmp_path / EPOCHS_FILE).to_pylist()} == {
            r["trial_id"] for r in rows}
        return on_disk

    writer = ResultsWriter(str(tmp_path), "val_acc", "max", 0.0, 1.0, keep_checkpoints=2)
    writer.setup()
    writer.on_step_begin(0, [])
    trials = {name: trial(name) for name in ("a", "b", "c", "d", "running")}
    for name, val_acc in (("a", 0.5), ("b", 0.9), ("c", 0.7), ("d", 0.3), ("running", 0.1)):
        trains(writer, trials[name], val_acc)
        # one Tune never registered: written after a kill, or mended from on --resume
        (tmp_path / name / "checkpoint_000001").mkdir()
        if name != "running":
            writer.on_trial_complete(0, [], trials[name])
    for _ in range(SAVES_BEFORE_DELETING - 1):
        writer.get_state()
    writer.flush()
    assert kept() == {"a", "b", "c", "d", "running"}  # Tune's saved state may still run them
    writer.get_state()
    assert len(list(tmp_path.glob("*/checkpoint_*"))) == 10  # until the files hold their rows
    writer.flush()
    assert kept() == {"b", "c", "running"}
    trains(writer, e := trial("e"), 0.8)
    writer.on_trial_complete(0, [], e)
    writer.on_experiment_end([])  # after Tune's last save: no need to wait
    assert kept() == {"b", "e", "running"}
    writer.on_trial_start(0, [], trial("late"))  # started after Tune's last save, then killed
    writer.flush()

    resumed = ResultsWriter(str(tmp_path), "val_acc", "max", 0.0, 1.0, keep_checkpoints=2)
    resumed.setup()
    restored = [trial(name, "TERMINATED") for name in "abcde"] + [trials["running"]]
    resumed.on_step_begin(0, restored)  # Tune's state names every checkpoint it saw
    assert kept() == {"b", "e", "running"}  # and "late", which never runs, has no row


class FakeTuneSession:
    """What train_trial uses of `ray.tune` inside a trial: the checkpoint it starts from and
    the reports, each report's checkpoint copied out of its temporary directory."""

    def __init__(self, tmp_path: Path, checkpoint: Path | None):
        from ray import tune

        self.Checkpoint, self.tmp_path = tune.Checkpoint, tmp_path
        self.checkpoint = None if checkpoint is None else tune.Checkpoint.from_directory(
            str(checkpoint))
        self.reports: list[tuple[dict[str, Any], Path | None]] = []

    def get_checkpoint(self) -> Any:
        return self.checkpoint

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        saved = None
        if checkpoint is not None:
            saved = self.tmp_path / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(checkpoint.path, saved)
        self.reports.append((metrics, saved))


def test_a_trial_resumed_from_a_checkpoint_of_its_whole_run_reports_its_last_epoch_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The moment the kill-resume test once failed at: the driver was killed after Tune had
    registered a trial's last checkpoint (deleting the one before) and before its state
    reached the run directory; --resume mends the checkpoint Tune's state names with the
    last one (search/run/tune_state.py), so the trial has nothing left to train, and Tune's
    last result for it is the epoch before. The trial reports its last epoch again, or Tune
    would end it on that older result and the searcher tell it PRUNED."""
    from tests.conftest import tiny_dataset
    from trainable import tune_adapter
    from trainable.config import TrainConfig

    runtime = SimpleNamespace(get_node_id=lambda: "node",
                              get_assigned_resources=lambda: {"CPU": 1.0})
    monkeypatch.setattr(tune_adapter, "ray", SimpleNamespace(
        get_runtime_context=lambda: runtime, get_gpu_ids=lambda: []))
    data = SimpleNamespace(open=lambda: tiny_dataset(resolution=8))
    config = TrainConfig(epochs=2, resolution=8, weights="none", batch_size=8).to_dict()

    first = FakeTuneSession(tmp_path / "first", None)
    monkeypatch.setattr(tune_adapter, "tune", first)
    tune_adapter.train_trial(config, data)  # type: ignore[arg-type]
    assert [metrics["epoch"] for metrics, _ in first.reports] == [1, 2]
    last, checkpoint = first.reports[-1]

    resumed = FakeTuneSession(tmp_path / "resumed", checkpoint)
    monkeypatch.setattr(tune_adapter, "tune", resumed)
    tune_adapter.train_trial(config, data)  # type: ignore[arg-type]
    # the same epoch row and running best, without a checkpoint or the timing of one
    timing = ("checkpoint_written", "startup")
    assert resumed.reports == [({k: v for k, v in last.items() if k not in timing}, None)]


def test_resume_refuses_tune_state_cut_off_by_a_kill(tmp_path: Path) -> None:
    """Tune copies its state into the run directory in place; a kill mid-copy cuts a file."""
    run = RunDir.open(tmp_path)
    run.write_json("experiment_state-2026-01-01_00-00-00.json", {"trial_data": []})
    run.write_bytes("experiment_state-2026-01-02_00-00-00.json", b'{"trial_data": [')
    run.write_bytes("search_gen_state-2026-01-02_00-00-00.json", pickle.dumps({"counter": 3}))
    run.write_bytes("searcher-state-2026-01-02_00-00-00.pkl", pickle.dumps(list(range(99))))
    run.write_bytes("tuner.pkl", pickle.dumps({"trainable": "train_trial"}))
    problem = tune_state_problem(run)  # the newest experiment state, as Tune would read it
    assert problem is not None and problem.startswith(
        f"{tmp_path}/experiment_state-2026-01-02_00-00-00.json is cut off (")
    run.write_json("experiment_state-2026-01-02_00-00-00.json", {"trial_data": []})
    assert tune_state_problem(run) is None
    for name in ("searcher-state-2026-01-02_00-00-00.pkl", "tuner.pkl"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(whole[:len(whole) // 2])
        problem = tune_state_problem(run)
        assert problem is not None and problem.startswith(f"{tmp_path}/{name} is cut off (")
        (tmp_path / name).write_bytes(whole)
    (tmp_path / "search_gen_state-2026-01-02_00-00-00.json").write_bytes(b"")
    assert tune_state_problem(run) == (f"{tmp_path}/search_gen_state-2026-01-02_00-00-00.json "
                                       "is cut off (empty)")


def test_a_search_json_cut_short_is_mended_from_its_copy(tmp_path: Path) -> None:
    """A resumed Tune run copies search.json over itself, in place, each time it saves its
    state (RunDir.write_json): one that a kill cut short is read from its copy."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    # the Ray code that does it, as checked (Ray 2.60): every top-level .json comes down
    assert 'path.endswith(".json")' in inspect.getsource(
        _ExperimentCheckpointManager.sync_down_experiment_state)
    run = RunDir.open(tmp_path)
    info = {"metric": "val_acc", "trials": 8}
    run.write_json(SEARCH_FILE, info)
    (tmp_path / SEARCH_FILE).write_bytes(b'{"metric": "va')
    assert run.read_json(SEARCH_FILE) == info
    assert json.loads((tmp_path / SEARCH_FILE).read_text()) == info
    (tmp_path / SEARCH_FILE).write_bytes(b"")
    (tmp_path / json_copy(SEARCH_FILE)).unlink()
    with pytest.raises(UserError, match=f"{tmp_path}/{SEARCH_FILE}: not a whole JSON file"):
        run.read_json(SEARCH_FILE)


def kill_worker_mid_trial(run: Path, epochs: int, killed: list[tuple[int, float]],
                          stop: threading.Event) -> None:
    """SIGKILL the trial's worker once its checkpoints hold epoch 2 (so the driver has epoch
    1) and not yet the last epoch. The worker is frozen while its files are read, so what the
    check saw is where it dies; between checks (20 ms) it cannot write three 90 MB
    checkpoints, so a check sees it inside that window."""
    pid: int | None = None
    while not stop.is_set() and not killed:
        if pid is None or not Path(f"/proc/{pid}").exists():
            pid = next(iter(trial_worker_pids()), None)
        if pid is not None:
            try:
                with stopped(pid):
                    done = max(reported_epochs(run).values(), default=0)
                    if 2 <= done < epochs:
                        os.kill(pid, signal.SIGKILL)
                        killed.append((done, time.time()))
            except ProcessLookupError:
                pid = None
        time.sleep(0.02)


@pytest.mark.slow
def test_a_trial_whose_worker_dies_is_retried_from_its_checkpoint_and_finishes(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    epochs = 5
    space = space_file(tmp_path, f"""
scheduler: {{name: fifo, max_epochs: {epochs}}}
fixed: {{resolution: 8, weights: none, batch_size: 8, unfreeze_depth: 0}}
search:
  lr: {{type: float, low: 0.01, high: 0.1, log: true}}
""")
    killed: list[tuple[int, float]] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_worker_mid_trial,
                              args=(tmp_path / "r", epochs, killed, stop), daemon=True)
    killer.start()
    try:
        main(["search", "--space", str(space), "--data", tiny_images(tmp_path), "--trials", "1",
              "--storage", str(tmp_path), "--name", "r", "--max-failures", "1"])
    finally:
        stop.set()
        killer.join()
    out = capsys.readouterr().out
    assert killed, "the trial finished before its worker could be killed"

    trials = pq.read_table(tmp_path / "r" / TRIALS_FILE).to_pylist()
    epochs_rows = pq.read_table(tmp_path / "r" / EPOCHS_FILE).to_pylist()
    assert [(t["status"], t["epochs_run"]) for t in trials] == [("TERMINATED", epochs)]
    assert sorted(r["epoch"] for r in epochs_rows) == list(range(1, epochs + 1))
    assert started_lines(out) == {trials[0]["trial_id"]: 2}, out  # one retry
    # it went on from its checkpoint: the epochs before the kill were not trained again
    done, kill_time = killed[0]
    assert all(r["end_time"] < kill_time for r in epochs_rows if r["epoch"] < done)
    assert all(r["end_time"] > kill_time for r in epochs_rows if r["epoch"] > done)


def finished(run: Path, epochs: int) -> int:
    return sum(done == epochs for done in reported_epochs(run).values())


def resume_needs_checkpoint_rows(run: Path) -> bool:
    """Whether the Tune state that `--resume` restores (the newest experiment_state file)
    holds a trial at an epoch whose rows epochs.parquet lacks (flushed every 10 s): such a
    trial goes on after that epoch, so only the rows in its checkpoint can fill the gap."""
    states = sorted(run.glob("experiment_state-*.json"))  # named by session start
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):
        return False  # being written
    flushed: dict[str, set[int]] = {}
    for row in read_rows(run / EPOCHS_FILE):
        flushed.setdefault(row["trial_id"], set()).add(row["epoch"])
    for _, metadata in trial_data:
        last = json.loads(metadata).get("last_result") or {}
        if last.get("epoch") and not set(range(1, last["epoch"] + 1)) <= flushed.get(
                last["trial_id"], set()):
            return True
    return False


def kill_when(driver: subprocess.Popen[bytes], run: Path, moment: Callable[[], bool],
              log: Path) -> None:
    """SIGKILL the driver at the first check at which `moment()` holds. The driver is frozen
    during each check, so what the check saw is where the driver is killed. Not while Tune
    is copying its state into the run directory: a file cut off there cannot be resumed from
    (`--resume` says so; see search/run/tune_state.py)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"the driver ended first:\n{log.read_text()[-3000:]}"
        with stopped(driver.pid):
            if moment() and tune_state_problem(RunDir.open(run)) is None:
                driver.kill()
                break
        time.sleep(0.05)
    driver.wait()
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def lose_named_checkpoints(run: Path) -> list[str]:
    """Make the run directory look as it does after a kill between Tune registering a
    trial's new checkpoint (deleting the previous one) and its state reaching the run
    directory: the checkpoint the saved state names is gone, a whole one with the next
    number is there. Returns the unfinished trials whose named checkpoint is gone."""
    deadline = time.monotonic() + 60
    while trial_worker_pids() and time.monotonic() < deadline:  # the killed driver's trials
        time.sleep(0.1)
    trial_data = json.loads(max(run.glob("experiment_state-*.json")).read_text())["trial_data"]
    gone = []
    for trial_json, metadata_json in trial_data:
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        named = (metadata.get("last_result") or {}).get("checkpoint_dir_name")
        if trial["status"] == "TERMINATED" or not named:
            continue
        folder = run / f"trial_{trial['trial_id']}"
        if (folder / named).is_dir():  # else Tune deleted it already: the real thing
            newer = folder / f"checkpoint_{int(named.rsplit('_', 1)[1]) + 1:06d}"
            shutil.rmtree(newer, ignore_errors=True)  # one the kill cut short, if any
            (folder / named).rename(newer)
        print(f"lost {folder.name}/{named} ({trial['status']}); the folder holds",
              sorted(p.name for p in folder.iterdir()))
        gone.append(trial["trial_id"])
    return gone


@pytest.mark.slow
@pytest.mark.long
def test_a_killed_search_resumes_three_times_with_each_epoch_once_and_its_sampler_history(
        tmp_path: Path, ray_session: None) -> None:
    """SIGKILL of the driver early (Tune's saved state holds an epoch that epochs.parquet
    lacks), after some trials finished (then the checkpoints Tune's state names are lost, as
    a kill can leave them) and after most trials finished; `--resume` each time. Every epoch
    is in epochs.parquet once, finished trials are not trained again, and the trials sampled
    after the last resume are TPE's model draws over the history from before the kill."""
    import optuna
    import ray

    from search.cli import main
    from search.rundir import STUDY_NAME
    from search.sampling.samplers import startup_trials
    from search.study import SUPERSEDES_ATTR, latest_trials, open_storage

    n_trials, epochs, concurrent = 16, 3, 2
    space = tpe_fifo_space(tmp_path, epochs)
    address = ray.get_runtime_context().gcs_address
    run, log = tmp_path / "k", tmp_path / "driver.log"
    storage = ["--storage", str(tmp_path), "--name", "k", "--address", address]
    # Between two checks at most `concurrent` trials finish (a new trial cannot start, let
    # alone run 3 epochs, in 50 ms), so each moment is seen before the next one passes. At
    # the last, 12 or 13 trials have finished, at most `concurrent` more have been sampled,
    # and the driver has told the sampler of all but the last `concurrent` of them: some
    # trials are sampled after the resume, with over n_startup_trials (4 for 16) finished.
    late = n_trials - 2 * concurrent
    # Early: the first result is flushed at once, the next ones within 10 s are not; should
    # no check fall in that gap, the first finished trial ends the wait.
    moments = {"early": lambda: resume_needs_checkpoint_rows(run) or finished(run, epochs) > 0,
               "middle": lambda: finished(run, epochs) >= concurrent,
               "late": lambda: finished(run, epochs) >= late}
    finished_before: dict[tuple[str, int], float] = {}
    to_mend: list[str] = []
    for i, moment in enumerate(moments.values()):
        with log.open("ab") as out:
            driver = subprocess.Popen(
                resnet_hpo("search", *storage, "--resume") if i else resnet_hpo(
                    "search", "--space", str(space), "--data", tiny_images(tmp_path),
                    "--trials", str(n_trials), "--max-concurrent", str(concurrent), *storage),
                stdout=out, stderr=subprocess.STDOUT)
        kill_when(driver, run, moment, log)
        done = {r["trial_id"] for r in read_rows(run / TRIALS_FILE) if r["status"] == "TERMINATED"}
        finished_before.update({(r["trial_id"], r["epoch"]): r["end_time"]
                                for r in read_rows(run / EPOCHS_FILE) if r["trial_id"] in done})
        if i == 1:
            to_mend = lose_named_checkpoints(run)
    assert to_mend, "Tune's saved state held no unfinished trial with a checkpoint"
    mended = [line for line in log.read_text().splitlines() if " goes on from " in line]
    for trial_id in to_mend:  # the middle resume gave each its newest whole checkpoint
        assert any(line.startswith(f"trial {trial_id} ") for line in mended), (
            trial_id, mended, sorted(p.name for p in (run / f"trial_{trial_id}").iterdir()))

    resumed = datetime.now()
    main(["search", "--storage", str(tmp_path), "--name", "k", "--resume"])
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    rows = pq.read_table(run / EPOCHS_FILE).to_pandas()
    assert len(trials) == n_trials and set(trials.status) == {"TERMINATED"}
    for trial_id, trial_epochs in rows.groupby("trial_id").epoch:
        assert sorted(trial_epochs) == [1, 2, 3], trial_id  # no gap, no duplicate
    assert set(rows.trial_id) == set(trials.trial_id)
    for (trial_id, epoch), end_time in finished_before.items():  # not trained again
        again = rows[(rows.trial_id == trial_id) & (rows.epoch == epoch)]
        assert again.end_time.item() == end_time

    # The sampler kept its history: every trial is in the run's Optuna study with its value
    # (and what the driver sampled after Tune last saved its state, before a kill, failed) ...
    # (a trial's latest study trial: one that Tune ran again after the kill was recorded anew)
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(RunDir.open(run)))
    sampled = [t for t in study.trials
               if t.state.name != "FAIL" and SUPERSEDES_ATTR not in t.user_attrs]
    by_trial = {trial_id: t for trial_id, t in latest_trials(study).items()
                if t.state.name != "FAIL"}
    assert set(by_trial) == set(trials.trial_id)
    for row in trials.itertuples():
        told = by_trial[row.trial_id]
        assert told.state.name == ("PRUNED" if row.stopped_early else "COMPLETE")
        assert told.value == pytest.approx(row.best_metric)
        assert told.params == pytest.approx({"lr": row.lr,
                                             "label_smoothing": row.label_smoothing})
    # ... and the trials sampled after the last resume were asked of a study that held its
    # startup trials finished (so TPE's model drew them), the first of them with too few
    # finished since the resume to count.
    n_startup = startup_trials(n_trials)
    starts = {t.number: t.datetime_start for t in sampled if t.datetime_start is not None}
    ends = {t.number: t.datetime_complete for t in sampled if t.datetime_complete is not None}
    after = sorted((n for n, start in starts.items() if start >= resumed), key=starts.__getitem__)
    assert after, "every trial was sampled before the last kill"
    for i, number in enumerate(after):
        history = [end for end in ends.values() if end < starts[number]]
        assert len(history) >= n_startup
        if i == 0:
            assert sum(end >= resumed for end in history) < n_startup


@pytest.mark.slow
def test_a_killed_add_trials_resumes_with_each_epoch_once_and_the_whole_history(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    """--add-trials on a finished search, SIGKILL of its driver once two added trials
    finished, then --add-trials again (refused: interrupted) and --resume: the run holds
    every trial of both, each epoch once, and every added trial came from TPE's model over
    at least the first search's trials."""
    import optuna
    import ray

    from search.cli import main
    from search.rundir import SEARCH_FILE, STUDY_FILE, STUDY_NAME
    from search.study import open_storage

    n_first, n_added, epochs, concurrent = 6, 6, 2, 2
    space = tpe_fifo_space(tmp_path, epochs)
    run, log = tmp_path / "x", tmp_path / "driver.log"
    storage = ["--storage", str(tmp_path), "--name", "x"]
    main(["search", "--space", str(space), "--data", tiny_images(tmp_path), "--trials",
          str(n_first), "--max-concurrent", str(concurrent), *storage])
    first = {r["trial_id"] for r in read_rows(run / TRIALS_FILE)}
    with log.open("ab") as out:
        driver = subprocess.Popen(
            resnet_hpo("search", *storage, "--add-trials", str(n_added), "--max-concurrent",
                       str(concurrent), "--address", ray.get_runtime_context().gcs_address),
            stdout=out, stderr=subprocess.STDOUT)
    kill_when(driver, run, lambda: finished(run, epochs) >= n_first + concurrent, log)
    assert finished(run, epochs) < n_first + n_added

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["search", *storage, "--add-trials", "2"])
    assert "--resume" in capsys.readouterr().err
    main(["search", *storage, "--resume"])

    trials = read_rows(run / TRIALS_FILE)
    rows = read_rows(run / EPOCHS_FILE)
    assert len(trials) == n_first + n_added and {t["status"] for t in trials} == {"TERMINATED"}
    assert sorted((r["trial_id"], r["epoch"]) for r in rows) == sorted(
        (t["trial_id"], e) for t in trials for e in range(1, epochs + 1))
    assert json.loads((run / SEARCH_FILE).read_text())["trials"] == n_first + n_added
    assert (run / STUDY_FILE).is_file()
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(RunDir.open(run)))
    told = [t for t in study.trials if t.state.name != "FAIL"]
    assert {t.user_attrs["trial_id"] for t in told} == {t["trial_id"] for t in trials}
    best = {t["trial_id"]: t["best_metric"] for t in trials}
    for trial in told:
        assert trial.state.name == "COMPLETE"
        assert trial.value == pytest.approx(best[trial.user_attrs["trial_id"]])
        if trial.user_attrs["trial_id"] in first:
            continue
        assert trial.datetime_start is not None
        history = {t.user_attrs["trial_id"] for t in told if t.datetime_complete is not None
                   and t.datetime_complete < trial.datetime_start}
        assert first <= history


@pytest.mark.slow
@pytest.mark.long
def test_a_killed_budget_search_resumes_with_what_its_budget_has_left(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    """`--budget 2m` and no --trials, SIGKILL of the driver once it has spent a minute
    (as its last save says), then --resume: the resumed part trains for what is left, not
    for another 2 minutes, and search.json's budgets_spent holds what both parts spent."""
    import ray

    from search.cli import main
    from search.defaults import DEFAULT_KEEP_CHECKPOINTS
    from search.run.budget import SPENDING_DIR, SPENDING_FILE
    from trainable.ranking import rank_trials

    epochs = 2
    run, log = tmp_path / "x", tmp_path / "driver.log"
    storage = ["--storage", str(tmp_path), "--name", "x"]
    spending = run / SPENDING_DIR / SPENDING_FILE

    def spent_s() -> float:
        try:
            return float(json.loads(spending.read_text())["earlier_wall_s"])
        except (OSError, ValueError):
            return 0.0

    with log.open("ab") as out:
        driver = subprocess.Popen(
            resnet_hpo("search", "--space", str(tpe_fifo_space(tmp_path, epochs)), "--data",
                       tiny_images(tmp_path), "--budget", "2m", "--max-concurrent", "2",
                       *storage, "--address", ray.get_runtime_context().gcs_address),
            stdout=out, stderr=subprocess.STDOUT)
    kill_when(driver, run, lambda: spent_s() >= 60, log)
    first_part_s = spent_s()
    capsys.readouterr()
    resumed_at = time.time()  # the killed driver's actors may have trained until Ray ended them
    main(["search", *storage, "--resume"])
    summary = capsys.readouterr().out

    trials = read_rows(run / TRIALS_FILE)
    rows = read_rows(run / EPOCHS_FILE)
    assert {t["status"] for t in trials} <= {"TERMINATED", "ERROR"}
    errors = {t["trial_id"] for t in trials if t["status"] == "ERROR"}
    assert len(rows) == len({(r["trial_id"], r["epoch"]) for r in rows})
    assert {r["trial_id"] for r in rows} == {t["trial_id"] for t in trials}
    meta = json.loads((run / SEARCH_FILE).read_text())
    assert meta["budget"] == "2m" and meta["trials"] == len(trials)
    (spent,) = meta["budgets_spent"]
    assert spent["budget"] == "2m" and spent["trials"] == len(trials)
    # The resumed part's account was open while its epochs trained, so it spent at least
    # their span, on top of the first part's; and a running trial reports at most an epoch
    # or two past the budget.
    resumed = [r for r in rows if r["start_time"] > resumed_at]
    resumed_span = max(r["end_time"] for r in resumed) - min(r["start_time"] for r in resumed)
    longest_epoch = max(r["end_time"] - r["start_time"] for r in rows)
    assert first_part_s + resumed_span <= spent["wall_s"] < 120 + 3 * longest_epoch + 15, (
        first_part_s, resumed_span, spent, longest_epoch)
    assert "budget 2m: spent " in summary and f" on {len(trials)} trials" in summary
    assert not spending.exists()  # search.json holds it now
    # Of the finished trials, only the best DEFAULT_KEEP_CHECKPOINTS kept their checkpoint,
    # and the rows say which. (Not counted: the folder of a trial that the searcher started
    # and that checkpointed just before the kill, but that Tune's saved state never held.)
    best = rank_trials(trials, "best_metric", "max")[:DEFAULT_KEEP_CHECKPOINTS]
    kept = {t["trial_id"] for t in trials if t["checkpoint_path"]}
    on_disk = {p.parent.name.removeprefix("trial_") for p in run.glob("trial_*/checkpoint_*")
               } & {t["trial_id"] for t in trials}
    assert len(trials) > DEFAULT_KEEP_CHECKPOINTS
    assert kept == on_disk and kept - errors == {t["trial_id"] for t in best}, (kept, errors)
