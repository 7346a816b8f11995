"""`resnet-hpo search --budget`: parsing, the account on a fake clock, the searcher and
stopper it drives, the flags it is refused with, and one real search that a budget ends."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.tune.search import Searcher

from search.cli import build_parser
from search.defaults import DEFAULT_TRIALS
from search.run.budget import (
    SPENDING_DIR,
    SPENDING_FILE,
    Budget,
    BudgetAccount,
    format_duration,
    parse_budget,
    running,
)
from search.run.budget_stopper import BudgetStopper
from search.run.cluster import check_resources
from search.run.driver import record_end
from search.run.request import continue_request, request_from_args
from search.run.study_search import StudySearch
from search.rundir import SEARCH_FILE, TRIALS_FILE, RunDir, SearchRun
from spaces import DefineByRun, load_space
from tests.conftest import one_line_error, search_space_file
from tests.test_study import finished_run, whole_journal
from trainable.errors import UserError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("text", "seconds", "unit", "shown"), [
    ("45s", 45, "wall", "45s"), ("90m", 5400, "wall", "1h30m"), ("2h", 7200, "wall", "2h"),
    (".5h", 1800, "wall", "30m"), (" 2.5m ", 150, "wall", "2m30s"),
    ("1.5gpu-h", 5400, "gpu-h", "1.5gpu-h"), ("10gpu-h", 36000, "gpu-h", "10gpu-h"),
])
def test_budgets_parse_to_seconds_and_print_back(text: str, seconds: float, unit: str,
                                                 shown: str) -> None:
    budget = parse_budget(text)
    assert budget == Budget(seconds, unit)  # type: ignore[arg-type]
    assert str(budget) == shown


@pytest.mark.parametrize("text", ["2x", "-1h", "0h", "0gpu-h", "", "h", "1.5gpu", "2 h",
                                  "1e3s", "2H", "1.5gpuh"])
def test_a_bad_budget_is_one_line_naming_the_flag_and_the_allowed_forms(text: str) -> None:
    with pytest.raises(UserError) as e:
        parse_budget(text)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--budget {text!r}: ")
    assert "45s, 90m, 2h" in message and "1.5gpu-h" in message


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"), (45.4, "45s"), (60, "1m"), (125, "2m05s"), (3599.4, "59m59s"), (3600, "1h"),
    (7080, "1h58m"), (36000, "10h")])
def test_durations_are_formatted_to_the_second_under_an_hour(seconds: float,
                                                             shown: str) -> None:
    assert format_duration(seconds) == shown


def never_starts_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("a bad flag should be refused before Ray starts")

    monkeypatch.setattr("search.run.cluster.start_ray", fail)
    monkeypatch.setattr("search.run.driver.decode_dataset", fail)


def refused_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch, flags: list[str]) -> str:
    """The one line a new search with `flags` prints before Ray starts or any run directory
    exists."""
    never_starts_ray(monkeypatch)
    err = one_line_error(capsys, ["search", "--space", str(search_space_file(tmp_path)),
                                  "--data", "digits", "--storage", str(tmp_path / "runs"),
                                  *flags])
    assert not (tmp_path / "runs").exists()
    return err


@pytest.mark.parametrize(("flags", "expected"), [
    (["--budget", "2x"], "--budget '2x': give a wall time (45s, 90m, 2h) or GPU-hours"),
    (["--budget=-1h"], "--budget '-1h': give a wall time"),
    (["--budget", "0h"], "--budget '0h': give a wall time"),
    (["--budget", "1h", "--trials", "0"], "--trials must be >= 1, got 0"),
])
def test_bad_budget_flags_are_one_line_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        flags: list[str], expected: str) -> None:
    assert expected in refused_before_ray(tmp_path, capsys, monkeypatch, flags)


def test_resume_with_a_budget_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    never_starts_ray(monkeypatch)
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path), "--name", "x",
                                  "--resume", "--budget", "1h"])
    assert ("--budget 1h with --resume: a resumed search goes on with the budget it was "
            "started with") in err


def search_args(*flags: str) -> object:
    args = build_parser().parse_args(["search", *flags])
    args.command_line = "resnet-hpo search"
    return args


def test_trials_default_to_16_without_a_budget_and_to_no_limit_with_one(
        tmp_path: Path) -> None:
    space = str(search_space_file(tmp_path))
    plain = request_from_args(search_args("--space", space), {})
    budget = request_from_args(search_args("--space", space, "--budget", "90m"), {})
    both = request_from_args(search_args("--space", space, "--budget", "90m", "--trials", "5"),
                             {})
    assert (plain.trials, plain.budget) == (DEFAULT_TRIALS, None)
    assert (budget.trials, budget.budget) == (None, Budget(5400, "wall"))
    assert (both.trials, both.budget) == (5, Budget(5400, "wall"))


def test_add_trials_takes_a_budget(tmp_path: Path) -> None:
    finished_run(tmp_path / "runs" / "done", whole_journal(tmp_path))
    request = continue_request(search_args("--storage", str(tmp_path / "runs"), "--name",
                                           "done", "--add-trials", "8", "--budget", "2h"), {})
    assert (request.trials, request.budget) == (8, Budget(7200, "wall"))


def test_add_trials_to_a_budget_search_that_was_interrupted_says_to_resume_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A search that only a budget ends records its number of trials when it ends."""
    run = finished_run(tmp_path / "runs" / "cut", whole_journal(tmp_path))
    meta = json.loads((run / SEARCH_FILE).read_text())
    (run / SEARCH_FILE).write_text(json.dumps({**meta, "trials": None, "budget": "2h"}))
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path / "runs"), "--name",
                                  "cut", "--add-trials", "8"])
    assert "was interrupted (12 trials finished)" in err


@pytest.mark.parametrize(("gpus", "cluster_gpus", "expected"), [
    ("0.25", 0, "--budget 1.5gpu-h: the Ray cluster has no GPUs, so the trials spend no "
                "GPU-hours; use a wall-time budget (e.g. --budget 2h) and --gpus-per-trial 0"),
    ("0", 1, "--budget 1.5gpu-h: the trials use none (--gpus-per-trial 0), so the trials spend "
             "no GPU-hours; use a wall-time budget (e.g. --budget 2h)"),
])
def test_a_gpu_hour_budget_without_gpus_is_one_refusal_that_says_to_use_wall_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: str, cluster_gpus: int,
        expected: str) -> None:
    monkeypatch.setattr("search.run.cluster.node_capacity",
                        lambda: [{"CPU": 2.0, "GPU": cluster_gpus}])
    monkeypatch.setattr("search.run.cluster.autoscaler_node_types", lambda: [])
    request = request_from_args(search_args("--space", str(search_space_file(tmp_path)),
                                            "--budget", "1.5gpu-h", "--gpus-per-trial", gpus),
                                {})
    with pytest.raises(UserError) as refused:
        check_resources(request)
    assert str(refused.value) == expected


def test_a_wall_budget_refuses_a_trial_that_would_end_past_it() -> None:
    clock = FakeClock()
    account = BudgetAccount(Budget(100, "wall"), gpus_per_trial=0, clock=clock)
    assert account.may_start()  # nothing known: the first trial always starts
    account.trial_started("a")
    clock.now += 30
    account.epoch_reported("a", 12.0)  # before any trial ends, one epoch is the estimate
    assert account.may_start()  # 30 s spent + 12 < 100
    clock.now += 57
    assert account.may_start() and not account.exhausted()  # 87 + 12 < 100
    clock.now += 2
    assert not account.may_start() and not account.exhausted()  # 89 + 12 > 100
    clock.now += 11
    assert account.exhausted() and account.spent == 100

    quick = BudgetAccount(Budget(100, "wall"), gpus_per_trial=0, clock=clock)
    quick.trial_started("b")
    clock.now += 10
    quick.epoch_reported("b", 10.0)
    quick.trial_finished("b")  # the mean trial (10 s) is the estimate from now on
    clock.now += 79
    assert quick.may_start()  # 89 + 10 < 100
    clock.now += 1
    assert not quick.may_start()  # 90 + 10 is not


def test_gpu_hours_add_up_over_running_and_finished_trials() -> None:
    clock = FakeClock()
    account = BudgetAccount(Budget(3600, "gpu-h"), gpus_per_trial=0.5, clock=clock)
    for trial_id in ("a", "b"):
        account.trial_started(trial_id)
    clock.now += 1000
    account.trial_finished("a")
    assert account.gpu_spent_s == 1000  # two trials x 1000 s x 0.5 GPU
    clock.now += 1000
    assert account.gpu_spent_s == 1500 and account.wall_spent_s == 2000
    account.trial_started("c")
    clock.now += 1000
    assert account.gpu_spent_s == 2500  # a 1000 s, b 3000 s, c 1000 s, at 0.5 GPU
    assert account.may_start()  # + a's 1000 s at 0.5 GPU: 3000 < 3600
    clock.now += 300
    assert account.gpu_spent_s == 2800 and account.may_start()  # 3300 < 3600
    clock.now += 300
    assert account.gpu_spent_s == 3100  # 3100 + 500 is not < 3600
    assert not account.may_start() and not account.exhausted()
    clock.now += 500
    assert account.gpu_spent_s == 3600 and account.exhausted()


def test_the_summary_says_what_the_budget_bought() -> None:
    clock = FakeClock()
    account = BudgetAccount(Budget(7200, "wall"), gpus_per_trial=0.25, clock=clock)
    for trial_id in ("a", "b", "c", "d"):
        account.trial_started(trial_id)
    clock.now += 7080
    stopper = BudgetStopper()
    assert not stopper("a", {"time_this_iter_s": 60.0})  # no search with a budget running
    with running(account):
        assert not stopper("a", {"time_this_iter_s": 60.0})
        clock.now += 130
        assert stopper("b", {"time_this_iter_s": 60.0}) and stopper("c", {})
        assert not stopper.stop_all()
    for trial_id in ("a", "b", "c", "d"):
        account.trial_finished(trial_id)
    # a and d stopped early by ASHA; c ran its last epoch when the budget stopped it
    line = account.summary_line(["a", "b", "d", "not-this-budget's"])
    assert line == "budget 2h: spent 2h on 4 trials (2 stopped early by ASHA, 1 stopped " \
                   "by the budget)"
    record = account.record(["a", "b", "d"])
    assert {k: record[k] for k in ("budget", "unit", "trials", "stopped_early_by_scheduler",
                                   "stopped_by_budget")} == {
        "budget": "2h", "unit": "wall", "trials": 4, "stopped_early_by_scheduler": 2,
        "stopped_by_budget": 1}
    gpu = BudgetAccount(Budget(5400, "gpu-h"), gpus_per_trial=0.5, clock=clock)
    gpu.trial_started("a")
    clock.now += 3600
    assert gpu.summary_line([]) == "budget 1.5gpu-h: spent 0.50gpu-h (1h wall time) on 1 trial"


def test_an_account_goes_on_from_what_its_part_of_the_run_spent(tmp_path: Path) -> None:
    """What a kill leaves in the run (saved every SAVE_EVERY_S); a new clock, and trials
    then running count again from their next report."""
    clock = FakeClock()
    run = RunDir.open(tmp_path / "run")
    account = BudgetAccount(Budget(3600, "gpu-h"), gpus_per_trial=1.0, clock=clock, run=run,
                            part=1)
    account.trial_started("a")
    account.trial_started("b")
    clock.now += 200
    account.trial_finished("b")
    clock.now += 400
    account.epoch_reported("a", 10.0)  # 600 s since the last save: saved
    clock.now += 5
    account.epoch_reported("a", 10.0)  # 5 s: not yet
    saved = json.loads((tmp_path / "run" / SPENDING_DIR / SPENDING_FILE).read_text())
    assert saved["earlier_wall_s"] == pytest.approx(600)  # as of the save, not 605

    later = FakeClock()
    later.now = 50.0  # another process's clock
    again = BudgetAccount(Budget(3600, "gpu-h"), gpus_per_trial=1.0, clock=later, run=run,
                          part=1)
    assert again.gpu_spent_s == pytest.approx(800) and again.wall_spent_s == pytest.approx(600)
    assert again.trial_ids == {"a", "b"} and again.finished_trial_s == [200]
    again.epoch_reported("a", 10.0)  # restarted by --resume: counts again from here
    later.now += 100
    assert again.gpu_spent_s == pytest.approx(900)
    for budget, part in ((Budget(3600, "gpu-h"), 2), (Budget(7200, "gpu-h"), 1)):
        fresh = BudgetAccount(budget, gpus_per_trial=1.0, clock=later, run=run, part=part)
        assert fresh.spent == 0 and not fresh.trial_ids  # another part's: not carried over
    again.end()
    assert not (tmp_path / "run" / SPENDING_DIR).exists()


def test_the_searcher_asks_the_running_search_s_account_and_finishes_when_it_refuses(
        tmp_path: Path) -> None:
    clock = FakeClock()

    def searcher() -> StudySearch:
        return StudySearch(space=DefineByRun(load_space("quick")), metric="best_val_acc",
                           mode="max")

    account = BudgetAccount(Budget(90, "wall"), gpus_per_trial=0, clock=clock)
    search = searcher()
    with running(account):
        assert isinstance(search.suggest("a"), dict)
        clock.now += 30
        search.on_trial_complete("a", {"best_val_acc": 0.5, "epoch": 1})
        assert account.trial_ids == {"a"} and account.finished_trial_s == [30]
        assert isinstance(search.suggest("b"), dict)  # 30 s + 30 (the mean trial) < 90
        clock.now += 31
        assert search.suggest("c") == Searcher.FINISHED
        assert account.trial_ids == {"a", "b"}
        search.save(str(tmp_path / "searcher.pkl"))

    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert isinstance(restored.suggest("d"), dict)  # no search with a budget running
    with running(account):
        assert restored.suggest("e") == Searcher.FINISHED


def test_without_a_budget_the_searcher_never_finishes() -> None:
    search = StudySearch(space=DefineByRun(load_space("quick")), metric="best_val_acc",
                         mode="max")
    assert all(isinstance(search.suggest(f"t{i}"), dict) for i in range(3))


def test_a_budget_search_records_its_trials_once_every_trial_has_ended(tmp_path: Path) -> None:
    """A budget ends a search short of --trials (or of no number): search.json then counts
    the trials it ran. One that Ctrl-C interrupted still has a trial running: left as it
    was, so --add-trials says to resume it first."""
    run = finished_run(tmp_path / "runs" / "done", whole_journal(tmp_path))
    meta = json.loads((run / SEARCH_FILE).read_text())
    (run / SEARCH_FILE).write_text(json.dumps({**meta, "trials": None, "budget": "2h"}))
    trials = pq.read_table(run / TRIALS_FILE)
    still_running = trials.to_pandas().assign(status="RUNNING")
    pq.write_table(pa.Table.from_pandas(still_running, schema=trials.schema), run / TRIALS_FILE)
    record_end(SearchRun.open(str(run)), None)
    assert json.loads((run / SEARCH_FILE).read_text())["trials"] is None

    pq.write_table(trials, run / TRIALS_FILE)
    account = BudgetAccount(Budget(7200, "wall"), gpus_per_trial=0, run=RunDir.open(run))
    account.save()
    record_end(SearchRun.open(str(run)), account)
    meta = json.loads((run / SEARCH_FILE).read_text())
    assert meta["trials"] == 12 and meta["budgets_spent"][0]["budget"] == "2h"
    assert not (run / SPENDING_DIR).exists()  # search.json holds it now
