"""The replay checked against real training: the searches of benchmarks/search_replay.py (its
loop, the project's searcher, samplers, priors and ASHA, the same slots and seeds) once on a
task's table and once with every run a real `trainable.fit` of the sampled configuration as
the sampler drew it (not snapped to the table), no Ray.

    python -m benchmarks.replay_check [--tasks digits_hard,transfer] [--seeds 25]
        [--trials 10] [--strategies default,random+asha] [--tables benchmarks/data]
        [--workers 2]

A real trial trains with the seed its replayed twin draws, one epoch each time the search
asks for it (ASHA's stop ends its fit), in a thread of its own so that the slots train side by
side; the simulated clock advances by the table's epoch times in both, so that both searches
see their trials end in the same order. What a real search hands over is its best trial's
configuration retrained with the table's seeds (0..S-1) and scored as `resnet-hpo train`
scores it: the test_acc of each run's best epoch by val_acc, averaged.

For each task and strategy it prints the median handed-over test_acc and best val_acc found,
predicted (replay) and measured (real), the replay's paired bias (replay - real handed-over,
seed by seed: a median of 25 seeds moves by about 0.02 between samples, so its error shows
here first), and the paired mean difference of the first strategy to the second with its
standard error in each. The last line says on how many tasks the
predicted medians are within 0.01 of the measured ones and the paired differences have the
same sign.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from benchmarks import replay_record
from benchmarks.replay_table import (
    DATA_DIR,
    Curve,
    Table,
    config_of,
    read_table,
    retrained_score,
)
from benchmarks.search_replay import STRATEGIES, Outcome, Runs, TableRuns, replay
from trainable import Dataset, TrainingDiverged, configure_torch, fit
from trainable.device_images import DeviceImages
from trainable.runtime import Runtime
from trainable.train import evaluate

TOLERANCE = 0.01


class Stopped(Exception):
    """The search stopped a live run before its last epoch."""


class LiveRun:
    """A fit in a thread of its own that trains one epoch each time the search asks for one.
    The epochs another run of the same configuration and seed already trained are its
    values without training them again (`fit` on the CPU is deterministic under its seed);
    a run that needs more trains from the start, its first epochs not reported twice."""

    def __init__(self, runs: LiveRuns, sampled: dict[str, Any], seed: int):
        self.runs, self.sampled, self.seed = runs, sampled, seed
        self.key = (*config_of(runs.table.space, sampled), seed)
        self.trained = list(runs.live.get(self.key, []))
        self.known = len(self.trained)
        self.times = runs.table.runs[runs.table.nearest(sampled)][seed].epoch_time_s
        self.asks: queue.Queue[bool] = queue.Queue()
        self.values: queue.Queue[float] = queue.Queue()
        self.thread: threading.Thread | None = None

    def train(self) -> None:
        reported = 0

        def report(metrics: dict[str, float], _: object) -> None:
            nonlocal reported
            reported += 1
            if reported <= self.known:
                return
            self.values.put(metrics["val_acc"])
            if not self.asks.get():
                raise Stopped

        try:
            fit(self.runs.config(self.sampled, self.seed), report, data=self.runs.data,
                device="cpu")
        except Stopped:
            pass
        except TrainingDiverged:
            self.values.put(math.nan)

    def epoch(self, index: int) -> float:
        if index >= self.known:
            if self.thread is None:
                self.thread = threading.Thread(target=self.train, daemon=True)
                self.thread.start()
            elif index:
                self.asks.put(True)
        return float(self.times[min(index, len(self.times) - 1)])

    def value(self, index: int) -> float:
        if index >= len(self.trained):
            self.trained.append(self.values.get())
        return self.trained[index]

    def stop(self) -> None:
        if self.thread is not None:
            self.asks.put(False)
            self.thread.join()
        if len(self.trained) > len(self.runs.live.get(self.key, [])):
            self.runs.live[self.key] = self.trained


class LiveRuns(TableRuns):
    """Real runs of a task: fit on its data, the table giving only the clock's epoch times.
    Full runs (a retrain, a confirm stage) are kept by configuration and seed."""

    def __init__(self, table: Table, data: Dataset, fixed: dict[str, Any], workers: int):
        super().__init__(table)
        self.data, self.fixed = data, fixed
        self.pool = ThreadPoolExecutor(workers)
        self.full: dict[tuple[Any, ...], Curve] = {}
        self.live: dict[tuple[Any, ...], list[float]] = {}  # val_acc by epoch, trained so far

    def config(self, sampled: dict[str, Any], seed: int) -> Any:
        return self.table.space.config({**self.fixed, **sampled, "seed": seed})

    def start(self, sampled: dict[str, Any], seed: int) -> LiveRun:
        return LiveRun(self, sampled, seed)

    def full_runs(self, sampled: dict[str, Any], seeds: list[int]) -> list[Curve]:
        keys = [(*config_of(self.table.space, sampled), seed) for seed in seeds]
        missing = [(key, seed) for key, seed in zip(keys, seeds, strict=True)
                   if key not in self.full]
        for (key, _), curve in zip(missing, self.pool.map(
                lambda job: self.full_run(sampled, job[1]), missing), strict=True):
            self.full[key] = curve
        return [self.full[key] for key in keys]

    def full_run(self, sampled: dict[str, Any], seed: int) -> Curve:
        cfg = self.config(sampled, seed)
        rt = Runtime.for_config(cfg, "cpu")
        assert self.data.test is not None
        test = DeviceImages(self.data.test, rt.device)
        rows: list[tuple[float, float, float]] = []

        def report(metrics: dict[str, float], _: object) -> None:
            rows.append((metrics["val_acc"], metrics["test_acc"], metrics["epoch_time_s"]))

        try:
            fit(cfg, report, data=self.data, device="cpu",
                extra_metrics=lambda m: {"test_acc": evaluate(m, test, rt,
                                                              cfg.eval_batch_size)[1]})
        except TrainingDiverged:
            rows.append((math.nan, math.nan, 0.0))
        return Curve(*(np.array([r[k] for r in rows]) for k in range(3)))

    def handed_over(self, sampled: dict[str, Any]) -> float:
        return retrained_score(self.full_runs(sampled, list(range(self.seeds))),
                              self.num_classes)


def paired(a: list[Outcome], b: list[Outcome]) -> tuple[float, float]:
    diffs = np.array([x.handed_over - y.handed_over for x, y in zip(a, b, strict=True)])
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs)))


def check_task(name: str, table: Table, live: LiveRuns, args: argparse.Namespace,
               strategies: list[str]) -> bool:
    kinds: dict[str, Runs] = {"replay": TableRuns(table), "real": live}
    outcomes: dict[tuple[str, str], list[Outcome]] = {}
    for seed in range(args.seeds):
        for strategy in strategies:
            for kind, runs in kinds.items():
                outcome = replay(runs, table.space, table.data, STRATEGIES[strategy],
                                 args.trials, seed, args.slots)
                outcomes.setdefault((strategy, kind), []).append(outcome)
            print(f"  {name} seed {seed:>3} {strategy:<14} handed over "
                  + "  ".join(f"{kind} {outcomes[strategy, kind][-1].handed_over:.4f}"
                              for kind in kinds), flush=True)
    print(f"\n{name}: {args.seeds} paired seeds, {args.trials} trials, {args.slots} slots")
    print(f"  {'strategy':<14} {'handed over':>24} {'found':>24}")
    print(f"  {'':<14} {'predicted':>12}{'measured':>12} {'predicted':>12}{'measured':>12}")
    close = True
    for strategy in strategies:
        cells = []
        for field in ("handed_over", "found"):
            medians = [float(np.nanmedian([getattr(o, field) for o in outcomes[strategy, kind]]))
                       for kind in kinds]
            close &= abs(medians[0] - medians[1]) <= TOLERANCE
            cells.append(f"{medians[0]:>12.4f}{medians[1]:>12.4f}")
        print(f"  {strategy:<14} " + " ".join(cells))
    for strategy in strategies:  # the replay's bias, seed by seed
        bias, se = paired(outcomes[strategy, "replay"], outcomes[strategy, "real"])
        print(f"  {strategy}: replay - real, handed over, paired = {bias:+.4f} +- {se:.4f}")
    first, second = strategies[:2]
    signs = []
    for kind in kinds:
        mean, se = paired(outcomes[first, kind], outcomes[second, kind])
        signs.append(np.sign(mean))
        print(f"  {kind}: {first} - {second} = {mean:+.4f} +- {se:.4f}")
    return close and signs[0] == signs[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits_hard,transfer")
    parser.add_argument("--tables", default=str(DATA_DIR), help="the tables' directory")
    parser.add_argument("--seeds", type=int, default=25, help="paired search seeds")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--strategies", default="default,random+asha",
                        help="two or more; the first two are compared")
    parser.add_argument("--workers", type=int, default=2, help="threads for full runs")
    parser.add_argument("--backbone", type=Path, default=None,
                        help="the transfer tasks' backbone, as benchmarks/replay_record.py "
                             "takes it (the tables' own, to check them)")
    args = parser.parse_args(argv)
    tasks, strategies = args.tasks.split(","), args.strategies.split(",")
    for task in tasks:
        if task not in replay_record.TASKS:
            raise SystemExit(f"--tasks: unknown {task!r}; known: "
                             + ", ".join(replay_record.TASKS))
    if len(strategies) < 2 or any(s not in STRATEGIES for s in strategies):
        raise SystemExit("--strategies: two or more of " + ", ".join(STRATEGIES))
    configure_torch()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    agree = 0
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-check-") as tmp:
        os.environ["RESNET_HPO_CACHE"] = str(Path(tmp) / "cache")
        backbone = None
        for name in tasks:
            task = replay_record.TASKS[name]
            table = read_table(Path(args.tables) / f"{name}.parquet")
            if task.backbone and backbone is None:
                backbone = replay_record.source_backbone(args.backbone or Path(tmp) / "backbone",
                                                         replay_record.SOURCE_EPOCHS)
            fixed = {"weights": backbone} if task.backbone else {}
            live = LiveRuns(table, task.data(table.space), fixed, args.workers)
            agree += check_task(name, table, live, args, strategies)
    print(f"\nreplay within {TOLERANCE} of real training, same sign of the paired "
          f"difference: {agree} of {len(tasks)} tasks")


if __name__ == "__main__":
    main()
