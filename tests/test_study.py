"""The Optuna study in the run: --add-trials, --warm-start, and bad input around them."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search.cli import main
from search.run.study_search import StudySearch
from search.rundir import EPOCHS_FILE, SEARCH_FILE, STUDY_FILE, STUDY_NAME, TRIALS_FILE, RunDir
from search.sampling.samplers import make_sampler, startup_trials
from search.sampling.warm_start import WARM_START_ATTR, plan_warm_start
from search.study import (
    SUPERSEDES_ATTR,
    TRIAL_ID_ATTR,
    check_journal,
    driver_journal,
    journal_path,
    latest_trials,
    open_storage,
    open_study,
    pull_journal,
    push_journal,
)
from spaces import DefineByRun, fits, load_space, parse_space
from tests.conftest import one_line_error
from tests.rundir_fixture import sampled_run, search_json, trial_rows, write_run
from trainable.data import cache_dir
from trainable.errors import UserError


def load_run_study(run: Path | RunDir) -> optuna.Study:
    rundir = run if isinstance(run, RunDir) else RunDir.open(run)
    return optuna.load_study(study_name=STUDY_NAME, storage=open_storage(rundir))


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what 'nothing changed' compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def finished_run(run: Path, journal: bytes) -> Path:
    """A finished search (12 trials of the quick space, the last failed) as search.json,
    the Parquet files and the study file hold it, without running one."""
    sampled_run(run, n_trials=12, space_name="quick")
    meta = {**search_json("quick", run.name, [p.name for p in load_space("quick").params]),
            "trials": 12, "fixed": load_space("quick").fixed, "gpus_per_trial": 0.0,
            "cpus_per_trial": 1.0}
    (run / SEARCH_FILE).write_text(json.dumps(meta))
    (run / STUDY_FILE).write_bytes(journal)
    return run


def whole_journal(tmp_path: Path) -> bytes:
    study = open_study(open_storage(RunDir.open(tmp_path / "journal")), load_space("quick"))
    trial = study.ask()
    DefineByRun(load_space("quick"))(trial)
    study.tell(trial, 0.5)
    return (tmp_path / "journal" / STUDY_FILE).read_bytes()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_tpe_startup_trials_scale_with_the_search() -> None:
    assert [startup_trials(n) for n in (1, 8, 12, 24, 40, 64, 500)] == [2, 2, 3, 6, 10, 10, 10]
    # the search's first 6 trials of 24 are the random sampler's draws, the 7th TPE's model's
    def draws(sampler: optuna.samplers.BaseSampler) -> list[dict[str, Any]]:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for _ in range(7):
            trial = study.ask()
            DefineByRun(load_space("quick"))(trial)
            study.tell(trial, trial.number / 10)
        return [t.params for t in study.trials]

    tpe, random = draws(make_sampler("tpe", 0, 24)), draws(make_sampler("random", 0, 24))
    assert tpe[:6] == random[:6] and tpe[6] != random[6]


def test_a_remote_run_keeps_its_journal_on_the_driver_and_a_copy_in_the_run(
        tmp_path: Path) -> None:
    """A run directory behind a filesystem other than the local one, as s3:// is."""
    (tmp_path / "bucket").mkdir()
    run = RunDir(pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()),
                 "run", "mock://bucket/run")
    local, remote = journal_path(run), tmp_path / "bucket" / "run" / STUDY_FILE
    assert local.is_relative_to(cache_dir())
    study = open_study(open_storage(run), load_space("quick"))
    study.tell(study.ask(), 0.5)
    assert local.is_file() and not remote.exists()
    journal = driver_journal(run)
    assert journal is not None and driver_journal(RunDir.open(tmp_path / "local")) is None
    push_journal(run, journal)  # as the results writer does with every flush
    assert remote.read_bytes() == local.read_bytes()

    study.tell(study.ask(), 0.6)  # the driver's copy is ahead of the run's: it stays
    pull_journal(run)
    assert len(load_run_study(run).trials) == 2
    local.unlink()  # another machine: the run's copy comes down
    pull_journal(run)
    assert local.read_bytes() == remote.read_bytes()
    check_journal(run)
    # Tune pickles the storage with the searcher; it reopens the run's journal
    reopened = pickle.loads(pickle.dumps(open_storage(run)))
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=reopened).trials) == 1


def test_the_study_names_its_objective_as_the_trials_report_it(tmp_path: Path) -> None:
    """optuna-dashboard labels its axes with the study's metric names ("Objective 0" without)."""
    (tmp_path / "new").mkdir()
    assert open_study(open_storage(RunDir.open(tmp_path / "new")), load_space("quick")
                      ).metric_names == ["best_val_acc"]
    old = RunDir.open(tmp_path / "old")  # a study from before studies were named
    (tmp_path / "old").mkdir()
    optuna.create_study(storage=open_storage(old), study_name=STUDY_NAME, direction="minimize")
    losses = parse_space("metric: val_loss\nsearch:\n  lr: {type: float, low: 0.001, high: 0.1}\n",
                         "loss.yaml")
    open_study(open_storage(old), losses)
    assert load_run_study(old).metric_names == ["best_val_loss"]


def epoch_result(epoch: int, best: float) -> dict[str, Any]:
    return {"epoch": epoch, "best_val_acc": best, "training_iteration": epoch}


def test_the_study_records_every_epoch_once_the_last_one_too(
        tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """The calls Tune's controller makes for three trials, as it makes them."""
    space, run = load_space("quick"), RunDir.open(tmp_path / "run")
    (tmp_path / "run").mkdir()
    storage = open_storage(run)
    open_study(storage, space)

    def searcher() -> StudySearch:
        return StudySearch(space=DefineByRun(space), metric="best_val_acc", mode="max",
                           storage=storage, study_name=STUDY_NAME,
                           sampler=optuna.samplers.RandomSampler(seed=0))

    search = searcher()
    # ASHA stops "stopped" on its 2nd epoch: Tune passes that result to completion only
    search.suggest("stopped")
    search.on_trial_result("stopped", epoch_result(1, 0.1))
    search.on_trial_complete("stopped", epoch_result(2, 0.2))
    # "ran" ends after its 3rd epoch: Tune passes the last result again at completion
    search.suggest("ran")
    for epoch in (1, 2, 3):
        search.on_trial_result("ran", epoch_result(epoch, 0.1 * epoch))
    search.on_trial_complete("ran", epoch_result(3, 0.3))
    # "killed": Tune saved the searcher after epoch 1, the journal has epoch 2 too; restored,
    # the trial runs epoch 2 again from its checkpoint
    search.suggest("killed")
    search.on_trial_result("killed", epoch_result(1, 0.1))
    search.save(str(tmp_path / "searcher.pkl"))
    search.on_trial_result("killed", epoch_result(2, 0.2))
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("killed", epoch_result(2, 0.25))
    restored.on_trial_result("killed", epoch_result(3, 0.3))
    restored.on_trial_complete("killed", epoch_result(3, 0.3))

    trials = {t.user_attrs[TRIAL_ID_ATTR]: t for t in load_run_study(run).trials}
    assert trials["stopped"].intermediate_values == {1: 0.1, 2: 0.2}
    assert trials["ran"].intermediate_values == {1: 0.1, 2: 0.2, 3: pytest.approx(0.3)}
    assert trials["killed"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}
    assert [t.value for t in trials.values()] == pytest.approx([0.2, 0.3, 0.3])
    assert {t.state.name for t in trials.values()} == {"PRUNED"}  # all before epoch 10
    journal = [json.loads(line) for line in (tmp_path / "run" / STUDY_FILE).read_text().split(
        "\n")[:-1]]
    assert sum("intermediate_value" in op for op in journal) == 2 + 3 + 3
    assert not [w for w in recwarn if "already reported" in str(w.message)]


def test_the_searcher_asks_enqueued_configs_first_and_tells_how_each_trial_ended(
        tmp_path: Path) -> None:
    """A trial runs in the study from its suggest on (which TPE's constant liar counts); one
    that ran its epoch budget is told COMPLETE, one stopped before it PRUNED with its last
    value, an error FAIL, a trial removed before its first result PRUNED, one that diverged
    in its first epoch (its running best NaN) FAIL; a trial told before a kill that Tune's
    older saved state runs again is recorded anew as it ended this time."""
    space, run = load_space("quick"), RunDir.open(tmp_path / "run")
    (tmp_path / "run").mkdir()
    storage = open_storage(run)
    open_study(storage, space).enqueue_trial({"lr": 0.05})

    def searcher() -> StudySearch:
        return StudySearch(space=DefineByRun(space), metric="best_val_acc", mode="max",
                           storage=storage, study_name=STUDY_NAME,
                           sampler=optuna.samplers.RandomSampler(seed=0))

    search = searcher()
    assert search.suggest("enqueued")["lr"] == 0.05
    for trial_id in ("errored", "removed", "diverged", "finished"):
        search.suggest(trial_id)
    assert {t.state.name for t in load_run_study(run).trials} == {"RUNNING"}
    search.save(str(tmp_path / "searcher.pkl"))
    search.on_trial_complete("errored", error=True)
    search.on_trial_complete("removed")
    search.on_trial_complete("diverged", epoch_result(1, float("nan")))
    search.on_trial_complete("enqueued", epoch_result(1, 0.5))
    search.on_trial_complete("finished", epoch_result(space.scheduler.max_epochs, 0.7))
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("enqueued", epoch_result(1, 0.4))
    restored.on_trial_result("enqueued", epoch_result(2, 0.6))
    restored.on_trial_complete("enqueued", epoch_result(2, 0.6))

    trials = latest_trials(load_run_study(run))
    assert {trial_id: t.state.name for trial_id, t in trials.items()} == {
        "enqueued": "PRUNED", "errored": "FAIL", "removed": "PRUNED", "diverged": "FAIL",
        "finished": "COMPLETE"}
    assert trials["enqueued"].value == 0.6
    assert trials["enqueued"].intermediate_values == {1: 0.4, 2: 0.6}
    first = load_run_study(run).trials[trials["enqueued"].user_attrs[SUPERSEDES_ATTR]]
    assert trials["enqueued"].params == first.params and first.params["lr"] == 0.05
    assert trials["finished"].value == 0.7


def test_a_trial_told_before_a_kill_and_run_to_its_last_epoch_after_resume_ends_complete(
        tmp_path: Path) -> None:
    """The calls Tune makes when its saved state is older than the journal: "stopped" was
    stopped by ASHA at its first rung and "errored" failed (Tune keeps an errored trial for
    --resume) after Tune last saved the searcher, then the driver was killed; restored, Tune
    runs both to their last epoch. "mended" ran its last epoch before the kill, and Tune's
    saved result is its epoch before (its checkpoint was mended on --resume): it reports its
    last epoch again (trainable/tune_adapter.py). Each ends COMPLETE with its value, the
    new ending a study trial of its own with the same params, and no study trial is left
    RUNNING."""
    space, run = load_space("quick"), RunDir.open(tmp_path / "run")
    (tmp_path / "run").mkdir()
    storage = open_storage(run)
    open_study(storage, space)
    last = space.scheduler.max_epochs

    def searcher() -> StudySearch:
        return StudySearch(space=DefineByRun(space), metric="best_val_acc", mode="max",
                           storage=storage, study_name=STUDY_NAME,
                           sampler=optuna.samplers.RandomSampler(seed=0))

    search = searcher()
    for trial_id in ("stopped", "errored", "mended"):
        search.suggest(trial_id)
        search.on_trial_result(trial_id, epoch_result(1, 0.1))
    for epoch in range(2, last):
        search.on_trial_result("mended", epoch_result(epoch, 0.1 * epoch))
    search.save(str(tmp_path / "searcher.pkl"))
    search.on_trial_complete("stopped", epoch_result(1, 0.1))  # ASHA's rung
    search.on_trial_complete("errored", error=True)
    search.on_trial_result("mended", epoch_result(last, 0.1 * last))
    # SIGKILL; --resume
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    for trial_id in ("stopped", "errored"):
        for epoch in range(2, last + 1):
            restored.on_trial_result(trial_id, epoch_result(epoch, 0.1 * epoch))
        restored.on_trial_complete(trial_id, epoch_result(last, 0.1 * last))
    restored.on_trial_result("mended", epoch_result(last, 0.1 * last))
    restored.on_trial_complete("mended", epoch_result(last, 0.1 * last))

    study = load_run_study(run)
    trials = latest_trials(study)
    assert {trial_id: t.state.name for trial_id, t in trials.items()} == {
        "stopped": "COMPLETE", "errored": "COMPLETE", "mended": "COMPLETE"}
    assert [t.value for t in trials.values()] == pytest.approx([0.1 * last] * 3)
    every_epoch = {epoch: pytest.approx(0.1 * epoch) for epoch in range(1, last + 1)}
    assert [t.intermediate_values for t in trials.values()] == [every_epoch] * 3
    before = {t.number: t for t in study.trials if SUPERSEDES_ATTR not in t.user_attrs}
    assert {before[t.user_attrs[SUPERSEDES_ATTR]].state.name: t.params
            for t in trials.values() if SUPERSEDES_ATTR in t.user_attrs} == {
        "PRUNED": before[0].params, "FAIL": before[1].params}
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.parametrize("distribution", [
    FloatDistribution(0.01, 0.3), FloatDistribution(1e-6, 1e-3, log=True),
    FloatDistribution(0.0, 1.0, step=0.25), IntDistribution(1, 9), IntDistribution(2, 8, step=3),
    IntDistribution(1, 64, log=True), CategoricalDistribution(["pad", "none", 4, None])])
def test_a_warm_start_value_fits_a_distribution_where_optuna_accepts_it(
        distribution: BaseDistribution) -> None:
    for value in (-1, 0, 0.01, 0.02, 0.3, 0.5, 0.75, 0.76, 1, 1.5, 2, 3, 5, 8, 9, 64, 65, 1e-4,
                  float("nan"), "pad", "resized", "4", None, True):
        try:
            optuna.trial.create_trial(params={"p": value}, distributions={"p": distribution},
                                      value=0.0)
            accepted = True
        except (TypeError, ValueError):
            accepted = False
        assert fits(value, distribution) == accepted, (value, distribution)


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda whole: whole + b'{"op_code": 4, "worker_id": "x", "trial', "its last line"),
    (lambda whole: b"garbage\n" + whole, "line 1 is not an Optuna journal operation"),
    (lambda whole: whole.replace(b"\n", b"\n[1, 2]\n", 1), "line 2 is not an Optuna journal"),
    (lambda whole: b"", "holds no study named 'search'"),
    (lambda whole: whole + b'{"op_code": 99, "worker_id": "x"}\n', "Optuna cannot replay it"),
    (lambda whole: whole + b'{"op_code": 4, "worker_id": "x"}\n', "Optuna cannot replay it"),
])
def test_a_corrupt_study_file_is_one_line_naming_it(tmp_path: Path, damage: Any,
                                                    expected: str) -> None:
    whole = whole_journal(tmp_path)
    run = RunDir.open(tmp_path / "run")
    (tmp_path / "run").mkdir()
    check_journal(RunDir.open(tmp_path / "journal"))
    (tmp_path / "run" / STUDY_FILE).write_bytes(damage(whole))
    with pytest.raises(UserError) as e:
        check_journal(run)
    assert str(e.value).startswith(f"{run.uri_of(STUDY_FILE)} ") and expected in str(e.value)


@pytest.mark.parametrize("resume", [False, True])
def test_a_corrupt_study_file_is_refused_and_nothing_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], resume: bool) -> None:
    run = finished_run(tmp_path / "runs" / "done", b"garbage\n")
    before = files(run)
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path / "runs"), "--name",
                                  "done", *(["--resume"] if resume else ["--add-trials", "4"])])
    assert f"{run / STUDY_FILE} is corrupt: line 1 is not an Optuna journal" in err
    assert files(run) == before


def test_add_trials_to_a_run_that_does_not_exist_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs").mkdir()
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path / "runs"), "--name",
                                  "nosuch", "--add-trials", "8"])
    assert f"--add-trials: there is no search named 'nosuch' in {tmp_path / 'runs'}" in err
    assert list((tmp_path / "runs").iterdir()) == []


def test_add_trials_to_an_interrupted_run_says_to_resume_it_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = finished_run(tmp_path / "runs" / "cut", whole_journal(tmp_path))
    meta = json.loads((run / SEARCH_FILE).read_text())
    (run / SEARCH_FILE).write_text(json.dumps({**meta, "trials": 16}))  # 4 never ran
    before = files(run)
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path / "runs"), "--name",
                                  "cut", "--add-trials", "8"])
    assert "was interrupted (12 of 16 trials finished)" in err
    assert "resnet-hpo search --name cut --resume" in err
    assert files(run) == before


def test_warm_start_from_a_directory_that_is_not_a_run_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    (not_a_run / "cat.jpg").write_bytes(b"\xff\xd8")
    before = files(tmp_path)
    err = one_line_error(capsys, ["search", "--space", "quick", "--storage",
                                  str(tmp_path / "runs"), "--name", "warm", "--warm-start",
                                  str(not_a_run)])
    assert f"--warm-start {not_a_run}: no {SEARCH_FILE} there" in err
    assert files(tmp_path) == before and not (tmp_path / "runs").exists()


def warm_space(lr_low: float, lr_high: float, max_epochs: int) -> str:
    return f"""
metric: val_acc
scheduler: {{name: fifo, max_epochs: {max_epochs}}}
fixed: {{resolution: 16, weights: none, batch_size: 64}}
search:
  lr:    {{type: float, low: {lr_low}, high: {lr_high}, log: true}}
  crop:  {{type: categorical, choices: [pad, none]}}
  label_smoothing: {{type: float, low: 0.0, high: 0.2}}
"""


def test_warm_start_enqueues_the_best_configs_clipped_and_keeps_the_fitting_trials(
        tmp_path: Path) -> None:
    quick = load_space("quick")
    base = quick.config({}).to_dict()
    # (lr, crop, peak, best epoch, epochs run): t0 peaks highest but after epoch 4
    configs = [(0.2, "pad", 0.99, 8, 10), (0.2, "resized", 0.9, 3, 10),
               (0.05, "none", 0.8, 2, 2), (0.02, "pad", 0.7, 2, 2), (0.03, "pad", 0.6, 2, 10)]
    trials, epochs = [], []
    for i, (lr, crop, peak, best, run_epochs) in enumerate(configs):
        config = {**base, "lr": lr, "crop": crop, "label_smoothing": 0.1 * (i % 2)}
        trial, rows = trial_rows(config, f"t{i}", peak, best, run_epochs)
        trials.append(trial)
        epochs += rows
    run = write_run(tmp_path / "old", trials, epochs, search_json("quick", "old", []))
    space = parse_space(warm_space(0.01, 0.1, 4), "new.yaml")

    plan = plan_warm_start(str(run), space, top=3)
    # ranked by val_acc within this space's 4 epochs: t1 (0.9 at epoch 3) before t0
    assert [trial_id for trial_id, _ in plan.enqueued] == ["t1", "t0", "t2"]
    assert plan.enqueued[0][1] == {"lr": 0.1, "label_smoothing": 0.1}  # crop left to sampler
    assert plan.enqueued[1][1] == {"lr": 0.1, "crop": "pad", "label_smoothing": 0.0}
    assert plan.enqueued[2][1] == {"lr": 0.05, "crop": "none", "label_smoothing": 0.0}
    assert plan.adjusted == {"lr clipped into [0.01, 0.1]": 2,
                             "crop 'resized' left to the sampler": 1}
    assert "outside this space: lr clipped into [0.01, 0.1] in 2 configs" in plan.summary()
    # history: only trials whose values all fit, at their best within 4 epochs
    assert [trial_id for trial_id, _ in plan.history] == ["t2", "t3", "t4"]
    history = {trial_id: trial for trial_id, trial in plan.history}
    assert history["t4"].value == pytest.approx(epochs[[r["trial_id"] for r in epochs].index(
        "t4") + 1]["val_acc"])  # best at epoch 2
    assert history["t3"].user_attrs[WARM_START_ATTR] == f"{run} trial t3"

    study = optuna.create_study(direction="maximize")
    plan.apply(study)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["WAITING"] * 3
    first = DefineByRun(space)(study.ask())
    assert (first["lr"], first["label_smoothing"]) == (0.1, 0.1)
    assert first["crop"] in ("pad", "none")
    assert plan.record() == {"run": str(run), "enqueued": ["t1", "t0", "t2"],
                             "history": ["t2", "t3", "t4"], "adjusted": plan.adjusted}


# --- end to end on digits ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Iterator[Path]:
    """A finished search of 8 trials of the quick space with TPE on digits at 16px, 1 epoch
    each: ASHA stops each trial on that epoch, so Tune passes its only result to the searcher's
    on_trial_complete alone."""
    storage = tmp_path_factory.mktemp("study")
    quick = load_space("quick")
    space = storage / "quick-1-epoch.yaml"
    space.write_text(re.sub(r"(?m)^scheduler: .*$",
                            "scheduler: {name: asha, max_epochs: 1, grace_period: 1}",
                            quick.text.replace("sampler: random", "sampler: tpe")))
    with pytest.MonkeyPatch.context() as monkeypatch:  # _isolated_cache is per test
        monkeypatch.setenv("RESNET_HPO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        main(["search", "--space", str(space), "--data", "digits", "--resolution", "16",
              "--trials", "8", "--seed", "0", "--max-concurrent", "4",
              "--storage", str(storage), "--name", "first"])
    yield storage / "first"


@pytest.mark.slow
@pytest.mark.ray
def test_warm_start_tries_the_best_configs_first_and_records_where_it_started(
        digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = pq.read_table(digits_run / TRIALS_FILE).to_pandas()
    best = source.sort_values(["best_metric", "trial_id"], ascending=[False, True])
    lr_high = round(float(best.lr.iloc[0]) / 1.5, 4)  # the best config's lr is clipped
    space = tmp_path / "space.yaml"
    space.write_text(warm_space(0.005, lr_high, 1))
    capsys.readouterr()
    main(["search", "--space", str(space), "--data", "digits", "--trials", "3", "--seed", "1",
          "--warm-start", str(digits_run), "--warm-start-top", "2", "--max-concurrent", "2",
          "--storage", str(tmp_path / "runs"), "--name", "warm"])
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "warm"
    top2 = list(best.trial_id[:2])
    assert f"--warm-start {digits_run}: its 2 best configs first" in out
    assert f"lr clipped into [0.005, {lr_high:g}]" in out

    record = json.loads((run / SEARCH_FILE).read_text())["warm_start"]
    fitting = best[(best.lr <= lr_high) & best.crop.isin(["pad", "none"])]
    assert record["run"] == str(digits_run) and record["enqueued"] == top2
    assert record["history"] == list(fitting.trial_id)

    study = load_run_study(run)
    history = len(fitting)
    assert [t.user_attrs.get(WARM_START_ATTR) for t in study.trials[:history]] == [
        f"{digits_run} trial {trial_id}" for trial_id in fitting.trial_id]
    trials = pq.read_table(run / TRIALS_FILE).to_pandas().set_index("trial_id")
    assert len(trials) == 3 and set(trials.status) == {"TERMINATED"}
    for number, trial_id in enumerate(top2, start=history):  # the first two trials asked
        tried, was = study.trials[number], best.set_index("trial_id").loc[trial_id]
        assert tried.params["lr"] == pytest.approx(min(was.lr, lr_high))
        assert tried.params["label_smoothing"] == pytest.approx(was.label_smoothing)
        if was.crop in ("pad", "none"):
            assert tried.params["crop"] == was.crop
        row = trials.loc[tried.user_attrs[TRIAL_ID_ATTR]]
        assert row.lr == pytest.approx(tried.params["lr"])
        assert tried.value == pytest.approx(row.best_metric)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.long
def test_add_trials_appends_trials_sampled_by_tpe_with_the_earlier_ones_as_history(
        digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "more"
    shutil.copytree(digits_run, run, ignore=shutil.ignore_patterns("checkpoint_*"))
    first = pq.read_table(run / TRIALS_FILE).to_pandas()
    assert len(first) == 8
    main(["search", "--storage", str(tmp_path / "runs"), "--name", "more", "--add-trials", "8",
          "--max-concurrent", "4"])
    trials = pq.read_table(run / TRIALS_FILE).to_pandas()
    epochs = pq.read_table(run / EPOCHS_FILE).to_pandas()
    assert len(trials) == 16 and set(trials.status) == {"TERMINATED"}
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert len(epochs) == trials.epochs_run.sum() and set(epochs.trial_id) == set(trials.trial_id)
    added = trials[~trials.trial_id.isin(first.trial_id)]
    assert len(added) == 8
    meta = json.loads((run / SEARCH_FILE).read_text())
    assert meta["trials"] == 16 and [(a["trials"], a["after"]) for a in meta["added"]] == [(8, 8)]
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == sorted(trials.trial_id)

    # The study holds all 16, told the values trials.parquet has, every epoch the last too ...
    study = load_run_study(run)
    assert study.metric_names == ["best_val_acc"]
    by_id = {t.user_attrs[TRIAL_ID_ATTR]: t for t in study.trials}
    assert len(study.trials) == 16 and set(by_id) == set(trials.trial_id)
    assert {by_id[i].number for i in first.trial_id} == set(range(8))
    searched = [p.name for p in load_space("quick").params]
    for row in trials.itertuples():
        told = by_id[row.trial_id]
        assert told.state.name == ("PRUNED" if row.stopped_early else "COMPLETE")
        assert told.value == pytest.approx(row.best_metric)
        assert told.params == pytest.approx({name: getattr(row, name) for name in searched})
        ran = sorted(epochs.epoch[epochs.trial_id == row.trial_id])
        assert sorted(told.intermediate_values) == ran
        assert told.intermediate_values[ran[-1]] == pytest.approx(row.best_metric)
    # ... and each added trial was asked with at least the first 8 ended (TPE's startup
    # trials for 16 are 4, so its model drew them) ...
    for trial in study.trials[8:]:
        assert trial.datetime_start is not None
        history = [t for t in study.trials if t.datetime_complete is not None
                   and t.datetime_complete < trial.datetime_start]
        assert len(history) >= 8
    # ... the first of them exactly the draw of a TPE seeded past the 8, given the 8
    replay = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", 0 + 8, 16))
    replay.add_trials(study.trials[:8])
    drawn = DefineByRun(load_space("quick"))(replay.ask())
    assert {name: drawn[name] for name in searched} == pytest.approx(study.trials[8].params)

    main(["best", str(run)])
    assert f"of 16: val_acc {trials.best_metric.max():.4f}" in capsys.readouterr().out
