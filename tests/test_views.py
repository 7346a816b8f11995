"""The views of a search in a browser: TensorBoard's HParams tab and optuna-dashboard
(`resnet-hpo dashboard`), each served on 127.0.0.1 for a run directory as a search leaves it
(tests/rundir_fixture.py), checked through the data the page loads and, where Chromium is
installed, in headless Chromium as a person would see it.

RESNET_HPO_SCREENSHOTS=DIR keeps the screenshots in DIR (docs/screenshots holds the last)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from optuna.distributions import FloatDistribution

from search.cli import main
from search.rundir import STUDY_FILE, STUDY_NAME, TRIALS_FILE, RunDir
from search.study import journal_path, open_storage
from search.views.dashboard import run_storage
from search.views.searched_params import active_values
from spaces.space import load_space
from tests.browser import Browser, chromium, free_port, get_json, poll, post_json, server
from tests.rundir_fixture import sampled_run, write_tensorboard

# Alphabetically (TensorBoard's order), the searched hyperparameters start with lr; nesterov
# is a boolean, momentum and nesterov are used by SGD trials only.
SPACE = """
metric: val_acc
scheduler: {name: asha, max_epochs: 6, grace_period: 2}
fixed: {batch_size: 32, amp: "off"}
search:
  optimizer: {type: categorical, choices: [sgd, adamw]}
  lr: {type: float, low: 1.0e-3, high: 0.3, log: true}
  momentum: {type: float, low: 0.8, high: 0.99, when: {optimizer: sgd}}
  nesterov: {type: categorical, choices: [true, false], when: {optimizer: sgd}}
  weight_decay: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
  unfreeze_depth: {type: int, low: 0, high: 5}
"""
SEARCHED = sorted(["optimizer", "lr", "momentum", "nesterov", "weight_decay", "unfreeze_depth"])
TRIALS = 8  # the last one fails

# .ci/run installs chromium, so CI (CI=true) runs these tests rather than skipping them.
needs_chromium = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                                    reason="chromium is not installed (Debian: apt-get install "
                                    "chromium)")


@pytest.fixture(scope="module")
def space_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("space") / "views.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, space_file: Path) -> Path:
    run = sampled_run(tmp_path_factory.mktemp("runs") / "views", n_trials=TRIALS,
                      space_name=str(space_file), study=True)
    return write_tensorboard(run, str(space_file))


@pytest.fixture(scope="module")
def trials(run: Path) -> dict[str, dict[str, Any]]:
    return {t["trial_id"]: t for t in pq.read_table(run / TRIALS_FILE).to_pylist()}


@pytest.fixture(scope="module")
def tensorboard(run: Path) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(run / "tensorboard"),
               "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with server(command, f"{url}/data/runs", run.parent / "tensorboard.log"):
        yield url


@contextmanager
def dashboard_of(run: Path) -> Iterator[str]:
    """`resnet-hpo dashboard RUN` on a free port; its URL."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed "
                        "(pip install -e '.[dashboard]')")
    port = free_port()
    command = [sys.executable, "-c", "from search.cli import main; main()", "dashboard",
               str(run), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with server(command, f"{url}/api/studies", run.parent / f"{run.name}-dashboard.log"):
        yield url


@pytest.fixture(scope="module")
def dashboard(run: Path) -> Iterator[str]:
    with dashboard_of(run) as url:
        yield url


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("RESNET_HPO_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{datetime.date.today():%Y-%m-%d}-{name}.png"


def session_groups(tensorboard: str) -> list[dict[str, Any]]:
    """The trials as the HParams tab loads them, once TensorBoard has read every trial."""
    body = {"experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"]}
    groups: list[dict[str, Any]] = poll(  # TensorBoard reads the events in the background
        lambda: post_json(f"{tensorboard}/data/plugin/hparams/session_groups", body)[
            "sessionGroups"],
        lambda groups: len(groups) == TRIALS and all(len(g["metricValues"]) > 1 for g in groups))
    return groups


@pytest.mark.slow
def test_tensorboard_hparams_hold_the_searched_hyperparameters_then_the_search_metric(
        tensorboard: str, trials: dict[str, dict[str, Any]], space_file: Path) -> None:
    groups = session_groups(tensorboard)
    assert sorted(g["name"] for g in groups) == sorted(trials)
    experiment = post_json(f"{tensorboard}/data/plugin/hparams/experiment",
                           {"experimentName": "", "hparamsLimit": 1000})
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert [h["name"] for h in experiment["hparamInfos"]] == SEARCHED  # no constant
    assert infos["nesterov"]["type"] == "DATA_TYPE_BOOL"
    assert infos["lr"]["domainInterval"] == {"minValue": 1e-3, "maxValue": 0.3}
    assert experiment["metricInfos"][0]["name"]["tag"] == "best_val_acc"

    params = load_space(str(space_file)).params
    for group in groups:
        trial = trials[group["name"]]
        assert group["hparams"] == active_values(trial, params)  # SGD's momentum: SGD only
        best = next(m["value"] for m in group["metricValues"]
                    if m["name"]["tag"] == "best_val_acc")
        assert best == pytest.approx(trial["best_metric"], abs=1e-6)
        status = "STATUS_FAILURE" if trial["status"] == "ERROR" else "STATUS_SUCCESS"
        assert group["sessions"][0]["status"] == status
    assert any(isinstance(g["hparams"].get("nesterov"), bool) for g in groups)


@pytest.mark.slow
@needs_chromium
def test_the_tensorboard_hparams_table_shows_the_searched_columns_first_in_1500px(
        tensorboard: str, trials: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    session_groups(tensorboard)
    with Browser(1500, 1000) as browser:
        browser.open(f"{tensorboard}/#hparams")
        text = browser.wait_for_text(*trials, "Trial ID")
        browser.screenshot(screenshot_path(tmp_path, "tensorboard-hparams"))
    lines = text.splitlines()
    table = lines[lines.index("Trial ID"):]
    # TensorBoard shows the first five hyperparameters, then the metrics
    assert table[1:8] == ["Show Metrics", *SEARCHED[:5], "best_val_acc"], table[:12]
    sgd = next(t for t in trials.values() if t["optimizer"] == "sgd")
    row = table[table.index(sgd["trial_id"]) + 1:][:6]  # lr momentum nesterov optimizer ...
    assert row[2:4] == [str(sgd["nesterov"]).lower(), "sgd"], row  # a boolean, not 1.0000
    assert float(row[5]) == pytest.approx(sgd["best_metric"], abs=1e-4)


@pytest.mark.slow
def test_the_dashboard_serves_the_runs_study_and_changes_nothing(
        dashboard: str, run: Path, trials: dict[str, dict[str, Any]]) -> None:
    journal = (run / STUDY_FILE).read_bytes()
    studies = get_json(f"{dashboard}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["search"]
    study = get_json(f"{dashboard}/api/studies/{studies[0]['study_id']}")
    assert study["objective_names"] == ["best_val_acc"]
    assert len(study["trials"]) == TRIALS
    by_number = {int(trial_id[1:]): t for trial_id, t in trials.items()}
    for shown in study["trials"]:
        trial = by_number[shown["number"]]
        assert {p["name"] for p in shown["params"]} <= set(SEARCHED)
        if trial["status"] == "ERROR":
            assert shown["state"] == "Fail"
        else:
            assert shown["state"] == "Complete"
            assert shown["values"] == [pytest.approx(trial["best_metric"])]
            assert len(shown["intermediate_values"]) == trial["epochs_run"]
    assert (run / STUDY_FILE).read_bytes() == journal


@pytest.mark.slow
def test_the_dashboard_follows_a_running_search(tmp_path: Path) -> None:
    run = sampled_run(tmp_path / "run", n_trials=3, study=True)
    with dashboard_of(run) as url:
        assert len(get_json(f"{url}/api/studies/0")["trials"]) == 3
        # the search's driver appends a trial to the journal
        study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(RunDir.open(run)))
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-3, 0.3, log=True)},
            value=0.5))
        shown = poll(lambda: get_json(f"{url}/api/studies/0")["trials"],  # cached for seconds
                     lambda trials: len(trials) > 3)
    assert len(shown) == 4


@pytest.mark.slow
@needs_chromium
def test_the_dashboard_pages_show_history_importances_and_parallel_coordinates(
        dashboard: str, tmp_path: Path) -> None:
    with Browser(1500, 1600) as browser:
        browser.open(f"{dashboard}/dashboard/studies/0")
        # "\nlr\n": a line of its own, the label of lr's importance bar
        browser.wait_for_text("History", "best_val_acc", "Hyperparameter Importance", "\nlr\n",
                              "Intermediate values", "Best Trial")
        browser.screenshot(screenshot_path(tmp_path, "optuna-dashboard-history"))
        browser.open(f"{dashboard}/dashboard/studies/0/smartSelection")
        browser.wait_for_text("Parallel Coordinate", "Param lr")
        browser.screenshot(screenshot_path(tmp_path, "optuna-dashboard-parallel-coordinates"))


def dashboard_error(capsys: pytest.CaptureFixture[str], run: Path | str,
                    port: int | None = None) -> str:
    with pytest.raises(SystemExit):
        main(["dashboard", str(run), "--port", str(port or free_port())])
    err: str = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_the_dashboard_refuses_what_is_no_study_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed")
    assert "no study.journal here; is this the run directory" in dashboard_error(
        capsys, tmp_path / "missing")
    old = sampled_run(tmp_path / "old", n_trials=3)  # a search from before study.journal
    assert "the search was run before searches kept their Optuna study" in dashboard_error(
        capsys, old)
    assert not (old / STUDY_FILE).exists()

    run = sampled_run(tmp_path / "run", n_trials=3, study=True)
    lines = (run / STUDY_FILE).read_bytes().split(b"\n")
    (run / STUDY_FILE).write_bytes(b"\n".join([*lines[:2], b'{"op_code": 5, "tri', *lines[2:]]))
    before = files(run)
    assert f"{run}/study.journal is corrupt: line 3 is not an Optuna journal" in dashboard_error(
        capsys, run)
    assert files(run) == before
    (run / STUDY_FILE).write_bytes(b"")  # a journal, but without the search's study
    before = files(run)
    assert "holds no study named 'search'" in dashboard_error(capsys, run)
    assert files(run) == before


def test_the_dashboard_of_a_remote_run_shows_the_copy_on_this_machine(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run directory behind a filesystem other than the local one, as s3:// is: the dashboard
    reads the journal where the search's driver keeps it, brought up to date with the run's."""
    sampled_run(tmp_path / "bucket" / "run", n_trials=3, study=True)
    run = RunDir(pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()),
                 "run", "mock://bucket/run")
    storage = run_storage(run)
    assert journal_path(run).read_bytes() == (tmp_path / "bucket" / "run" / STUDY_FILE
                                              ).read_bytes()
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials) == 3
    assert f"mock://bucket/run/{STUDY_FILE}: showing this machine's copy, {journal_path(run)}" \
        in capsys.readouterr().out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_dashboard_without_optuna_dashboard_says_what_to_install(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails
    assert "pip install 'resnet-hpo[dashboard]'" in dashboard_error(capsys, tmp_path)


def test_the_dashboard_on_a_port_in_use_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed")
    run = sampled_run(tmp_path / "run", n_trials=3, study=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert dashboard_error(capsys, run, port) == (
            f"resnet-hpo: error: --host 127.0.0.1 --port {port}: cannot listen there (Address "
            "already in use); choose another --port\n")
