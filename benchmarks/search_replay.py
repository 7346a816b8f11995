"""Search strategies replayed on recorded learning curves: thousands of searches in minutes,
enough seeds to tell strategies apart (the idea of LCBench, HPOBench and Syne Tune's
simulated backend).

    python benchmarks/search_replay.py [--tables benchmarks/data] [--budgets 8,16,32,64]
        [--seeds 50] [--slots 2] [--strategies default,random+asha,...] [--workers 2]

A table (benchmarks/replay_table.py, recorded by benchmarks/replay_record.py) holds every
epoch's val_acc and seconds of every configuration of a task's discretised space. A search is
replayed as the driver runs it: the project's searcher (search/study_search.py StudySearch,
asked and told as Tune asks and tells it) with the sampler the driver builds
(search/samplers.py make_sampler) and the priors it enqueues (search/priors.py); a sampled
configuration is snapped to the grid and its curve read from the table. `slots` trials run
at a time on a simulated clock that advances by the recorded epoch times; ASHA decides as
Ray's ASHAScheduler does (the same rungs and cutoff, `Asha` below), on the running best
the Tune adapter reports. A search's outcome is the best val_acc any of its epochs reached
(what its best trial holds) and the epochs it ran.

Strategies: `default` (what `resnet-hpo search` does with the task's space), the default
without its priors, random+fifo, random+asha, tpe+asha as shipped before 2026-12-05
(multivariate TPE, stopped trials told COMPLETE, no priors), `1-epoch-top-k` (every
configuration trained 1 epoch, the best quarter to the end: arXiv 2307.15422) and `recipe`
(TrainConfig's defaults, the guides' recipe, as one trial).
For each task and budget (trials) it prints the median and quartiles over the seeds of the
best val_acc and of the epochs spent. The last line says on how many tasks the default's
median best val_acc is >= random+asha's at every budget, and at twice its trials (the
default at N trials against random+asha at 2N, for every budget N whose 2N was replayed).
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import optuna

from benchmarks.replay_table import DATA_DIR, Table, read_table
from search.priors import enqueue_priors, prior_params
from search.samplers import make_sampler, startup_trials
from search.study_search import StudySearch
from spaces import DefineByRun, Scheduler
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


class CompleteTold(StudySearch):
    """The searcher as shipped before 2026-12-05: a trial ASHA stopped was told COMPLETE
    with its value at the rung, as Ray's OptunaSearch tells it."""

    def outcome(self, result: dict[str, Any], error: bool) -> optuna.trial.TrialState:
        state = super().outcome(result, error)
        if state == optuna.trial.TrialState.PRUNED and result.get(self.metric) is not None:
            return optuna.trial.TrialState.COMPLETE
        return state


def multivariate_tpe(seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """make_sampler's TPE as shipped before 2026-12-05."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(trials),
                                      multivariate=True, group=True, constant_liar=True)


@dataclass(frozen=True)
class Strategy:
    sampler: str | Callable[[int, int], optuna.samplers.BaseSampler] | None
    """a make_sampler name, a sampler of (seed, trials), or None: the space's"""
    asha: bool
    priors: bool
    searcher: type[StudySearch] = StudySearch

    def make_sampler(self, space_sampler: str, seed: int,
                     trials: int) -> optuna.samplers.BaseSampler:
        if callable(self.sampler):
            return self.sampler(seed, trials)
        return make_sampler(self.sampler or space_sampler, seed, trials)


STRATEGIES: dict[str, Strategy] = {
    "default": Strategy(None, asha=True, priors=True),
    "default-no-priors": Strategy(None, asha=True, priors=False),
    "random+fifo": Strategy("random", asha=False, priors=False),
    "random+asha": Strategy("random", asha=True, priors=False),
    "tpe+asha-before": Strategy(multivariate_tpe, asha=True, priors=False,
                                searcher=CompleteTold),
}
BASELINES = ("1-epoch-top-k", "recipe")


@dataclass(frozen=True)
class Outcome:
    best: float  # the best val_acc of any epoch run (NaN: every trial diverged)
    epochs: int
    seconds: float  # simulated wall time


def replay(table: Table, strategy: Strategy, trials: int, seed: int, slots: int) -> Outcome:
    space = table.space
    objective = objective_name(space.metric)
    searcher = strategy.searcher(
        DefineByRun(space), objective, space.mode,
        sampler=strategy.make_sampler(space.sampler, seed, trials))
    if strategy.priors:
        enqueue_priors(searcher.study, space, table.data)
    asha = Asha(space.scheduler) if strategy.asha else None
    running: list[tuple[float, int, str, int]] = []  # (epoch end, order, trial, epoch index)
    curves, bests = {}, {}
    started = epochs = 0
    best, clock = -np.inf, 0.0

    def start(now: float) -> None:
        nonlocal started
        trial_id = f"{started:05d}"
        curves[trial_id] = table.curves[table.config_of(searcher.suggest(trial_id))]
        bests[trial_id] = np.nan
        heapq.heappush(running, (now + curves[trial_id].epoch_time_s[0], started, trial_id, 0))
        started += 1

    for _ in range(min(slots, trials)):
        start(0.0)
    while running:
        clock, order, trial_id, i = heapq.heappop(running)
        curve, epochs = curves[trial_id], epochs + 1
        value = curve.val_acc[i]
        bests[trial_id] = np.fmax(bests[trial_id], value)
        best = np.fmax(best, value)
        result = {"epoch": i + 1, objective: float(bests[trial_id])}
        ended = i + 1 == len(curve.val_acc)  # its last epoch, or diverged in it
        if asha is not None and not np.isnan(value):
            ended = asha.stops(trial_id, i + 1, float(bests[trial_id])) or ended
        if ended:
            searcher.on_trial_complete(trial_id, result)
            if started < trials:
                start(clock)
        else:
            searcher.on_trial_result(trial_id, result)
            heapq.heappush(running, (clock + curve.epoch_time_s[i + 1], order, trial_id, i + 1))
    return Outcome(float(best), epochs, clock)


def recipe(table: Table) -> Outcome:
    """The guides' recipe as one trial: the first prior (TrainConfig's defaults) snapped to
    the grid."""
    curve = table.curves[table.config_of(prior_params(table.space, table.data)[0])]
    return Outcome(float(np.nanmax(curve.val_acc)), len(curve.val_acc),
                   float(curve.epoch_time_s.sum()))


def top_k(table: Table, trials: int, seed: int, slots: int) -> Outcome:
    """`trials` random configurations trained one epoch each, the best quarter (at least
    one) trained on to max_epochs (arXiv 2307.15422's baseline)."""
    study = optuna.create_study(sampler=make_sampler("random", seed, trials))
    define = DefineByRun(table.space)
    curves = [table.curves[table.config_of(define(study.ask()))] for _ in range(trials)]
    first = [c.val_acc[0] for c in curves]
    kept = sorted(range(trials), key=lambda i: -np.nan_to_num(first[i], nan=-1.0))
    kept = kept[:max(1, trials // 4)]
    best = max(np.nanmax(curves[i].val_acc) if i in kept else np.nan_to_num(first[i], nan=-1.0)
               for i in range(trials))
    epochs = trials + sum(len(curves[i].val_acc) - 1 for i in kept)
    seconds = (sum(float(c.epoch_time_s[0]) for c in curves)
               + sum(float(curves[i].epoch_time_s[1:].sum()) for i in kept)) / slots
    return Outcome(float(best), epochs, seconds)


def run_one(job: tuple[Path, str, int, int, int]) -> tuple[str, str, int, Outcome]:
    path, name, trials, seed, slots = job
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    table = cached_table(path)
    if name == "recipe":
        outcome = recipe(table)
    elif name == "1-epoch-top-k":
        outcome = top_k(table, trials, seed, slots)
    else:
        outcome = replay(table, STRATEGIES[name], trials, seed, slots)
    return table.task, name, trials, outcome


_tables: dict[Path, Table] = {}


def cached_table(path: Path) -> Table:
    if path not in _tables:
        _tables[path] = read_table(path)
    return _tables[path]


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q = np.nanpercentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


Results = dict[tuple[str, str, int], list[Outcome]]


def print_report(results: Results, tasks: list[str], names: list[str], budgets: list[int],
                 seeds: int, write: Callable[[str], None] = print) -> None:
    for task in tasks:
        write(f"\n{task}: best val_acc [epochs spent], median (quartiles) of {seeds} seeds")
        write(f"  {'strategy':<16}" + "".join(f" {f'{b} trials':>26}" for b in budgets))
        for name in names:
            cells = []
            for budget in budgets:
                outcomes = results[task, name, budget]
                acc = quartiles([o.best for o in outcomes])
                spent = statistics.median(o.epochs for o in outcomes)
                cells.append(f"{acc[1]:.3f} ({acc[0]:.3f}-{acc[2]:.3f}) [{spent:>4.0f}]")
            write(f"  {name:<16}" + "".join(f" {c:>26}" for c in cells))
    write("\n" + verdict(results, tasks, budgets))


def median_best(results: Results, task: str, name: str, budget: int) -> float:
    return quartiles([o.best for o in results[task, name, budget]])[1]


def verdict(results: Results, tasks: list[str], budgets: list[int]) -> str:
    equal = sum(all(median_best(results, t, "default", b)
                    >= median_best(results, t, "random+asha", b) for b in budgets)
                for t in tasks)
    doubled = [b for b in budgets if 2 * b in budgets]
    twice = sum(bool(doubled) and all(median_best(results, t, "default", b)
                                      >= median_best(results, t, "random+asha", 2 * b)
                                      for b in doubled) for t in tasks)
    return (f"default >= random+asha at every budget on {equal} of {len(tasks)} tasks; "
            f">= random+asha at 2x trials on {twice} of {len(tasks)} tasks")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default=str(DATA_DIR),
                        help="a directory of TASK.parquet tables, or one table")
    parser.add_argument("--budgets", default="8,16,32,64", help="trials, comma-separated")
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--slots", type=int, default=2, help="trials running at a time")
    parser.add_argument("--strategies", default=",".join([*STRATEGIES, *BASELINES]))
    parser.add_argument("--workers", type=int, default=2, help="processes")
    args = parser.parse_args(argv)
    tables = Path(args.tables)
    paths = sorted(tables.glob("*.parquet")) if tables.is_dir() else [tables]
    if not paths:
        raise SystemExit(f"--tables {tables}: no tables; record them with "
                         "benchmarks/replay_record.py")
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    names = args.strategies.split(",")
    unknown = [n for n in names if n not in STRATEGIES and n not in BASELINES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown[0]!r}; known: "
                         + ", ".join([*STRATEGIES, *BASELINES]))
    for required in ("default", "random+asha"):
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
