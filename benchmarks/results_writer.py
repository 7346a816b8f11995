"""Bookkeeping of the search driver: whether `search.record.results_writer.ResultsWriter`, the Tune
callback that keeps trials.parquet and epochs.parquet current, costs the same per result at
the end of a long search as at its start, and how much of the driver's time its flushes take.

    python -m benchmarks.results_writer [--trials 1000] [--epochs 30] [--concurrent 4]
        [--window 1000] [--repeats 1]

No Ray cluster: the real callback class is driven by hand, in the order Tune's driver calls
it, with fake trials (trial_id, config as the `quick` space samples it, last_result, status,
no checkpoint to restore) into a temporary run directory: setup(); then every loop of the
driver calls on_step_begin(iteration, trials), on_trial_start for the trials it starts into
free slots (`--concurrent` running at once), and one running trial (picked at random)
reports an epoch: on_trial_result with the keys a real trial reports
(trainable/tune_adapter.py, plus Tune's own: time_total_s, training_iteration, config, ...)
and on_checkpoint, after its last epoch on_trial_complete; then on_step_end(iteration,
trials). After the last loop, on_experiment_end. Every trial runs all its epochs (no early
stopping).

The writer flushes (rewrites both files whole) once in the first on_step_begin, from
on_step_end at most every `search.record.results_writer.FLUSH_EVERY_S` seconds when something
changed, and at on_experiment_end. FLUSH_EVERY_S is set to infinity for the replay, so that
no time-based flush lands in the per-result timings at random; a flush is timed apart, at
the search's final size.

On a shared machine the load changes between the first and the last window (seconds apart
by default), and that alone moves a per-result time of some microseconds by tens of
percent. So the first window is measured twice: at the start of the search, and again
alongside the last window: while the search reports its last `--window` results, a fresh
writer (a new search in its own run directory) replays its own first ones, one result of
each in turn, both under the same load.

It prints, per repeat and then over the repeats:
  per result   the median wall time of on_trial_result + on_checkpoint over a window of
               `--window` results (microseconds): the search's first and last windows, and
               the fresh writer's first window taken alongside the last (and, as a check
               that the two writers measure alike, alongside the first). The median of 1,000
               timings is robust to the odd preemption or garbage collection, so one repeat
               is enough;
  final flush  one flush of the whole search after on_experiment_end (`--trials` x
               `--epochs` epoch rows; median of 5), in ms, and what it means for the driver:
               at most one flush per FLUSH_EVERY_S, so flushes take at most (flush time /
               FLUSH_EVERY_S) of the driver's time at the search's final size, and less
               while the search is smaller (a flush grows with the rows written).
The last line is `growth: X.XX`: the last window's per-result cost over the first window's
measured alongside it (the median over repeats), about 1 when the per-result bookkeeping
does not grow with the search (flushes excluded). The line before it gives the plain ratio
of the search's own last and first windows, which includes any change of load.

Unlike the other benchmarks, this one imports `search` (and so Ray and pyarrow): it needs
the project's full environment, not a plain copy of the repository.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import search.record.results_writer as results_writer
from search.record.results_writer import ResultsWriter
from search.rundir import EPOCHS_FILE, TRIALS_FILE, RunDir

METRIC, MODE = "val_acc", "max"
FINAL_FLUSHES = 5
# What the `quick` space fixes for every trial (spaces/quick.yaml), plus the data source.
FIXED = {"data": "digits", "resolution": 32, "weights": "none", "unfreeze_depth": 5,
         "batch_size": 64, "amp": "auto"}


class Search:
    """One ResultsWriter driven through a search in a run directory, one result at a time."""

    def __init__(self, run_uri: str, trials: int, epochs: int, concurrent: int, seed: int):
        self.run_uri, self.total, self.epochs, self.concurrent = run_uri, trials, epochs, concurrent
        self.rng = random.Random(seed)
        self.writer = ResultsWriter(run_uri, METRIC, MODE, gpu_fraction=0.25, cpu_count=4.0)
        self.writer.setup()
        # Fakes in place of Tune's Trial and Checkpoint: typed Any for the callback's signatures.
        self.trials: list[Any] = []  # every trial created so far, as Tune passes them
        self.running: list[Any] = []
        self.reported: dict[str, list[dict[str, Any]]] = {}  # running trial -> its rows
        self.iteration = 0
        self.per_result_s: list[float] = []  # in the order of the results

    @property
    def done(self) -> bool:
        return not self.running and len(self.trials) == self.total

    def step(self) -> None:
        """One loop of Tune's driver: on_step_begin, start trials into free slots, one
        running trial's result (on_trial_result, on_checkpoint, and on_trial_complete after
        its last epoch), on_step_end. Times the result."""
        writer = self.writer
        writer.on_step_begin(self.iteration, self.trials)
        while len(self.running) < self.concurrent and len(self.trials) < self.total:
            trial: Any = make_trial(len(self.trials), self.epochs, self.rng)
            self.trials.append(trial)
            self.running.append(trial)
            self.reported[trial.trial_id] = []
            trial.status = "RUNNING"
            writer.on_trial_start(self.iteration, self.trials, trial)
        trial = self.rng.choice(self.running)
        rows = self.reported[trial.trial_id]
        result = epoch_result(trial, rows, self.rng)
        checkpoint: Any = SimpleNamespace(
            path=f"{self.run_uri}/{trial.dirname}/checkpoint_{len(rows) - 1:06d}")
        start = time.perf_counter()
        writer.on_trial_result(self.iteration, self.trials, trial, result)
        writer.on_checkpoint(self.iteration, self.trials, trial, checkpoint)
        self.per_result_s.append(time.perf_counter() - start)
        trial.last_result = result  # Tune updates it after the callbacks
        if len(rows) == self.epochs:
            trial.status = "TERMINATED"
            self.running.remove(trial)
            writer.on_trial_complete(self.iteration, self.trials, trial)
            del self.reported[trial.trial_id]
        writer.on_step_end(self.iteration, self.trials)
        self.iteration += 1


@dataclass
class Replay:
    """The timings of one replay (microseconds per result: medians over a window)."""
    first_us: float  # the search's first window
    last_us: float  # the search's last window
    fresh_first_us: float  # a fresh writer's first window, alongside the search's first
    fresh_last_us: float  # a fresh writer's first window, alongside the search's last
    final_flush_s: list[float]

    @property
    def growth(self) -> float:
        return self.last_us / self.fresh_last_us


def median_us(timings: list[float]) -> float:
    return statistics.median(timings) * 1e6


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = args.trials * args.epochs
    window = min(args.window, results // 2)
    flush_every_s = results_writer.FLUSH_EVERY_S
    results_writer.FLUSH_EVERY_S = math.inf
    print(f"results writer: {args.trials} trials x {args.epochs} epochs = {results} results, "
          f"{args.concurrent} running at once, windows of the first and last {window} results, "
          f"{args.repeats} repeats, wall clock (time.perf_counter); "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"FLUSH_EVERY_S = inf during the replay (the search's is {flush_every_s:g} s): no "
          "time-based flushes; the files are written in the first on_step_begin and at "
          "on_experiment_end, and a flush is timed apart")
    replays = []
    for repeat in range(args.repeats):
        replay = run_replay(args, window, seed=repeat)
        replays.append(replay)
        print(f"  repeat {repeat + 1}: per result (median) first {replay.first_us:.1f} us, "
              f"last {replay.last_us:.1f} us; fresh writer alongside them "
              f"{replay.fresh_first_us:.1f} us, {replay.fresh_last_us:.1f} us; final flush "
              f"{statistics.median(replay.final_flush_s) * 1e3:.1f} ms", flush=True)
    report(replays, window, args, flush_every_s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every trial")
    parser.add_argument("--concurrent", type=int, default=4, help="trials running at once")
    parser.add_argument("--window", type=int, default=1000,
                        help="results in each of the first and last windows (at most half of "
                        "all results)")
    parser.add_argument("--repeats", type=int, default=1, help="replay this many times")
    args = parser.parse_args(argv)
    for name in ("trials", "epochs", "concurrent", "window", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.trials * args.epochs < 2:
        parser.error("--trials x --epochs must be at least 2 (two windows)")
    return args


def run_replay(args: argparse.Namespace, window: int, seed: int) -> Replay:
    """Drive a fresh ResultsWriter through a whole search into a temporary run directory,
    with a second fresh one alongside its first and its last window."""
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-bench-") as tmp:
        search = Search(f"{tmp}/run", args.trials, args.epochs, args.concurrent, seed)
        total = args.trials * args.epochs
        fresh: dict[str, Search] = {}
        gc.collect()
        while not search.done:
            index = len(search.per_result_s)
            search.step()
            for name, begins in (("first", 0), ("last", total - window)):
                if begins <= index < begins + window:
                    if name not in fresh:  # as many trials as its window needs, at most
                        fresh[name] = Search(f"{tmp}/fresh-{name}", math.ceil(window / args.epochs)
                                             + args.concurrent, args.epochs, args.concurrent,
                                             seed + 1000)
                    fresh[name].step()
        search.writer.on_experiment_end(search.trials)
        check_files(search.run_uri, args.trials, args.epochs)
        final_flush_s = []
        for _ in range(FINAL_FLUSHES):
            start = time.perf_counter()
            search.writer.flush()
            final_flush_s.append(time.perf_counter() - start)
    timings = search.per_result_s
    return Replay(median_us(timings[:window]), median_us(timings[-window:]),
                  median_us(fresh["first"].per_result_s), median_us(fresh["last"].per_result_s),
                  final_flush_s)


def check_files(run_uri: str, trials: int, epochs: int) -> None:
    """The files on_experiment_end wrote hold every trial, finished, and every epoch."""
    run = RunDir.open(run_uri)
    epoch_rows = run.read_table(EPOCHS_FILE).num_rows
    trial_table = run.read_table(TRIALS_FILE)
    if epoch_rows != trials * epochs or trial_table.num_rows != trials:
        raise SystemExit(f"the writer wrote {epoch_rows} epoch rows and {trial_table.num_rows} "
                         f"trials, expected {trials * epochs} and {trials}")
    statuses = set(trial_table.column("status").to_pylist())
    if statuses != {"TERMINATED"}:
        raise SystemExit(f"trial statuses {sorted(statuses)}, expected TERMINATED only")


def make_trial(index: int, epochs: int, rng: random.Random) -> SimpleNamespace:
    """A trial as the callback sees it: a config as the `quick` space samples it."""
    config = {**FIXED, "epochs": epochs,
              "lr": math.exp(rng.uniform(math.log(0.01), math.log(0.3))),
              "weight_decay": math.exp(rng.uniform(math.log(1e-6), math.log(1e-3))),
              "label_smoothing": rng.uniform(0.0, 0.2), "warmup_epochs": rng.uniform(0.0, 1.0),
              "flip": rng.choice(["horizontal", "none"]),
              "crop": rng.choice(["pad", "resized", "none"])}
    trial_id = f"5e1f0_{index:05d}"
    return SimpleNamespace(trial_id=trial_id, config=config, last_result={}, checkpoint=None,
                           latest_checkpoint_result=None, status="PENDING", error_file=None,
                           dirname=f"trial_{trial_id}", started=time.time())


def epoch_result(trial: SimpleNamespace, rows: list[dict[str, Any]],
                 rng: random.Random) -> dict[str, Any]:
    """The next epoch's result: what train_trial reports, with the keys Tune adds."""
    epoch = len(rows) + 1
    epochs = trial.config["epochs"]
    progress = epoch / epochs
    epoch_time = rng.uniform(8.0, 12.0)
    start = rows[-1]["end_time"] if rows else trial.started
    row = {"epoch": epoch, "train_loss": 2.3 * math.exp(-3 * progress) + rng.uniform(0, 0.05),
           "val_loss": 2.3 * math.exp(-2.5 * progress) + rng.uniform(0, 0.1),
           "val_acc": min(1.0, 0.1 + 0.85 * (1 - math.exp(-4 * progress)) + rng.uniform(-0.02,
                                                                                         0.02)),
           "lr": trial.config["lr"] * 0.5 * (1 + math.cos(math.pi * progress)),
           "images_per_s": rng.uniform(1800.0, 2200.0), "epoch_time_s": epoch_time,
           "node_id": "f" * 56, "start_time": start, "end_time": start + epoch_time}
    rows.append(row)
    best = max(r[METRIC] for r in rows)
    total = row["end_time"] - trial.started
    return {**row, f"best_{METRIC}": best,
            # Tune's own keys (ray.tune.result.AUTO_RESULT_KEYS and the like)
            "timestamp": int(row["end_time"]), "checkpoint_dir_name": f"checkpoint_{epoch - 1:06d}",
            "done": False, "training_iteration": epoch, "trial_id": trial.trial_id,
            "date": time.strftime("%Y-%m-%d_%H-%M-%S"), "time_this_iter_s": epoch_time,
            "time_total_s": total, "pid": 4242, "hostname": socket.gethostname(),
            "node_ip": "10.0.0.2", "config": trial.config, "time_since_restore": total,
            "iterations_since_restore": epoch}


def report(replays: list[Replay], window: int, args: argparse.Namespace,
           flush_every_s: float) -> None:
    def median_of(values: list[float]) -> float:
        return statistics.median(values)

    first = median_of([r.first_us for r in replays])
    last = median_of([r.last_us for r in replays])
    fresh_first = median_of([r.fresh_first_us for r in replays])
    fresh_last = median_of([r.fresh_last_us for r in replays])
    over = f"median of {len(replays)} repeats" if len(replays) > 1 else "1 repeat"
    print(f"per result (on_trial_result + on_checkpoint, median of each window, {over}):")
    print(f"  first {window}: {first:.1f} us at the start of the search, {fresh_last:.1f} us "
          "alongside the last window (a fresh writer)")
    print(f"  last {window}: {last:.1f} us")
    print(f"  fresh writer alongside the first window: {fresh_first:.1f} us (a check: about "
          f"the first window's {first:.1f} us)")
    final_s = median_of([statistics.median(r.final_flush_s) for r in replays])
    print(f"final flush ({args.trials * args.epochs} epoch rows, {args.trials} trials): "
          f"{final_s * 1e3:.1f} ms")
    print(f"flushes in the driver at this size: at most one per FLUSH_EVERY_S = "
          f"{flush_every_s:g} s, so at most {final_s / flush_every_s:.1%} of its time")
    print(f"last / first at the start of the search (includes any change of load): "
          f"{last / first:.2f}")
    print(f"growth: {median_of([r.growth for r in replays]):.2f}")


if __name__ == "__main__":
    main()
