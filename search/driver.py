"""`resnet-hpo search`: a space file becomes an OptunaSearch + ASHA run on Ray Tune.

Everything the user gave is checked (space, data, resources, run name) before a trial
starts; the dataset is decoded once here, at the largest resolution the space allows, into
a file which every trial memory-maps: the trials of this node from the cache, those of other
nodes from a copy in the run's storage (RUN/data/KEY) that each node fetches once.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from search.rundir import SEARCH_FILE, STUDY_FILE, STUDY_NAME, TRIALS_FILE, RunDir
from search.study import (
    check_journal,
    close_orphans,
    journal_path,
    open_storage,
    open_study,
    pull_journal,
    startup_trials,
)
from search.study_search import StudySearch
from search.tune_state import mend_trial_checkpoints, saved_trial_ids, tune_state_problem
from search.warm_start import WarmStart, plan_warm_start
from spaces import DefineByRun, SearchSpace, load_space, parse_space
from trainable.data import Dataset, DecodedData, decode_dataset
from trainable.errors import UserError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
AUTOSCALER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # present on a `ray up` head


@dataclass(frozen=True)
class SearchRequest:
    """What `resnet-hpo search` was asked for, after the space file and the flags."""
    space: SearchSpace
    trials: int
    name: str
    storage: str
    gpus_per_trial: float
    cpus_per_trial: float
    max_concurrent: int | None
    max_failures: int
    address: str | None
    seed: int
    command_line: str  # as the user typed it, for search.json
    mode: str = "new"  # "new", "resume" (--resume) or "add" (--add-trials: `trials` more)
    warm_start: str | None = None  # an earlier run directory to start from (--warm-start)
    warm_start_top: int = 4  # how many of its best configs go first

    @property
    def run_uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only (no '/'), "
                        "so the run stays inside the storage directory")
    return name


def resolve_storage(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def make_sampler(name: str, seed: int, trials: int) -> Any:
    """The sampler of a search of `trials` trials (TPE and GP start with startup_trials
    random ones)."""
    import optuna

    if name == "tpe":  # constant_liar keeps parallel trials from sampling the same point
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(trials),
                                          multivariate=True, group=True, constant_liar=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(trials))
    return optuna.samplers.RandomSampler(seed=seed)


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


def start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(dashboard_host="127.0.0.1", log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as e:
        raise UserError(f"--address {address}: cannot join the Ray cluster ({e}); start it "
                        "with `ray start --head` or `ray up cluster.yaml`") from None


def node_capacity() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of the worker types a `ray up` cluster can still start, if any."""
    if not AUTOSCALER_CONFIG.exists():
        return []
    import yaml

    config = yaml.safe_load(AUTOSCALER_CONFIG.read_text()) or {}
    return [spec.get("resources", {}) for spec in config.get("available_node_types", {}).values()
            if spec.get("max_workers", 0) > 0]


def trials_that_fit(node: dict[str, float], cpus: float, gpus: float) -> int:
    limits = [math.floor(node.get("CPU", 0) / cpus + 1e-9)] if cpus else []
    if gpus:
        limits.append(math.floor(node.get("GPU", 0) / gpus + 1e-9))
    return min(limits) if limits else 1


def check_resources(request: SearchRequest) -> int:
    """Trials that can run at once now; one clear line when a trial fits on no node."""
    cpus, gpus = request.cpus_per_trial, request.gpus_per_trial
    if gpus > 1 and gpus != int(gpus):
        raise UserError(f"--gpus-per-trial {gpus:g}: use a fraction <= 1 or a whole number")
    nodes = node_capacity()
    fits = sum(trials_that_fit(node, cpus, gpus) for node in nodes)
    if fits:
        return fits
    if any(trials_that_fit(node, cpus, gpus) for node in autoscaler_node_types()):
        print("no node fits a trial yet; the autoscaler will start one", flush=True)
        return request.trials
    total_cpu = sum(node.get("CPU", 0) for node in nodes)
    total_gpu = sum(node.get("GPU", 0) for node in nodes)
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise UserError(
        f"--gpus-per-trial {gpus:g} --cpus-per-trial {cpus:g}: no node of the Ray cluster "
        f"has that much ({len(nodes)} node(s), {total_cpu:g} CPUs and {total_gpu:g} GPUs in "
        f"all; the largest has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} "
        "GPUs); lower the request" + (" or use --gpus-per-trial 0" if not total_gpu else ""))


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
            "seed": request.seed, "trials": request.trials, "space_file": space.source,
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


def build_tuner(request: SearchRequest, data: DecodedData, concurrent: int, searcher: Any
                ) -> Any:
    from ray import tune

    from search.progress import ProgressPrinter
    from search.results_writer import ResultsWriter
    from search.tensorboard_writer import TensorBoardWriter
    from trainable.ranking import objective_name

    space = request.space
    objective = objective_name(space.metric)
    callbacks = [
        ResultsWriter(request.run_uri, space.metric, space.mode, request.gpus_per_trial,
                      request.cpus_per_trial),
        TensorBoardWriter(request.run_uri, space.metric, space.params),
        ProgressPrinter(space.metric, [p.name for p in space.params], request.trials),
    ]
    return tune.Tuner(
        build_trainable(request, data),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=make_scheduler(space, objective),
            # max_concurrent_trials also sets how many trials Tune keeps pending; without it
            # a search algorithm gets one (TUNE_MAX_PENDING_TRIALS_PG=auto: Ray 2.60's
            # tune_controller._get_max_pending_trials), so fractional-GPU trials would start
            # one at a time. Tuner.restore keeps the original run's value.
            num_samples=request.trials, max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=request.name, storage_path=request.storage, callbacks=callbacks, verbose=0,
            # Every checkpoint holds the best epoch's weights so far: the latest is enough.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=request.max_failures)))


def check_finished(run: RunDir, meta: dict[str, Any]) -> None:
    """--add-trials goes on from a finished search only: an interrupted one has trials that
    only --resume can finish."""
    rows = run.read_table(TRIALS_FILE).to_pylist() if run.exists(TRIALS_FILE) else []
    done = sum(row["status"] in ("TERMINATED", "ERROR") for row in rows)
    if done < meta["trials"]:
        raise UserError(f"--add-trials: {run.uri} was interrupted ({done} of {meta['trials']} "
                        f"trials finished); finish it first with `resnet-hpo search --name "
                        f"{meta['name']} --resume`")


def check_run(run: RunDir, request: SearchRequest) -> WarmStart | None:
    """Everything about the run directory that can be wrong, checked before Ray starts or
    data is read; nothing in the run directory is written. Returns the warm start of a new
    search."""
    if request.mode == "new":
        if run.exists(SEARCH_FILE) or run.exists(TRIALS_FILE) or run.exists(STUDY_FILE):
            raise UserError(f"--name {request.name}: {run.uri} already holds a search; add "
                            "--resume to continue it, --add-trials N to extend it, or choose "
                            "another --name")
        if request.warm_start is None:
            return None
        return plan_warm_start(request.warm_start, request.space,
                               min(request.warm_start_top, request.trials))
    pull_journal(run)
    if request.mode == "add":
        check_finished(run, run.read_json(SEARCH_FILE))
        if not journal_path(run).exists():
            raise UserError(f"--add-trials: {run.uri} has no {STUDY_FILE} (it was searched "
                            "before the study was kept in the run), so its sampler history "
                            "is lost; start a new search with --warm-start " + run.uri)
    if journal_path(run).exists():  # a search from before has none; Tune's state holds it
        check_journal(run)
    return None


def run_search(request: SearchRequest) -> None:
    run = RunDir.open(request.run_uri)
    warm_start = check_run(run, request)
    cfg = request.space.config({})
    decoded = decode_dataset(cfg.data, request.space.decode_resolution, cfg.val_fraction)
    data = decoded.open()
    print(data.summary(), flush=True)
    start_ray(request.address)
    fits = check_resources(request)
    from ray import tune

    if request.mode == "resume":
        if not tune.Tuner.can_restore(run.uri):
            raise UserError(f"--resume: {run.uri} has no Tune state to restore from")
        problem = tune_state_problem(run)
        if problem:  # Tune would log it, then run a new search here
            raise UserError(f"--resume: {problem}: the search was killed while Ray Tune saved "
                            "its state, which it cannot restore; `resnet-hpo results` still "
                            "reads the finished trials; start the search again with another "
                            "--name")
        for line in mend_trial_checkpoints(run):  # trial folders as trial_dirname names them
            print(line, flush=True)
        if journal_path(run).exists():
            close_orphans(open_study(open_storage(run), request.space),
                          saved_trial_ids(run))
        trainable = build_trainable(request, decoded.published(run.uri))
        tuner = tune.Tuner.restore(run.uri, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        print(f"resuming {run.uri}", flush=True)
    else:
        tuner = new_tuner(run, request, data, decoded.published(run.uri), warm_start,
                          request.max_concurrent or fits)
    tuner.fit()
    print_summary(run)


def new_tuner(run: RunDir, request: SearchRequest, data: Dataset, shared: DecodedData,
              warm_start: WarmStart | None, concurrent: int) -> Any:
    """A Tuner for a new search, or for the trials --add-trials adds, with the run's study:
    the sampler is conditioned on every trial already in it."""
    from trainable.ranking import objective_name

    space = request.space
    if request.mode == "new":
        meta = search_metadata(request, data)
        if warm_start is not None:
            meta["warm_start"] = warm_start.record()
        run.write_json(SEARCH_FILE, meta)
        if run.local_path() is None:
            journal_path(run).unlink(missing_ok=True)  # the driver's copy of an earlier run's
    storage = open_storage(run)
    study = open_study(storage, space)
    earlier = len(study.trials)
    if request.mode == "add":
        close_orphans(study, set())  # none is running: the search finished
        meta = run.read_json(SEARCH_FILE)
        total = meta["trials"] + request.trials
        meta["added"] = [*meta.get("added", []), {
            "trials": request.trials, "after": meta["trials"], "command": request.command_line,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        meta["trials"] = total
        run.write_json(SEARCH_FILE, meta)
        print(f"search {request.name}: {request.trials} more trials after {total - request.trials}"
              f", sampler {space.sampler} with the {earlier} trials of its study as history, "
              f"{concurrent} at a time; results in {run.uri}", flush=True)
    else:
        total = request.trials
        if warm_start is not None:
            print(warm_start.summary(), flush=True)
            warm_start.apply(study)
        print(f"search {request.name}: {request.trials} trials, sampler {space.sampler}, "
              f"scheduler {space.scheduler.name}, {concurrent} at a time; results in "
              f"{run.uri}", flush=True)
    # Seeded past the trials before, so that added trials do not repeat the first draws.
    searcher = StudySearch(space=DefineByRun(space), metric=objective_name(space.metric),
                           mode=space.mode, storage=storage, study_name=STUDY_NAME,
                           sampler=make_sampler(space.sampler, request.seed + earlier, total))
    return build_tuner(request, shared, concurrent, searcher)


def print_summary(run: RunDir) -> None:
    from search.best import SearchRun, still_improving_note

    search = SearchRun.open(run.uri)
    rows = search.trials
    done = [r for r in rows if r["status"] == "TERMINATED"]
    failed = [r for r in rows if r["status"] == "ERROR"]
    early = [r for r in done if r["stopped_early"]]
    gpu_hours = sum(r["gpu_hours"] or 0.0 for r in rows)
    print(f"\n{len(rows)} trials: {len(done) - len(early)} ran all epochs, {len(early)} stopped "
          f"early, {len(failed)} failed; {gpu_hours:.2f} GPU-hours")
    if not search.ranked:
        raise UserError(f"no trial finished; see the error column of {run.uri_of(TRIALS_FILE)}")
    best = search.ranked[0]
    print(f"best trial {best['trial_id']}: {search.metric} {best['best_metric']:.4f} at "
          f"epoch {best['best_epoch']} of {best['epochs_run']}")
    note = still_improving_note(best)
    if note:
        print(note)
    for name in search.info["searched"]:
        value = best[name]
        print(f"  {name}: {value:.4g}" if isinstance(value, float) else f"  {name}: {value}")
    where = shlex.quote(run.uri)
    print(f"run directory: {run.uri}\nnext: resnet-hpo results {where}; "
          f"resnet-hpo best {where}")


def request_from_args(args: Any, fixed: dict[str, Any]) -> SearchRequest:
    space = load_space(args.space)
    scheduler = {k: v for k, v in (("name", args.scheduler), ("max_epochs", args.max_epochs))
                 if v is not None}
    space = space.replace(sampler=args.sampler, scheduler=scheduler, fixed=fixed)
    resources = space.resources

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else resources.get(key, default)

    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    if args.warm_start_top < 1:
        raise UserError(f"--warm-start-top must be >= 1, got {args.warm_start_top}")
    gpus, cpus = pick(args.gpus_per_trial, "gpus_per_trial", 0.0), pick(
        args.cpus_per_trial, "cpus_per_trial", 1.0)
    if gpus < 0 or cpus < 0 or (gpus == 0 and cpus == 0):
        raise UserError(f"--gpus-per-trial {gpus:g} --cpus-per-trial {cpus:g}: both must be "
                        ">= 0 and one of them > 0")
    max_concurrent = pick(args.max_concurrent, "max_concurrent", None)
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    return SearchRequest(
        space=space, trials=args.trials,
        name=check_name(args.name or time.strftime("search-%Y%m%d-%H%M%S")),
        storage=resolve_storage(args.storage), gpus_per_trial=float(gpus),
        cpus_per_trial=float(cpus), max_concurrent=max_concurrent,
        max_failures=args.max_failures, address=args.address, seed=args.seed or 0,
        command_line=args.command_line, warm_start=args.warm_start,
        warm_start_top=args.warm_start_top)


def continue_request(args: Any) -> SearchRequest:
    """--resume or --add-trials N: the request the search was started with, from its
    search.json; the space, data, sampler and seed stay as they were (Tune restores them on
    --resume; --add-trials samples the same space, its sampler seeded past the trials
    before)."""
    flag = "--resume" if args.resume else "--add-trials"
    if args.resume and args.add_trials is not None:
        raise UserError("--resume and --add-trials: give one; resume an interrupted search "
                        "first, then add trials")
    if args.space or args.warm_start:
        raise UserError(f"{flag} goes on with the search's own space and history; leave out "
                        f"{'--space' if args.space else '--warm-start'}")
    if args.add_trials is not None and args.add_trials < 1:
        raise UserError(f"--add-trials must be >= 1, got {args.add_trials}")
    if not args.name:
        raise UserError(f"{flag} needs --name NAME of the search to continue")
    name, storage = check_name(args.name), resolve_storage(args.storage)
    run = RunDir.open(f"{storage.rstrip('/')}/{name}")
    if not run.exists(SEARCH_FILE):
        raise UserError(f"{flag}: there is no search named {name!r} in {storage} "
                        f"({run.uri} holds no {SEARCH_FILE})")
    meta = run.read_json(SEARCH_FILE)
    space = parse_space(meta["space_text"], meta["space_file"]).replace(
        sampler=meta["sampler"], scheduler=meta["scheduler"], fixed=meta["fixed"])
    return SearchRequest(
        space=space, trials=meta["trials"] if args.resume else args.add_trials, name=name,
        storage=storage, gpus_per_trial=meta["gpus_per_trial"],
        cpus_per_trial=meta["cpus_per_trial"], max_concurrent=args.max_concurrent,
        max_failures=args.max_failures, address=args.address, seed=meta["seed"],
        command_line=meta["command"] if args.resume else args.command_line,
        mode="resume" if args.resume else "add")
