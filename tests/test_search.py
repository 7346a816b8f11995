"""`resnet-hpo search` end to end on the shared test Ray: results, packing, samplers, errors."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import optuna
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from search.cli import main
from search.driver import check_resources, make_sampler, request_from_args
from search.rundir import EPOCHS_FILE, SEARCH_FILE, TRIALS_FILE
from spaces import DefineByRun, load_space
from tests.conftest import search_space_file
from trainable.errors import UserError

pytestmark = pytest.mark.ray


def search(tmp_path: Path, *flags: str) -> Path:
    main(["search", "--storage", str(tmp_path / "runs"), "--name", "t", *flags])
    return tmp_path / "runs" / "t"


@pytest.mark.slow
def test_search_writes_parquet_tensorboard_and_stops_weak_trials_early(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    space = search_space_file(tmp_path, max_epochs=3, grace_period=1)
    run = search(tmp_path, "--space", str(space), "--data", "digits", "--trials", "6",
                 "--cpus-per-trial", "1")
    out = capsys.readouterr().out
    assert "best trial" in out and f"run directory: {run}" in out

    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    epochs = pq.read_table(run / EPOCHS_FILE).to_pandas()
    assert len(trials) == 6 and set(trials.status) == {"TERMINATED"}
    assert (trials.epochs_run < 3).any(), "ASHA stopped no trial early"
    assert trials.stopped_early.sum() == (trials.epochs_run < 3).sum()
    assert len(epochs) == trials.epochs_run.sum()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for row in trials.itertuples():
        assert (Path(row.checkpoint_path) / "checkpoint.pt").is_file()
        best = epochs[(epochs.trial_id == row.trial_id) & (epochs.epoch == row.best_epoch)]
        assert best.val_acc.item() == row.best_val_acc == row.best_metric
    assert trials.best_val_acc.max() > 0.3  # 10 classes: well above chance

    described = duckdb.sql(f"DESCRIBE SELECT * FROM '{run / TRIALS_FILE}'").fetchall()
    types = {row[0]: row[1] for row in described}
    assert types["lr"] == "DOUBLE" and types["epochs_run"] == "BIGINT"
    assert types["nesterov"] == "BOOLEAN" and types["optimizer"] == "VARCHAR"
    meta = json.loads((run / SEARCH_FILE).read_text())
    assert meta["searched"] == ["lr", "label_smoothing"] and "search" in meta["command"]

    for trial_id in trials.trial_id:
        events = EventAccumulator(str(run / "tensorboard" / trial_id))
        events.Reload()
        assert len(events.Scalars("val_acc")) == trials.set_index("trial_id").epochs_run[trial_id]
        plugins = events.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in plugins


@pytest.mark.slow
def test_quarter_gpu_trials_run_side_by_side(tmp_path: Path, ray_session: None) -> None:
    """The shared Ray declares one GPU: 0.25 per trial packs four trials at once."""
    space = search_space_file(tmp_path, max_epochs=2, grace_period=2)
    run = search(tmp_path, "--space", str(space), "--data", "digits", "--trials", "4",
                 "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5", "--scheduler", "fifo")
    epochs = pq.read_table(run / EPOCHS_FILE).to_pandas()
    spans = epochs.groupby("trial_id").agg(start=("start_time", "min"), end=("end_time", "max"))
    assert len(spans) == 4
    assert spans.start.max() < spans.end.min(), f"trials did not overlap:\n{spans}"
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    assert (trials.gpu_fraction == 0.25).all()
    assert (trials.gpu_hours == trials.wall_time_s * 0.25 / 3600).all()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random", "qmc", "gp"])
def test_each_sampler_is_seeded(sampler: str) -> None:
    space = load_space("default")

    def first_configs(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler, seed))
        configs = []
        for _ in range(3):
            trial = study.ask()
            configs.append(DefineByRun(space)(trial))
            study.tell(trial, 0.5)
        return configs

    assert first_configs(7) == first_configs(7)
    assert first_configs(7) != first_configs(8)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random", "qmc", "gp"])
def test_each_sampler_runs_a_search(tmp_path: Path, ray_session: None, sampler: str) -> None:
    space = search_space_file(tmp_path, max_epochs=1)
    run = search(tmp_path, "--space", str(space), "--data", "digits", "--trials", "3",
                 "--sampler", sampler, "--resolution", "8", "--max-concurrent", "3")
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    assert len(trials) == 3 and set(trials.status) == {"TERMINATED"}
    assert json.loads((run / SEARCH_FILE).read_text())["sampler"] == sampler


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("resnet-hpo: error: "), err
    return err


def test_more_gpus_than_any_node_fails_at_once(tmp_path: Path, ray_session: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    space = search_space_file(tmp_path)
    err = one_line_error(capsys, ["search", "--space", str(space), "--data", "digits",
                                  "--gpus-per-trial", "2", "--storage", str(tmp_path)])
    assert "--gpus-per-trial 2" in err and "largest has 4 CPUs and 1 GPUs" in err


def test_a_gpu_share_on_a_cluster_without_gpus_fails(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr("search.driver.node_capacity", lambda: [{"CPU": 2.0}])
    monkeypatch.setattr("search.driver.autoscaler_node_types", lambda: [])
    args = type("Args", (), dict(space=str(search_space_file(tmp_path)), scheduler=None,
                                 max_epochs=None, sampler=None, trials=4, gpus_per_trial=0.25,
                                 cpus_per_trial=1.0, max_concurrent=None, max_failures=0,
                                 storage=str(tmp_path), name="x", address=None, seed=0,
                                 command_line="resnet-hpo search"))
    with pytest.raises(UserError, match=r"0 GPUs in all.*use --gpus-per-trial 0"):
        check_resources(request_from_args(args, {}))


@pytest.mark.parametrize(("flags", "expected"), [
    (["--space", "quick", "--name", "../escape"], "--name '../escape': use letters"),
    (["--name", "nosuch", "--resume"], "--resume: there is no search named 'nosuch'"),
    (["--space", "nosuch"], "--space nosuch: no such shipped space"),
    (["--space", "quick", "--sampler", "anneal"], "key 'sampler' must be one of"),
    (["--space", "quick", "--scheduler", "pbt"], "key 'scheduler.name' must be one of"),
    (["--space", "quick", "--lr", "-1"], "config key 'lr': must be in (0, 10]"),
    (["--space", "quick", "--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
    (["--space", "quick", "--data", "imagefolder:/no/such/dir"], "/no/such/dir"),
])
def test_bad_search_input_is_one_line_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        expected: str) -> None:
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path), *flags])
    assert expected in err


def test_an_existing_run_is_never_overwritten(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / SEARCH_FILE).write_text("{}")
    err = one_line_error(capsys, ["search", "--space", "quick", "--storage",
                                  str(tmp_path / "runs"), "--name", "t"])
    assert "already holds a search; add --resume" in err
    assert (run / SEARCH_FILE).read_text() == "{}"


def test_max_concurrent_trials_is_also_how_many_trials_tune_keeps_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """build_tuner relies on it (Ray 2.60): with a search algorithm, Tune keeps one trial
    pending unless max_concurrent_trials wraps the searcher in a ConcurrencyLimiter, so
    fractional-GPU trials would otherwise start one at a time."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.search_generator import SearchGenerator

    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    searcher = OptunaSearch(metric="val_acc", mode="max")
    assert _get_max_pending_trials(SearchGenerator(searcher)) == 1
    assert _get_max_pending_trials(SearchGenerator(ConcurrencyLimiter(searcher, 4))) == 4
