"""Search strategies replayed on recorded learning curves: thousands of searches in minutes,
enough paired seeds to tell strategies apart (the idea of LCBench, HPOBench and Syne Tune's
simulated backend), judged by the model each search hands over.

    python -m benchmarks.search_replay [--tables benchmarks/data] [--budgets 8,16,32,64]
        [--seeds 100] [--slots 2] [--strategies default,random+asha,...] [--workers 2]

A table (benchmarks/replay_table.py, recorded by benchmarks/replay_record.py) holds every
epoch's val_acc, test_acc and seconds of each configuration of a task's design, trained with
several seeds. A search is replayed as the driver runs it: the project's searcher
(search/run/study_search.py StudySearch, asked and told as Tune asks and tells it) with the
sampler the driver builds (search/sampling/samplers.py make_sampler) and the priors it
enqueues (search/sampling/priors.py); a sampled configuration is replayed as the nearest
recorded one, and each trial draws one recorded seed's curve (seeded by the search's seed),
so that a trial is as noisy as a real one. `slots` trials run at a time on a simulated clock
that advances by the recorded epoch times; ASHA decides as Ray's ASHAScheduler does (the
same rungs and cutoff, `Asha` below), on the running best the Tune adapter reports.

A search's outcome is what it hands over: the best trial by val_acc (as `resnet-hpo best`
picks it), retrained: the mean over the table's seeds of that configuration's test_acc at its
best epoch (`Table.handed_over`), on a split that no search selected on. Beside it: what the
search found (its best val_acc, which the winner's curse lifts) and the epochs it ran. With a
confirm stage (`+confirm`), the top K trials run again at full epochs with R other seeds, the
best mean val_acc is handed over, and those runs count in the search's trials.

Strategies (STRATEGIES below): `default` (what `resnet-hpo search` does with the task's
space: since 2026-12-07 random search with the recipes first), its variants (FIFO, another
reduction factor, a confirm stage), TPE (the default before, and with another startup or no
recipes), GP, random+asha and random+fifo (random search alone), `1-epoch-top-k` (every
configuration trained 1 epoch, the best quarter to the end: arXiv 2307.15422) and `recipe`
(TrainConfig's defaults, the guides' recipe, as one trial). Every strategy replays the same
seeds, so differences are paired: for each task and budget (trials) it prints each
strategy's mean handed-over test_acc, the paired mean difference to random+asha with its
standard error, the median best val_acc found, the mean winner's curse (found minus handed
over) and the median epochs spent. The last line says on how many tasks the default hands
over at least what random+asha does at every budget, and at twice its trials (the default at
N trials against random+asha at 2N), where "at least" means the paired mean difference plus
two standard errors is >= 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import statistics
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna

from benchmarks.replay_table import DATA_DIR, Curve, Table, read_table
from search.run.study_search import StudySearch
from search.sampling.priors import enqueue_priors, prior_params
from search.sampling.samplers import make_sampler
from spaces import DefineByRun, Scheduler, SearchSpace
from trainable.ranking import objective_name


class Asha:
    """Ray's ASHAScheduler with one bracket (resnet-hpo's): rungs at grace_period *
    reduction_factor**k below max_epochs; a trial reaching a rung first time is stopped when
    its value is below the (1 - 1/rf) percentile of those recorded there before it, and
    every trial stops at max_epochs. For mode max."""

    def __init__(self, scheduler: Scheduler):
        rf, grace = scheduler.reduction_factor, scheduler.grace_period
        count = int(np.log(scheduler.max_epochs / grace) / np.log(rf) + 1)
        self.rungs: list[tuple[float, dict[str, float]]] = [
            (grace * rf**k, {}) for k in reversed(range(count))]
        self.rf, self.max_epochs = rf, scheduler.max_epochs

    def stops(self, trial_id: str, epoch: int, value: float) -> bool:
        if epoch >= self.max_epochs:
            return True
        for milestone, recorded in self.rungs:
            if epoch < milestone or trial_id in recorded:
                continue
            stop = bool(recorded) and value < np.nanpercentile(list(recorded.values()),
                                                               (1 - 1 / self.rf) * 100)
            recorded[trial_id] = value
            return stop
        return False


@dataclass(frozen=True)
class Strategy:
    sampler: str | None = None  # a make_sampler name; None: the space's
    asha: bool = True
    priors: bool = True  # enqueue the recipes as the driver does (on a pretrained backbone)
    startup: Callable[[int], int] | None = None  # TPE's random trials of a search; None: ours
    grace_period: int | None = None  # ASHA's first rung; None: the space's
    reduction_factor: float | None = None
    confirm: int = 0  # top trials run again at full epochs
    confirm_seeds: int = 2  # ... with this many other seeds each

    def make_sampler(self, space_sampler: str, seed: int,
                     trials: int) -> optuna.samplers.BaseSampler:
        name = self.sampler or space_sampler
        if name == "tpe" and self.startup is not None:
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup(trials),
                                              multivariate=False, constant_liar=True)
        return make_sampler(name, seed, trials)

    def scheduler(self, scheduler: Scheduler) -> Scheduler:
        return dataclasses.replace(
            scheduler, grace_period=self.grace_period or scheduler.grace_period,
            reduction_factor=self.reduction_factor or scheduler.reduction_factor)

    def on_table(self, table: Table, trials: int, seed: int, slots: int) -> Outcome:
        return replay(TableRuns(table), table.space, table.data, self, trials, seed, slots)


def half_the_trials(trials: int) -> int:
    return max(2, trials // 2)


STRATEGIES: dict[str, Strategy] = {
    "default": Strategy(),
    "random+asha": Strategy("random", priors=False),
    "random+fifo": Strategy("random", asha=False, priors=False),
    "default-fifo": Strategy(asha=False),
    "default-rf-2": Strategy(reduction_factor=2),
    "default-rf-3": Strategy(reduction_factor=3),
    "tpe": Strategy("tpe"),
    "tpe-startup-half": Strategy("tpe", startup=half_the_trials),
    "tpe-no-priors": Strategy("tpe", priors=False),
    "gp": Strategy("gp"),
    "default+confirm-2": Strategy(confirm=2),
    "random+asha+confirm-2": Strategy("random", priors=False, confirm=2),
}
REFERENCE = "random+asha"


@dataclass(frozen=True)
class Outcome:
    handed_over: float  # test_acc of the configuration handed over, retrained
    found: float  # the best val_acc the search saw (NaN: every trial diverged)
    epochs: int
    seconds: float  # simulated wall time


def best_val(curve: Curve, epochs: int | None = None) -> float:
    """The best val_acc of a run's first `epochs` epochs (all: None); NaN if none scored."""
    values = curve.val_acc[:epochs]
    return float(np.nanmax(values)) if np.any(~np.isnan(values)) else float("nan")


class Run(Protocol):
    """One trial's training, epoch by epoch: recorded (`RecordedRun`) or real
    (benchmarks/replay_check.py)."""

    def epoch(self, index: int) -> float:
        """Start epoch `index` (0-based, in order); returns its seconds on the clock."""

    def value(self, index: int) -> float:
        """The val_acc of epoch `index` (NaN: the run diverged in it and ends there)."""

    def stop(self) -> None:
        """The run ends (stopped by the scheduler, or done)."""


class Runs(Protocol):
    """Where a search's runs come from: a table, or real training."""
    @property
    def num_classes(self) -> int: ...

    @property
    def seeds(self) -> int:
        """A trial trains with one of seeds 0..seeds-1, drawn."""

    def start(self, sampled: dict[str, Any], seed: int) -> Run: ...

    def handed_over(self, sampled: dict[str, Any]) -> float:
        """The configuration's test_acc retrained, the mean over seeds 0..seeds-1."""

    def full_runs(self, sampled: dict[str, Any], seeds: list[int]) -> list[Curve]:
        """Full runs of the configuration with these seeds (a confirm stage)."""


@dataclass
class RecordedRun:
    curve: Curve

    def epoch(self, index: int) -> float:
        return float(self.curve.epoch_time_s[index])

    def value(self, index: int) -> float:
        return float(self.curve.val_acc[index])

    def stop(self) -> None:
        pass


@dataclass
class TableRuns:
    """Runs read from a table: a sampled configuration is its nearest recorded one."""
    table: Table

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    @property
    def seeds(self) -> int:
        return self.table.seeds

    def start(self, sampled: dict[str, Any], seed: int) -> Run:
        return RecordedRun(self.table.runs[self.table.nearest(sampled)][seed])

    def handed_over(self, sampled: dict[str, Any]) -> float:
        return self.table.handed_over(self.table.nearest(sampled))

    def full_runs(self, sampled: dict[str, Any], seeds: list[int]) -> list[Curve]:
        runs = self.table.runs[self.table.nearest(sampled)]
        return [runs[s] for s in seeds]


def replay(runs: Runs, space: SearchSpace, data_source: str, strategy: Strategy, trials: int,
           seed: int, slots: int) -> Outcome:
    """One search of `trials` trials (a confirm stage's runs among them), `slots` at a time,
    as the driver runs it; what it hands over."""
    objective = objective_name(space.metric)
    search_trials = trials - strategy.confirm * strategy.confirm_seeds
    if search_trials < max(1, strategy.confirm):
        raise SystemExit(f"{trials} trials leave too few for a confirm stage of "
                         f"{strategy.confirm} x {strategy.confirm_seeds}")
    searcher = StudySearch(DefineByRun(space), objective, space.mode,
                           sampler=strategy.make_sampler(space.sampler, seed, search_trials))
    if strategy.priors:
        enqueue_priors(searcher.study, space, data_source)
    scheduler = strategy.scheduler(space.scheduler)
    asha = Asha(scheduler) if strategy.asha else None
    rng = np.random.default_rng([seed, 1])  # which seed each run trains with
    running: list[tuple[float, int, str, int]] = []  # (epoch end, order, trial, epoch index)
    sampled: dict[str, dict[str, Any]] = {}
    trained: dict[str, tuple[Run, int]] = {}  # trial -> (its run, its seed)
    bests: dict[str, float] = {}
    started = epochs = 0
    clock = 0.0

    def start(now: float) -> None:
        nonlocal started
        trial_id = f"{started:05d}"
        sampled[trial_id] = searcher.suggest(trial_id)
        train_seed = int(rng.integers(runs.seeds))
        trained[trial_id] = runs.start(sampled[trial_id], train_seed), train_seed
        bests[trial_id] = np.nan
        heapq.heappush(running, (now + trained[trial_id][0].epoch(0), started, trial_id, 0))
        started += 1

    for _ in range(min(slots, search_trials)):
        start(0.0)
    while running:
        clock, order, trial_id, i = heapq.heappop(running)
        run = trained[trial_id][0]
        value = run.value(i)
        epochs += 1
        bests[trial_id] = np.fmax(bests[trial_id], value)
        result = {"epoch": i + 1, objective: float(bests[trial_id])}
        ended = bool(np.isnan(value)) or i + 1 == scheduler.max_epochs
        if asha is not None and not np.isnan(value):
            ended = asha.stops(trial_id, i + 1, float(bests[trial_id])) or ended
        if ended:
            run.stop()
            searcher.on_trial_complete(trial_id, result)
            if started < search_trials:
                start(clock)
        else:
            searcher.on_trial_result(trial_id, result)
            heapq.heappush(running, (clock + run.epoch(i + 1), order, trial_id, i + 1))
    # the best trial by val_acc, the first of equals (trainable/ranking.py's rule)
    ranked = sorted((t for t in bests if not np.isnan(bests[t])), key=lambda t: -bests[t])
    if not ranked:
        return Outcome(1.0 / runs.num_classes, float("nan"), epochs, clock)
    handed = sampled[ranked[0]]
    if strategy.confirm:
        top = ranked[:strategy.confirm]
        handed, spent, seconds = confirm(runs, [sampled[t] for t in top],
                                         [trained[t][1] for t in top],
                                         strategy.confirm_seeds, rng, slots)
        epochs, clock = epochs + spent, clock + seconds
    return Outcome(runs.handed_over(handed), float(bests[ranked[0]]), epochs, clock)


def confirm(runs: Runs, candidates: list[dict[str, Any]], drawn: list[int], seeds: int,
            rng: np.random.Generator, slots: int) -> tuple[dict[str, Any], int, float]:
    """(the candidate with the best mean val_acc over `seeds` full runs with seeds other
    than the one its trial trained with, epochs spent, seconds on `slots`)."""
    means, epochs, seconds = [], 0, 0.0
    for config, seen in zip(candidates, drawn, strict=True):
        others = [s for s in range(runs.seeds) if s != seen]
        chosen = [int(s) for s in rng.choice(others, size=min(seeds, len(others)),
                                             replace=False)]
        curves = runs.full_runs(config, chosen)
        means.append(np.nanmean([best_val(c) for c in curves]) if curves else np.nan)
        epochs += sum(len(c.val_acc) for c in curves)
        seconds += sum(float(c.epoch_time_s.sum()) for c in curves)
    best = int(np.argmax(np.nan_to_num(means, nan=-np.inf)))
    return candidates[best], epochs, seconds / slots


class Recipe:
    """The guides' recipe as one trial: the first prior (TrainConfig's defaults)."""

    def on_table(self, table: Table, trials: int, seed: int, slots: int) -> Outcome:
        index = table.nearest(prior_params(table.space, table.data)[0])
        curve = table.runs[index][0]
        return Outcome(table.handed_over(index), best_val(curve), len(curve.val_acc),
                       float(curve.epoch_time_s.sum()))


class OneEpochTopK:
    """`trials` random configurations trained one epoch each, the best quarter (at least
    one) trained on to max_epochs (arXiv 2307.15422's baseline)."""

    def on_table(self, table: Table, trials: int, seed: int, slots: int) -> Outcome:
        study = optuna.create_study(sampler=make_sampler("random", seed, trials))
        define = DefineByRun(table.space)
        rng = np.random.default_rng([seed, 1])
        configs = [table.nearest(define(study.ask())) for _ in range(trials)]
        curves = [table.runs[c][int(rng.integers(len(table.runs[c])))] for c in configs]
        first = [np.nan_to_num(c.val_acc[0], nan=-1.0) for c in curves]
        kept = sorted(range(trials), key=lambda i: -first[i])[:max(1, trials // 4)]
        found = [np.nan_to_num(best_val(curves[i]), nan=-1.0) if i in kept else first[i]
                 for i in range(trials)]
        best = int(np.argmax(found))
        epochs = trials + sum(len(curves[i].val_acc) - 1 for i in kept)
        seconds = (sum(float(c.epoch_time_s[0]) for c in curves)
                   + sum(float(curves[i].epoch_time_s[1:].sum()) for i in kept)) / slots
        return Outcome(table.handed_over(configs[best]), float(found[best]), epochs, seconds)


class OnTable(Protocol):
    def on_table(self, table: Table, trials: int, seed: int, slots: int) -> Outcome: ...


# Every search the replay runs by name: the strategies, then two baselines that are not
# searches of the driver's kind.
SEARCHES: dict[str, OnTable] = {**STRATEGIES, "1-epoch-top-k": OneEpochTopK(),
                                "recipe": Recipe()}


def run_one(job: tuple[Path, str, int, int, int]) -> tuple[str, str, int, Outcome]:
    path, name, trials, seed, slots = job
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    table = cached_table(path)
    return table.task, name, trials, SEARCHES[name].on_table(table, trials, seed, slots)


@cache
def cached_table(path: Path) -> Table:
    return read_table(path)


Results = dict[tuple[str, str, int], list[Outcome]]


def paired(results: Results, task: str, name: str, budget: int, reference: str,
           reference_budget: int) -> tuple[float, float]:
    """(mean, standard error) over the seeds of name's handed-over test_acc minus the
    reference's at the same seed."""
    diffs = np.array([a.handed_over - b.handed_over for a, b in zip(
        results[task, name, budget], results[task, reference, reference_budget], strict=True)])
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs)))


def at_least(results: Results, task: str, budget: int, reference_budget: int) -> bool:
    mean, se = paired(results, task, "default", budget, REFERENCE, reference_budget)
    return mean + 2 * se >= 0


def print_report(results: Results, tasks: list[str], names: list[str], budgets: list[int],
                 seeds: int, write: Callable[[str], None] = print) -> None:
    for task in tasks:
        write(f"\n{task}: handed-over test_acc, mean of {seeds} seeds [paired difference "
              f"to {REFERENCE} +- standard error]; best val_acc found, median; winner's curse "
              "(found - handed over), mean; epochs, median")
        for budget in budgets:
            write(f"  {budget} trials")
            for name in names:
                outcomes = results[task, name, budget]
                handed = float(np.mean([o.handed_over for o in outcomes]))
                mean, se = paired(results, task, name, budget, REFERENCE, budget)
                found = float(np.nanmedian([o.found for o in outcomes]))
                curse = float(np.nanmean([o.found - o.handed_over for o in outcomes]))
                spent = statistics.median(o.epochs for o in outcomes)
                write(f"    {name:<22} {handed:.4f} [{mean:+.4f} +- {se:.4f}]  found "
                      f"{found:.4f}  curse {curse:+.4f}  epochs {spent:>5.0f}")
    write("\n" + verdict(results, tasks, budgets))


def verdict(results: Results, tasks: list[str], budgets: list[int]) -> str:
    every = sum(all(at_least(results, t, b, b) for b in budgets) for t in tasks)
    doubled = [b for b in budgets if 2 * b in budgets]
    twice = sum(bool(doubled) and all(at_least(results, t, b, 2 * b) for b in doubled)
                for t in tasks)
    return (f"handed-over: default >= {REFERENCE} at every budget on {every} of {len(tasks)} "
            f"tasks; >= {REFERENCE} at 2x trials on {twice} of {len(tasks)} tasks")


def table_paths(tables: Path) -> list[Path]:
    paths = sorted(tables.glob("*.parquet")) if tables.is_dir() else [tables]
    if not paths:
        raise SystemExit(f"--tables {tables}: no tables; record them with "
                         "benchmarks/replay_record.py")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default=str(DATA_DIR),
                        help="a directory of TASK.parquet tables, or one table")
    parser.add_argument("--budgets", default="8,16,32,64", help="trials, comma-separated")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--slots", type=int, default=2, help="trials running at a time")
    parser.add_argument("--strategies", default=",".join(SEARCHES))
    parser.add_argument("--workers", type=int, default=2, help="processes")
    args = parser.parse_args(argv)
    paths = table_paths(Path(args.tables))
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    names = args.strategies.split(",")
    unknown = [n for n in names if n not in SEARCHES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown[0]!r}; known: "
                         + ", ".join(SEARCHES))
    for required in ("default", REFERENCE):
        if required not in names:
            names.append(required)
    jobs = [(path, name, budget, seed, args.slots) for path in paths for name in names
            for budget in budgets for seed in range(args.seeds)]
    results: Results = {}
    tasks: list[str] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for task, name, budget, outcome in pool.map(run_one, jobs, chunksize=8):
            results.setdefault((task, name, budget), []).append(outcome)
            if task not in tasks:
                tasks.append(task)
    print(f"search replay: {len(jobs)} searches, {args.slots} trials at a time, seeds "
          f"0-{args.seeds - 1}; tables: " + ", ".join(str(p) for p in paths))
    print_report(results, tasks, names, budgets, args.seeds)


if __name__ == "__main__":
    main()
