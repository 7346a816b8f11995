"""`resnet-hpo search --confirm K`: the best configs trained again with new seeds, the best
mean handed over (summary, best.yaml), its cost in --budget, and the flags it is refused
with."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from search.cli import main
from search.run.budget import Budget, BudgetAccount, ConfirmCost
from search.run.confirm import CONFIRM_DIR, ConfirmPlan
from search.run.request import request_from_args
from search.rundir import BEST_FILE, EPOCHS_FILE, SEARCH_FILE, TRIALS_FILE, SearchRun
from search.views.best import best_command, best_trial_lines, trial_config
from tests.conftest import one_line_error, reported_epochs, search_space_file
from tests.rundir_fixture import sampled_run
from tests.test_budget import FakeClock, never_starts_ray, refused_before_ray, search_args
from tests.test_faults import kill_when, resnet_hpo, tiny_images, tpe_fifo_space
from tests.test_study import finished_run, whole_journal
from trainable.config import TrainConfig


@pytest.mark.parametrize(("flags", "expected"), [
    (["--confirm", "-1"], "--confirm must be >= 0 (the best configs to train again), got -1"),
    (["--trials", "3", "--confirm", "4"],
     "--confirm 4: the search runs 3 trials (--trials), so it has at most 3 configs to "
     "confirm"),
    (["--confirm", "17"], "--confirm 17: the search runs 16 trials"),  # the default --trials
    (["--confirm", "2", "--confirm-seeds", "0"], "--confirm-seeds must be >= 1, got 0"),
    (["--confirm-seeds", "3"], "--confirm-seeds 3 needs --confirm K"),
])
def test_bad_confirm_flags_are_one_line_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        flags: list[str], expected: str) -> None:
    assert expected in refused_before_ray(tmp_path, capsys, monkeypatch, flags)


@pytest.mark.parametrize("flag", ["--resume", "--add-trials=2"])
def test_confirm_goes_with_a_new_search_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        flag: str) -> None:
    never_starts_ray(monkeypatch)
    err = one_line_error(capsys, ["search", "--storage", str(tmp_path), "--name", "x", flag,
                                  "--confirm", "2"])
    assert "leave out --confirm" in err


def test_a_budget_refuses_no_confirm_before_the_first_epoch(tmp_path: Path) -> None:
    """Its cost is unknown before an epoch has been timed; only K above --trials is sure to
    be impossible."""
    space = str(search_space_file(tmp_path))
    request = request_from_args(search_args("--space", space, "--budget", "1m", "--confirm",
                                            "40", "--confirm-seeds", "3"), {})
    assert (request.trials, request.confirm, request.confirm_seeds) == (None, 40, 3)
    plain = request_from_args(search_args("--space", space, "--confirm", "2"), {})
    assert (plain.confirm, plain.confirm_seeds) == (2, 2)


def test_the_budget_holds_back_the_confirm_stage_from_the_first_epoch_on() -> None:
    """4 confirm runs of 3 epochs, 2 at a time: 2 waves x 3 epochs x the mean epoch time."""
    clock = FakeClock()
    account = BudgetAccount(Budget(100, "wall"), gpus_per_trial=0, clock=clock,
                            confirm=ConfirmCost(runs=4, epochs=3, slots=2))
    assert account.reserved == 0 and account.may_start()  # no epoch timed yet
    account.trial_started("a")
    clock.now += 4
    account.epoch_reported("a", 4.0)
    account.epoch_reported("a", 2.0)  # mean epoch 3 s: the confirm needs 2 x 3 x 3 = 18 s
    assert account.reserved == 18
    clock.now += 74  # 78 spent + 18 held back + 4 (the longest epoch) = 100
    assert not account.may_start() and not account.exhausted()
    clock.now -= 1
    assert account.may_start()
    clock.now += 5  # 82 + 18 = 100: running trials stop, the confirm runs on what is left
    assert account.exhausted() and account.spent < account.budget.seconds

    gpu = BudgetAccount(Budget(3600, "gpu-h"), gpus_per_trial=0.5, clock=clock,
                        confirm=ConfirmCost(runs=4, epochs=3, slots=2))
    gpu.epoch_reported("b", 10.0)
    assert gpu.reserved == 4 * 3 * 10 * 0.5  # every run's GPU share, whatever the waves


def test_the_summary_line_counts_the_confirm_stage() -> None:
    clock = FakeClock()
    account = BudgetAccount(Budget(600, "wall"), gpus_per_trial=0, clock=clock,
                            confirm=ConfirmCost(runs=4, epochs=3, slots=2))
    account.trial_started("a")
    clock.now += 100
    account.trial_finished("a")
    before = account.spent
    clock.now += 65
    account.confirm_ran(before, gpu_hours=0.0)
    assert account.summary_line([]) == ("budget 10m: spent 2m45s on 1 trial and the confirm "
                                        "stage's 4 runs (1m05s of it)")
    assert account.record([])["confirm_s"] == 65


def confirm_rows(run: SearchRun, plan: ConfirmPlan, scores: list[list[float]]
                 ) -> list[dict[str, Any]]:
    """trials.parquet rows of the confirm runs: scores[i][j] for config i, seed j."""
    rows = []
    for (trial, seed_scores), i in zip(zip(plan.trials(run), scores, strict=True),
                                       range(len(scores)), strict=True):
        for seed, score in zip(plan.seeds, seed_scores, strict=True):
            rows.append({**trial, "trial_id": f"c{i}{seed}", "seed": seed,
                         "epochs": plan.epochs, "best_metric": score})
    return rows


def test_the_best_confirmed_mean_is_handed_over_and_best_yaml_holds_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = sampled_run(tmp_path / "run")
    run = SearchRun.open(str(run_dir))
    plan = ConfirmPlan.make(run, top=3, seeds=2, epochs=run.info["scheduler"]["max_epochs"])
    finished = [t["trial_id"] for t in run.ranked if t["status"] == "TERMINATED"]
    assert plan.trial_ids == finished[:3] and plan.seeds == [1, 2]  # the trials used seed 0
    configs = plan.configs(run)
    assert [(c["seed"], c["epochs"]) for c in configs] == [(1, 20), (2, 20)] * 3

    # the search's best confirms lowest; the third has the best mean
    outcome = plan.outcome(run, confirm_rows(run, plan, [[0.5, 0.7], [0.6, 0.61], [0.7, 0.66]]))
    assert outcome["handed_over"] == plan.trial_ids[2]
    assert [c["mean"] for c in outcome["configs"]] == pytest.approx([0.6, 0.605, 0.68])
    assert outcome["configs"][0]["stderr"] == pytest.approx(
        statistics.stdev([0.5, 0.7]) / math.sqrt(2))
    info = json.loads((run_dir / SEARCH_FILE).read_text())
    (run_dir / SEARCH_FILE).write_text(json.dumps({
        **info, "confirm": {"top": 3, "seeds_per_config": 2, **outcome}}))

    run = SearchRun.open(str(run_dir))
    assert run.handed_over is not None and run.handed_over["trial_id"] == plan.trial_ids[2]
    lines = best_trial_lines(run)
    found = [t["best_metric"] for t in plan.trials(run)]
    assert lines[:5] == [
        "confirm: the best 3 configs again for 20 epochs with 2 new seeds each (1, 2); "
        "val_acc found -> confirmed",
        f"  trial {plan.trial_ids[0]}: {found[0]:.4f} -> 0.6000 ± 0.1000 (2 runs)",
        f"  trial {plan.trial_ids[1]}: {found[1]:.4f} -> 0.6050 ± 0.0050 (2 runs)",
        f"  trial {plan.trial_ids[2]}: {found[2]:.4f} -> 0.6800 ± 0.0200 (2 runs)"
        "  <- handed over",
        f"handed over: trial {plan.trial_ids[2]} of 12, the best confirmed mean; confirming "
        f"changed it from trial {plan.trial_ids[0]}, the search's best; the search found "
        f"val_acc {found[2]:.4f} at epoch {plan.trials(run)[2]['best_epoch']} (ran "
        f"{plan.trials(run)[2]['epochs_run']} of 20 epochs)"]
    best_command(str(run_dir), None)
    out = capsys.readouterr().out
    assert "\n".join(lines) in out
    assert "resnet-hpo train --config" in out and "--epochs 20 " in out
    handed = trial_config(plan.trials(run)[2], "trials.parquet").replace(epochs=20)
    assert TrainConfig.from_dict(yaml.safe_load((run_dir / BEST_FILE).read_text())) == handed


def test_a_config_whose_confirm_runs_all_failed_is_not_handed_over(tmp_path: Path) -> None:
    run = SearchRun.open(str(sampled_run(tmp_path / "run")))
    plan = ConfirmPlan.make(run, top=2, seeds=1, epochs=20)
    outcome = plan.outcome(run, confirm_rows(run, plan, [[float("nan")], [0.2]]))
    assert outcome["handed_over"] == plan.trial_ids[1]
    assert outcome["configs"][0]["mean"] is None and outcome["configs"][1]["stderr"] is None


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_confirms_its_best_configs_and_hands_over_the_best_mean(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    """3 trials of 2 epochs, then the best 2 configs with 2 new seeds each: their runs are
    in RUN/confirm (Parquet, TensorBoard beside the search's trials) and not in the search's
    trials.parquet; the summary and best.yaml name the best mean; the budget counts them.
    Then --resume of a search killed before its confirm runs started confirms them."""
    space = tpe_fifo_space(tmp_path, epochs=2)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "c"
    flags = ["--storage", str(runs), "--name", "c"]
    main(["search", *flags, "--space", str(space), "--data", tiny_images(tmp_path),
          "--trials", "3", "--max-concurrent", "2", "--budget", "1h", "--confirm", "2"])
    out = capsys.readouterr().out

    trials = pq.read_table(run / TRIALS_FILE).to_pylist()
    confirmed = pq.read_table(run / CONFIRM_DIR / TRIALS_FILE).to_pylist()
    assert len(trials) == 3 and len(confirmed) == 4
    assert {r["status"] for r in confirmed} == {"TERMINATED"}
    assert {r["epochs_run"] for r in confirmed} == {2}
    meta = json.loads((run / SEARCH_FILE).read_text())
    confirm = meta["confirm"]
    assert confirm["seeds"] == [1, 2] and {r["seed"] for r in trials} == {0}
    means = {c["trial_id"]: statistics.fmean(r["best_metric"] for r in confirmed
                                             if r["trial_id"] in {x["trial_id"]
                                                                  for x in c["runs"]})
             for c in confirm["configs"]}
    assert len(means) == 2 and all(len(c["runs"]) == 2 for c in confirm["configs"])
    assert confirm["handed_over"] == max(means, key=lambda k: (means[k], -list(means).index(k)))
    for c in confirm["configs"]:
        assert c["mean"] == pytest.approx(means[c["trial_id"]])
    for row in confirmed:
        assert (run / "tensorboard" / row["trial_id"]).is_dir()

    search_run = SearchRun.open(str(run))
    summary = "\n".join(best_trial_lines(search_run))
    assert summary in out and f"handed over: trial {confirm['handed_over']} of 3" in summary
    assert "budget 1h: spent " in out and "the confirm stage's 4 runs (" in out
    (spent,) = meta["budgets_spent"]
    assert spent["confirm_s"] > 0 and spent["trials"] == 3

    main(["best", str(run)])
    handed = next(t for t in trials if t["trial_id"] == confirm["handed_over"])
    best = yaml.safe_load((run / BEST_FILE).read_text())
    assert (best["lr"], best["label_smoothing"]) == (handed["lr"], handed["label_smoothing"])

    # Killed once the confirm runs had ended, before their outcome was recorded: --resume
    # restores the confirm stage's Tune run and records the same outcome.
    planned = {k: confirm[k] for k in ("top", "seeds_per_config", "trial_ids", "seeds",
                                       "epochs")}
    (run / SEARCH_FILE).write_text(json.dumps({**meta, "confirm": planned}))
    main(["search", *flags, "--resume"])
    assert json.loads((run / SEARCH_FILE).read_text())["confirm"] == confirm
    assert pq.read_table(run / CONFIRM_DIR / TRIALS_FILE).to_pylist() == confirmed
    # Killed before the confirm runs started: --resume runs the planned configs and seeds.
    shutil.rmtree(run / CONFIRM_DIR)
    (run / SEARCH_FILE).write_text(json.dumps({**meta, "confirm": planned}))
    main(["search", *flags, "--resume"])
    again = json.loads((run / SEARCH_FILE).read_text())["confirm"]
    assert again["trial_ids"] == confirm["trial_ids"] and again["seeds"] == [1, 2]
    assert again["handed_over"] in confirm["trial_ids"]
    assert len(pq.read_table(run / CONFIRM_DIR / TRIALS_FILE)) == 4


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_killed_during_its_confirm_stage_finishes_it_on_resume(
        tmp_path: Path, ray_session: None) -> None:
    """SIGKILL of the driver once a confirm run has a checkpoint and Tune has saved the
    confirm stage's state; `--resume` goes on with the same runs from their checkpoints
    (no run is started twice, each epoch is in RUN/confirm/epochs.parquet once) and hands
    over the best mean."""
    import ray

    address = ray.get_runtime_context().gcs_address
    run, log = tmp_path / "k", tmp_path / "driver.log"
    flags = ["--storage", str(tmp_path), "--name", "k", "--address", address]
    confirm = run / CONFIRM_DIR

    def confirming() -> bool:
        return bool(list(confirm.glob("experiment_state-*.json"))) and any(
            epoch >= 1 for epoch in reported_epochs(confirm).values())

    with log.open("ab") as out:
        driver = subprocess.Popen(resnet_hpo(
            "search", *flags, "--space", str(tpe_fifo_space(tmp_path, epochs=2)),
            "--data", tiny_images(tmp_path), "--trials", "3", "--max-concurrent", "2",
            "--confirm", "2", "--confirm-seeds", "1"), stdout=out, stderr=subprocess.STDOUT)
    kill_when(driver, confirm, confirming, log)
    started = set(reported_epochs(confirm))
    assert "handed_over" not in json.loads((run / SEARCH_FILE).read_text())["confirm"]

    main(["search", *flags, "--resume"])
    rows = pq.read_table(confirm / TRIALS_FILE).to_pylist()
    epochs = pq.read_table(confirm / EPOCHS_FILE).to_pandas()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert started <= {r["trial_id"] for r in rows}  # went on, not started again
    assert sorted(epochs.groupby("trial_id").epoch.apply(sorted).tolist()) == [[1, 2]] * 2
    outcome = json.loads((run / SEARCH_FILE).read_text())["confirm"]
    configs = outcome["configs"]
    assert [len(c["runs"]) for c in configs] == [1, 1]
    best = max(c["mean"] for c in configs)  # the first of equals, as the search ranked them
    assert outcome["handed_over"] == next(c for c in configs if c["mean"] == best)["trial_id"]


def test_add_trials_hands_over_the_best_trial_of_all_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The confirm stage chose among the trials before; the extension's own trials never
    ran beside them, so `best` ranks every trial again (the earlier confirm is kept)."""
    import search.run.driver as driver

    run = finished_run(tmp_path / "runs" / "done", whole_journal(tmp_path))
    meta = json.loads((run / SEARCH_FILE).read_text())
    ranked = SearchRun.open(str(run)).ranked
    earlier = {"top": 2, "seeds_per_config": 2, "handed_over": ranked[1]["trial_id"]}
    (run / SEARCH_FILE).write_text(json.dumps({**meta, "confirm": earlier}))
    assert SearchRun.open(str(run)).handed_over == ranked[1]

    class NoTuner:
        def fit(self) -> None:
            pass

    monkeypatch.setattr(driver, "decode_data", lambda request: (
        SimpleNamespace(published=lambda uri: None), None))
    monkeypatch.setattr(driver, "start_cluster", lambda request: 1)
    monkeypatch.setattr(driver, "build_tuner", lambda *args: NoTuner())
    monkeypatch.setattr(driver, "finish_search", lambda *args: None)
    main(["search", "--storage", str(tmp_path / "runs"), "--name", "done", "--add-trials", "2"])
    assert "the best trial of all is handed over now" in capsys.readouterr().out

    meta = json.loads((run / SEARCH_FILE).read_text())
    assert "confirm" not in meta and meta["added"][-1]["confirm_before"] == earlier
    assert SearchRun.open(str(run)).handed_over == ranked[0]
