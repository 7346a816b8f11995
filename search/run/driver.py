"""`resnet-hpo search`: a space file becomes a run of Optuna's sampler and ASHA on Ray Tune.

Everything the user gave is checked (space, data, resources, run name) before a trial
starts; the dataset is decoded once here, at the largest resolution the space allows, into
a file which every trial memory-maps: the trials of this node from the cache, those of other
nodes from a copy in the run's storage (RUN/data/KEY) that each node fetches once. A new
search, --resume and --add-trials each have their own function: new_search, resume_search
and add_trials.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import time
from dataclasses import asdict
from typing import Any

from optuna.storages.journal import JournalStorage

from search.defaults import DEFAULT_TRIALS
from search.run.budget import BudgetAccount, ConfirmCost, running
from search.run.cluster import start_cluster
from search.run.confirm import CONFIRM_DIR, ConfirmPlan
from search.run.request import SearchRequest
from search.run.study_search import StudySearch
from search.run.tune_state import mend_trial_checkpoints, saved_trial_ids, tune_state_problem
from search.rundir import SEARCH_FILE, STUDY_FILE, STUDY_NAME, TRIALS_FILE, RunDir, SearchRun
from search.sampling.priors import enqueue_priors
from search.sampling.samplers import make_sampler
from search.sampling.warm_start import WarmStart, plan_warm_start
from search.study import (
    check_journal,
    close_orphans,
    journal_path,
    open_storage,
    open_study,
    pull_journal,
)
from search.views.best import best_trial_lines
from spaces import DefineByRun, SearchSpace
from trainable import result_keys
from trainable.data import Dataset, DecodedData, decode_dataset
from trainable.errors import UserError


def make_scheduler(space: SearchSpace, objective: str) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric=objective, mode=space.mode,
                         max_t=s.max_epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def search_metadata(request: SearchRequest, data: Dataset) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("resnet-hpo", "torch", "torchvision", "ray", "optuna", "pyarrow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    space = request.space
    return {"name": request.name, "metric": space.metric, "mode": space.mode,
            "sampler": space.sampler, "scheduler": asdict(space.scheduler),
            "seed": request.seed, "trials": request.trials,
            "budget": None if request.budget is None else str(request.budget),
            "confirm": {"top": request.confirm, "seeds_per_config": request.confirm_seeds}
            if request.confirm else None,
            "keep_checkpoints": request.keep_checkpoints,
            "space_file": space.source,
            "space_text": space.text, "fixed": space.fixed,
            "searched": [p.name for p in space.params], "data": data.source,
            "resolution": data.resolution, "val_fraction": space.config({}).val_fraction,
            "gpus_per_trial": request.gpus_per_trial, "cpus_per_trial": request.cpus_per_trial,
            "command": request.command_line, "versions": versions,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def build_trainable(request: SearchRequest, data: DecodedData) -> Any:
    from ray import tune

    from trainable.tune_adapter import train_trial

    return tune.with_resources(
        tune.with_parameters(train_trial, data=data),
        {"cpu": request.cpus_per_trial, "gpu": request.gpus_per_trial})


def build_tuner(request: SearchRequest, data: DecodedData, concurrent: int,
                searcher: Any) -> Any:
    """The tuner of a new search or an extension; with a budget, a BudgetStopper stops its
    trials once the budget is spent, and without --trials the budget alone ends the
    search."""
    from ray import tune

    from search.run.budget_stopper import BudgetStopper
    from trainable.ranking import objective_name

    space = request.space
    return tune.Tuner(
        build_trainable(request, data),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(space, objective_name(space.metric)),
            # max_concurrent_trials also sets how many trials Tune keeps pending; without it
            # a search algorithm gets one (TUNE_MAX_PENDING_TRIALS_PG=auto: Ray 2.60's
            # tune_controller._get_max_pending_trials), so fractional-GPU trials would start
            # one at a time. Tuner.restore keeps the original run's value.
            num_samples=request.trials or -1, max_concurrent_trials=concurrent,
            # A freed slot's actor trains the next trial: a new one would import torch and
            # the project again (seconds, the most of a turnover between short trials).
            # Tune resets it with the next trial's config (FunctionTrainable.reset_config).
            reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=run_config(request, request.storage, request.name, request.run_uri,
                              request.trials,
                              stop=None if request.budget is None else BudgetStopper(),
                              keep_checkpoints=request.keep_checkpoints))


def run_config(request: SearchRequest, storage: str, name: str, results_uri: str,
               trials: int | None, stop: Any = None, keep_checkpoints: int | None = None
               ) -> Any:
    """The Tune run config of the search's trials or its confirm runs: their rows go to
    results_uri's Parquet files, their scalars to the run's TensorBoard directory; only the
    `keep_checkpoints` best finished trials keep their checkpoints (None: all do)."""
    from ray import tune

    from search.record.progress import ProgressPrinter
    from search.record.results_writer import ResultsWriter
    from search.record.tensorboard_writer import TensorBoardWriter

    space = request.space
    callbacks = [
        ResultsWriter(results_uri, space.metric, space.mode, request.gpus_per_trial,
                      request.cpus_per_trial, keep_checkpoints),
        TensorBoardWriter(request.run_uri, space.metric, space.params),
        ProgressPrinter(space.metric, [p.name for p in space.params], trials),
    ]
    return tune.RunConfig(
        name=name, storage_path=storage, callbacks=callbacks, verbose=0, stop=stop,
        # Every checkpoint holds the best epoch's weights so far: the latest is enough.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=request.max_failures))


def build_confirm_tuner(request: SearchRequest, data: DecodedData, concurrent: int,
                        configs: list[dict[str, Any]], confirm: RunDir) -> Any:
    """The confirm stage's tuner (search/run/confirm.py): each config once, first come first
    run, in `confirm` (RUN/confirm)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from search.run.config_queue import ConfigQueue

    return tune.Tuner(
        build_trainable(request, data),
        tune_config=tune.TuneConfig(
            search_alg=ConfigQueue(configs),
            scheduler=FIFOScheduler(), num_samples=len(configs),
            max_concurrent_trials=concurrent, reuse_actors=True,
            trial_dirname_creator=trial_dirname),
        run_config=run_config(request, request.run_uri, CONFIRM_DIR, confirm.uri,
                              len(configs)))


def decode_data(request: SearchRequest) -> tuple[DecodedData, Dataset]:
    """The search's data, decoded once at the largest resolution the space allows: where it
    is, and its arrays."""
    cfg = request.space.config({})
    decoded = decode_dataset(cfg.data, request.space.decode_resolution, cfg.val_fraction)
    data = decoded.open()
    print(data.summary(), flush=True)
    return decoded, data


def make_searcher(request: SearchRequest, storage: JournalStorage, seed: int,
                  total: int | None) -> StudySearch:
    """The searcher of the run's study: the sampler is conditioned on every trial in it.
    `total`: the trials of the whole run, None when a budget ends it (the sampler then
    starts as for a search of DEFAULT_TRIALS)."""
    from trainable.ranking import objective_name

    space = request.space
    return StudySearch(space=DefineByRun(space), metric=objective_name(space.metric),
                       mode=space.mode, storage=storage, study_name=STUDY_NAME,
                       sampler=make_sampler(space.sampler, seed, total or DEFAULT_TRIALS))


def open_account(run: RunDir, request: SearchRequest, concurrent: int
                 ) -> BudgetAccount | None:
    """The budget's account of the run's last part (the search, or its last --add-trials),
    its clock started: just before the tuner runs. It goes on from what the part spent
    before a kill or Ctrl-C. With --confirm it holds back the confirm stage's cost."""
    if request.budget is None:
        return None
    confirm = ConfirmCost(request.confirm * request.confirm_seeds,
                          request.space.scheduler.max_epochs, concurrent)
    return BudgetAccount(request.budget, request.gpus_per_trial,
                         confirm=confirm if request.confirm else None, run=run,
                         part=len(run.read_json(SEARCH_FILE).get("added", [])))


def check_new_run(run: RunDir, request: SearchRequest) -> WarmStart | None:
    """A new search gets a run directory of its own; returns its warm start, if any."""
    if run.exists(SEARCH_FILE) or run.exists(TRIALS_FILE) or run.exists(STUDY_FILE):
        raise UserError(f"--name {request.name}: {run.uri} already holds a search; add "
                        "--resume to continue it, --add-trials N to extend it, or choose "
                        "another --name")
    if request.warm_start is None:
        return None
    return plan_warm_start(request.warm_start, request.space,
                           min(request.warm_start_top, request.trials or request.warm_start_top))


def new_search(request: SearchRequest) -> None:
    run = RunDir.open(request.run_uri)
    warm_start = check_new_run(run, request)
    decoded, data = decode_data(request)
    concurrent = start_cluster(request)
    meta = search_metadata(request, data)
    if warm_start is not None:
        meta["warm_start"] = warm_start.record()
    run.write_json(SEARCH_FILE, meta)
    if run.local_path() is None:
        journal_path(run).unlink(missing_ok=True)  # the driver's copy of an earlier run's
    storage = open_storage(run)
    study = open_study(storage, request.space)
    if warm_start is not None:
        print(warm_start.summary(), flush=True)
        warm_start.apply(study)
    elif priors := enqueue_priors(study, request.space, data.source):
        print(f"the guides' recipes first: {priors} prior configs (search/sampling/priors.py)",
              flush=True)
    print(f"search {request.name}: {describe_size(request, 'trials')}, sampler "
          f"{request.space.sampler}, scheduler {request.space.scheduler.name}, {concurrent} "
          f"at a time; results in {run.uri}", flush=True)
    searcher = make_searcher(request, storage, request.seed, request.trials)
    published = decoded.published(run.uri)
    with running(open_account(run, request, concurrent)) as account:
        build_tuner(request, published, concurrent, searcher).fit()
        finish_search(run, request, published, concurrent, account)


def describe_size(request: SearchRequest, trials: str) -> str:
    """`trials` ("trials", "more trials") counted, or bounded by the budget."""
    if request.trials is None:
        return f"as many {trials} as a budget of {request.budget} allows"
    return f"{request.trials} {trials}" + (
        f" within a budget of {request.budget}" if request.budget else "")


def check_finished(run: RunDir, meta: dict[str, Any]) -> None:
    """--add-trials goes on from a finished search only: an interrupted one has trials that
    only --resume can finish."""
    rows = run.read_table(TRIALS_FILE).to_pylist() if run.exists(TRIALS_FILE) else []
    done = sum(row["status"] in result_keys.ENDED for row in rows)
    # trials is None while a search that only a budget ends runs (record_end sets it)
    if meta["trials"] is None or done < meta["trials"]:
        of = "" if meta["trials"] is None else f" of {meta['trials']}"
        raise UserError(f"--add-trials: {run.uri} was interrupted ({done}{of} trials "
                        f"finished); finish it first with `resnet-hpo search --name "
                        f"{meta['name']} --resume`")


def add_trials(request: SearchRequest) -> None:
    """`request.trials` more trials in a finished search, with the run's study: the sampler
    is conditioned on every trial already in it."""
    run = RunDir.open(request.run_uri)
    pull_journal(run)
    check_finished(run, run.read_json(SEARCH_FILE))
    if not journal_path(run).exists():
        raise UserError(f"--add-trials: {run.uri} has no {STUDY_FILE} (it was searched "
                        "before the study was kept in the run), so its sampler history "
                        "is lost; start a new search with --warm-start " + run.uri)
    check_journal(run)
    decoded, _ = decode_data(request)
    concurrent = start_cluster(request)
    storage = open_storage(run)
    study = open_study(storage, request.space)
    earlier = len(study.trials)
    close_orphans(study, set())  # none is running: the search finished
    meta = run.read_json(SEARCH_FILE)
    total = meta["trials"] + request.trials
    meta["added"] = [*meta.get("added", []), {
        "trials": request.trials, "after": meta["trials"], "command": request.command_line,
        "budget": None if request.budget is None else str(request.budget),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    meta["trials"] = total
    if meta.get("confirm"):  # its choice was among fewer trials: `best` ranks them all
        meta["added"][-1]["confirm_before"] = meta.pop("confirm")
        print("--add-trials: the confirm stage of the search before chose among its trials "
              "only; the best trial of all is handed over now", flush=True)
    run.write_json(SEARCH_FILE, meta)
    print(f"search {request.name}: {describe_size(request, 'more trials')}"
          f" after {total - request.trials}, sampler {request.space.sampler} with the "
          f"{earlier} trials of its study as history, {concurrent} at a time; results in "
          f"{run.uri}", flush=True)
    # Seeded past the trials before, so that added trials do not repeat the first draws.
    searcher = make_searcher(request, storage, request.seed + earlier, total)
    published = decoded.published(run.uri)
    with running(open_account(run, request, concurrent)) as account:
        build_tuner(request, published, concurrent, searcher).fit()
        finish_search(run, request, published, concurrent, account)


def resume_search(request: SearchRequest) -> None:
    """The interrupted search from Tune's saved state, its unfinished and failed trials
    continued."""
    run = RunDir.open(request.run_uri)
    pull_journal(run)
    if journal_path(run).exists():  # a search from before has none; Tune's state holds it
        check_journal(run)
    decoded, _ = decode_data(request)
    concurrent = start_cluster(request)  # Tune restores how many of its trials run at once
    from ray import tune

    if not tune.Tuner.can_restore(run.uri):
        raise UserError(f"--resume: {run.uri} has no Tune state to restore from")
    check_tune_state(run)
    if journal_path(run).exists():
        close_orphans(open_study(open_storage(run), request.space), saved_trial_ids(run))
    data = decoded.published(run.uri)
    tuner = tune.Tuner.restore(run.uri, trainable=build_trainable(request, data),
                               resume_unfinished=True, resume_errored=True)
    print(f"resuming {run.uri}", flush=True)
    with running(open_account(run, request, concurrent)) as account:
        tuner.fit()
        finish_search(run, request, data, concurrent, account)


def check_tune_state(run: RunDir) -> None:
    """Refuse Tune state that a kill cut off; mend the trial checkpoints it names."""
    problem = tune_state_problem(run)
    if problem:  # Tune would log it, then run a new search here
        raise UserError(f"--resume: {problem}: the search was killed while Ray Tune saved "
                        "its state, which it cannot restore; `resnet-hpo results` still "
                        "reads the finished trials; start the search again with another "
                        "--name")
    for line in mend_trial_checkpoints(run):  # trial folders as trial_dirname names them
        print(line, flush=True)


def finish_search(run: RunDir, request: SearchRequest, data: DecodedData, concurrent: int,
                  account: BudgetAccount | None) -> None:
    """Once a search, extension or resume has ended: its confirm stage (--confirm),
    search.json, then the summary. A search interrupted with Ctrl-C (Tune saves its state
    and returns) has trials still running: it is left as it is, for --resume."""
    search = SearchRun.open(run.uri)
    if account is not None:
        # the searcher may have started a trial that a kill then kept from ever running
        account.trial_ids &= {row["trial_id"] for row in search.trials}
        if interrupted(search.trials):
            account.save()
    if request.confirm and not interrupted(search.trials) and search.ranked:
        spent = 0.0 if account is None else account.spent
        gpu_hours = confirm_stage(search, request, data, concurrent)
        if account is not None:
            account.confirm_ran(spent, gpu_hours)
        search = SearchRun.open(run.uri)
    record_end(search, account)
    print_summary(search, account)


def confirm_stage(search: SearchRun, request: SearchRequest, data: DecodedData,
                  concurrent: int) -> float:
    """Train the run's best configs again (search/run/confirm.py), or finish doing so after a
    kill; search.json's "confirm" gets the plan first, then the outcome. Returns the
    GPU-hours the confirm runs took."""
    from ray import tune

    meta = dict(search.info)
    record = dict(meta["confirm"])
    if "trial_ids" in record:  # planned before a kill
        plan = ConfirmPlan.from_record(record)
    else:
        plan = ConfirmPlan.make(search, request.confirm, request.confirm_seeds,
                                request.space.scheduler.max_epochs)
    meta["confirm"] = record | plan.record()
    search.rundir.write_json(SEARCH_FILE, meta)
    confirm = RunDir.open(search.rundir.uri_of(CONFIRM_DIR))
    print(f"\nconfirm: the best {len(plan.trial_ids)} configs again for {plan.epochs} epochs "
          f"with seeds {', '.join(map(str, plan.seeds))} (no search trial used them); "
          f"results in {confirm.uri}", flush=True)
    if tune.Tuner.can_restore(confirm.uri) and tune_state_problem(confirm) is None:
        for line in mend_trial_checkpoints(confirm):
            print(line, flush=True)
        tuner = tune.Tuner.restore(confirm.uri, trainable=build_trainable(request, data),
                                   resume_unfinished=True, resume_errored=True)
    else:
        if confirm.exists():  # killed before Tune saved a whole state: start the runs over
            confirm.fs.delete_dir(confirm.path)
        tuner = build_confirm_tuner(request, data, concurrent, plan.configs(search), confirm)
    tuner.fit()
    rows = confirm.read_table(TRIALS_FILE).to_pylist()
    if interrupted(rows):  # Ctrl-C: --resume finishes it
        raise KeyboardInterrupt
    meta["confirm"] = meta["confirm"] | plan.outcome(search, rows)
    search.rundir.write_json(SEARCH_FILE, meta)
    return sum(row["gpu_hours"] or 0.0 for row in rows)


def interrupted(rows: list[dict[str, Any]]) -> bool:
    """Whether any trial of `rows` (trials.parquet) is still to run."""
    return any(row["status"] not in result_keys.ENDED for row in rows)


def stopped_early(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == result_keys.TERMINATED and r["stopped_early"]]


def record_end(search: SearchRun, account: BudgetAccount | None) -> None:
    """search.json once a search, extension or resume has ended: where a budget ended it,
    `trials` counts the trials the run has (fewer than asked for, or none asked for), and
    `budgets_spent` gets what this part's budget bought. A search interrupted with Ctrl-C
    (Tune saves its state and returns) has trials still running and is left as it is."""
    rows = search.trials
    if interrupted(rows):
        return
    meta = dict(search.info)
    last_part = [meta, *meta.get("added", [])][-1]
    if last_part.get("budget") is not None:
        meta["trials"] = len(rows)
    if account is not None:
        early = [r["trial_id"] for r in stopped_early(rows)]
        meta["budgets_spent"] = [*meta.get("budgets_spent", []), account.record(early)]
    search.rundir.write_json(SEARCH_FILE, meta)
    if account is not None:
        account.end()


def print_summary(search: SearchRun, account: BudgetAccount | None = None) -> None:
    """The summary of the run's trials; with a budget, what it bought."""
    run, rows = search.rundir, search.trials
    done = [r for r in rows if r["status"] == result_keys.TERMINATED]
    failed = [r for r in rows if r["status"] == result_keys.ERROR]
    early = stopped_early(rows)
    gpu_hours = sum(r["gpu_hours"] or 0.0 for r in rows)
    print(f"\n{len(rows)} trials: {len(done) - len(early)} ran all epochs, {len(early)} stopped "
          f"early, {len(failed)} failed; {gpu_hours:.2f} GPU-hours")
    if account is not None:
        print(account.summary_line(r["trial_id"] for r in early))
    if not search.ranked:
        raise UserError(f"no trial finished; see the error column of {run.uri_of(TRIALS_FILE)}")
    print("\n".join(best_trial_lines(search)))
    where = shlex.quote(run.uri)
    print(f"run directory: {run.uri}\nnext: resnet-hpo results {where}; "
          f"resnet-hpo best {where}")
