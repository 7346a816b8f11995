"""Trial turnover: how long a slot idles between one trial's last epoch and the next trial's
first, and where that time goes.

    python -m benchmarks.turnover [--space benchmarks/turnover.yaml] [--data digits]
        [--trials 16] [--seed 0] [--gpus-per-trial F] [--cpus-per-trial C]
        [--max-concurrent K] [--storage DIR|s3://...] [--s3] [--nodes N] [--output FILE]
    python -m benchmarks.turnover --run RUN_DIR     # the figures of a finished search

Runs one real `resnet-hpo search` through the project's driver on a local Ray of its own
(its workers at normal priority, so that other load on a shared machine starves them no
more than the driver) with short trials: by default benchmarks/turnover.yaml, digits at 8px,
one or two epochs a trial with ASHA, as many at once as the CPUs fit (2 on a 2-core
machine). `--gpus-per-trial` runs the same on a GPU. `--s3` stores the run in a bucket of a
local S3-compatible server (moto, as tests/test_s3.py runs it), so that every checkpoint and
result file crosses HTTP; `--nodes N` runs the trials on N worker nodes of a local Ray
cluster (a head that runs none, each worker node with a cache of its own, as
tests/test_cluster.py builds it), so that checkpoints cross between processes that share no
memory.

From the run's own files (epochs.parquet: each epoch's start_time and end_time, the start
being when its training began) it assigns the trials to slots by time (a trial takes the
slot freed last before its first epoch started; the first trials open the slots) and
prints each turnover: the previous trial's last epoch end to the next trial's first epoch
start on the same slot, their median and 90th percentile, and the slot utilisation: the
sum of epoch seconds / (slots x the span from the first epoch's start to the last one's
end).

Where a turnover's time goes is measured, not estimated: the trial adapter reports when
each trial's checkpoint was written and when its function was entered, torch configured and
its data opened (trainable/tune_adapter.py); a Tune callback added here records when the
driver received each result and when Tune ended and started each trial; the searcher's
calls and the project's callbacks (Parquet, TensorBoard, progress) are timed in the driver.
A fresh process's `import trainable.tune_adapter` is timed apart: a new trial actor pays it.
The last line is `turnover median X s, p90 Y s, utilisation Z`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import moto_s3
from search.rundir import EPOCHS_FILE, RunDir
from trainable import result_keys

TASK = Path(__file__).resolve().with_name("turnover.yaml")

# The phases of a turnover, in order, each from the end of the one before: (name, the event
# that ends it). Together they add up to the turnover.
PHASES = (
    ("checkpoint written", result_keys.CHECKPOINT_WRITTEN),
    ("to storage, result to driver", "result_received"),
    ("Tune ends the trial", "trial_ended"),
    ("next trial's actor ready", "trial_started"),
    ("trial function entered", "entered"),
    ("configure_torch", "torch_configured"),
    ("data opened", "data_opened"),
    ("model built, first epoch", "first_epoch_start"),
)


@dataclass
class TrialTimes:
    """One trial's events (UNIX seconds)."""
    first_epoch_start: float
    last_epoch_end: float
    epoch_seconds: float
    events: dict[str, float] = field(default_factory=dict)


@dataclass
class Turnover:
    slot: int
    before: str  # trial ids
    after: str
    seconds: float
    phases: dict[str, float | None]  # None where an event was not recorded
    driver_callbacks_s: float = 0.0
    searcher_s: float = 0.0


@dataclass
class Recorder:
    """What the driver saw, in UNIX seconds: per trial its events; the intervals spent in
    the project's callbacks and the searcher."""
    trials: dict[str, dict[str, Any]] = field(default_factory=lambda: defaultdict(dict))
    callbacks: list[tuple[float, float]] = field(default_factory=list)
    searcher: list[tuple[float, float]] = field(default_factory=list)


def timed(method: Callable[..., Any], intervals: list[tuple[float, float]]
          ) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return method(*args, **kwargs)
        finally:
            intervals.append((start, time.time()))
    return wrapper


@contextlib.contextmanager
def instrumented(recorder: Recorder) -> Iterator[None]:
    """The driver's classes timed, and a callback that records each trial's events added to
    the search's callbacks (as the progress printer, which build_tuner imports when called)."""
    from ray import tune

    import search.record.progress
    from search.record.results_writer import ResultsWriter
    from search.record.tensorboard_writer import TensorBoardWriter
    from search.run.study_search import StudySearch

    printer = search.record.progress.ProgressPrinter

    class EventRecorder(printer):  # type: ignore[misc, valid-type]
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            recorder.trials[trial.trial_id].setdefault("trial_started", time.time())
            super().on_trial_start(iteration, trials, trial, **info)

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            events = recorder.trials[trial.trial_id]
            events["result_received"] = time.time()  # the latest: the last epoch's
            if result_keys.CHECKPOINT_WRITTEN in result:
                events[result_keys.CHECKPOINT_WRITTEN] = result[result_keys.CHECKPOINT_WRITTEN]
            if result_keys.STARTUP in result and "entered" not in events:
                events.update(result[result_keys.STARTUP])
            super().on_trial_result(iteration, trials, trial, result, **info)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                              **info: Any) -> None:
            recorder.trials[trial.trial_id]["trial_ended"] = time.time()
            super().on_trial_complete(iteration, trials, trial, **info)

    patches: list[tuple[Any, str, Any]] = [
        (search.record.progress, "ProgressPrinter", EventRecorder)]
    for cls in (ResultsWriter, TensorBoardWriter, printer):
        for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_checkpoint",
                     "on_step_end", "flush"):
            if name in vars(cls):
                patches.append((cls, name, timed(vars(cls)[name], recorder.callbacks)))
    for name in ("suggest", "on_trial_result", "on_trial_complete"):
        patches.append((StudySearch, name, timed(vars(StudySearch)[name], recorder.searcher)))
    assert issubclass(EventRecorder, tune.Callback)
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def trial_times(rows: Sequence[dict[str, Any]]) -> dict[str, TrialTimes]:
    by_trial: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_trial[row["trial_id"]].append(row)
    return {trial_id: TrialTimes(min(r["start_time"] for r in epochs),
                                 max(r["end_time"] for r in epochs),
                                 sum(r["end_time"] - r["start_time"] for r in epochs))
            for trial_id, epochs in by_trial.items()}


def assign_slots(trials: dict[str, TrialTimes]) -> list[list[str]]:
    """Trials per slot, in time order: each trial takes the slot freed last before its first
    epoch started; while none is free, it opens a slot."""
    slots: list[list[str]] = []
    for trial_id in sorted(trials, key=lambda t: trials[t].first_epoch_start):
        start = trials[trial_id].first_epoch_start
        free = [slot for slot in slots if trials[slot[-1]].last_epoch_end <= start]
        if free:
            max(free, key=lambda slot: trials[slot[-1]].last_epoch_end).append(trial_id)
        else:
            slots.append([trial_id])
    return slots


def overlap(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


def turnovers(trials: dict[str, TrialTimes], slots: list[list[str]],
              recorder: Recorder | None) -> list[Turnover]:
    found = []
    for number, slot in enumerate(slots, 1):
        for before, after in itertools.pairwise(slot):
            end, start = trials[before].last_epoch_end, trials[after].first_epoch_start
            events: dict[str, float] = {"last_epoch_end": end, "first_epoch_start": start}
            if recorder is not None:
                old, new = recorder.trials.get(before, {}), recorder.trials.get(after, {})
                for key in (result_keys.CHECKPOINT_WRITTEN, "result_received", "trial_ended"):
                    if key in old:
                        events[key] = old[key]
                for key in ("trial_started", "entered", "torch_configured", "data_opened"):
                    if key in new:
                        events[key] = new[key]
            phases: dict[str, float | None] = {}
            previous: float | None = end
            for name, event in PHASES:
                at = events.get(event)
                phases[name] = None if at is None or previous is None else at - previous
                previous = at
            turnover = Turnover(number, before, after, start - end, phases)
            if recorder is not None:
                turnover.driver_callbacks_s = overlap(recorder.callbacks, end, start)
                turnover.searcher_s = overlap(recorder.searcher, end, start)
            found.append(turnover)
    return found


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def report(rows: Sequence[dict[str, Any]], recorder: Recorder | None) -> list[str]:
    trials = trial_times(rows)
    slots = assign_slots(trials)
    found = turnovers(trials, slots, recorder)
    first = min(t.first_epoch_start for t in trials.values())
    last = max(t.last_epoch_end for t in trials.values())
    span = last - first
    trained = sum(t.epoch_seconds for t in trials.values())
    utilisation = trained / (len(slots) * span)
    lines = [f"{len(trials)} trials, {len(rows)} epochs on {len(slots)} slots; span from the "
             f"first epoch's start to the last one's end {span:.1f} s, {trained:.1f} s of "
             f"epochs in it"]
    if recorder is not None:
        pids = {events["pid"] for events in recorder.trials.values() if "pid" in events}
        lines.append(f"{len(pids)} trial processes (Ray actors) ran the {len(trials)} trials")
    names = [name for name, _ in PHASES]
    short = ["ckpt", "upload", "end", "actor", "enter", "torch", "data", "model"]
    measured = recorder is not None  # else only the files' figures: no breakdown
    lines.append(f"{'slot':>4} {'before':>8} {'after':>8} {'turnover':>8}" + (
        "  " + " ".join(f"{s:>6}" for s in short) + f"  {'ours':>6} {'ask':>6}"
        if measured else ""))

    def fmt(value: float | None) -> str:
        return "     -" if value is None else f"{value:6.2f}"

    for t in found:
        lines.append(f"{t.slot:>4} {t.before[-8:]:>8} {t.after[-8:]:>8} {t.seconds:8.2f}" + (
            "  " + " ".join(fmt(t.phases[name]) for name in names)
            + f"  {t.driver_callbacks_s:6.2f} {t.searcher_s:6.2f}" if measured else ""))
    if not found:
        lines.append("no turnover: every trial had a slot of its own")
        return [*lines, f"turnover median - s, p90 - s, utilisation {utilisation:.2f}"]
    seconds = [t.seconds for t in found]
    if measured:
        lines.append("median where each turnover's time went (s):")
        for name, label in zip(names, short, strict=True):
            values = [v for t in found if (v := t.phases[name]) is not None]
            if values:
                lines.append(f"  {label:>6}  {name:30s} {statistics.median(values):6.2f}")
        for label, name, values in (
                ("ours", "in the project's callbacks", [t.driver_callbacks_s for t in found]),
                ("ask", "in the searcher", [t.searcher_s for t in found])):
            lines.append(f"  {label:>6}  {name:30s} {statistics.median(values):6.2f}  "
                         "(within the phases above)")
    lines.append(f"turnover median {statistics.median(seconds):.2f} s, "
                 f"p90 {percentile(seconds, 90):.2f} s, utilisation {utilisation:.2f}")
    return lines


def import_seconds() -> float:
    """A fresh interpreter's import of the trial adapter (torch, torchvision, ray), as a new
    trial actor pays it."""
    code = ("import time; t = time.perf_counter(); import trainable.tune_adapter; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}"


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def s3_bucket(tmp: str) -> Iterator[str]:
    """A moto S3 server with an empty bucket, this process's environment (inherited by Ray's
    processes) pointed at it; yields the bucket's URI."""
    with moto_s3(Path(tmp) / "moto.log") as env:
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="turnover")
        yield "s3://turnover/runs"


@contextlib.contextmanager
def ray_nodes(nodes: int, tmp: str) -> Iterator[None]:
    """Ray on this machine: one node, or a head that runs no trial and `nodes` worker nodes
    that split the CPUs, each with a data cache of its own."""
    import ray

    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                   logging_level=logging.ERROR)
    if nodes <= 1:
        ray.init(address="local", num_cpus=os.cpu_count(), **options)
        cluster = None
    else:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
        for i in range(nodes):
            cluster.add_node(num_cpus=max(1, (os.cpu_count() or 1) // nodes),
                             env_vars={"RESNET_HPO_CACHE": str(Path(tmp) / f"node-{i}")})
        ray.init(address=cluster.address, **options)
    try:
        yield
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def run_search(args: argparse.Namespace, storage: str, recorder: Recorder, tmp: str) -> str:
    """The search, as `resnet-hpo search` runs it; returns its run directory."""
    from search.cli import main as resnet_hpo

    flags = ["search", "--space", str(args.space), "--data", args.data, "--trials",
             str(args.trials), "--seed", str(args.seed), "--storage", storage,
             "--name", "turnover", "--gpus-per-trial", str(args.gpus_per_trial),
             "--cpus-per-trial", str(args.cpus_per_trial)]
    if args.max_concurrent:
        flags += ["--max-concurrent", str(args.max_concurrent)]
    os.environ.setdefault("RAY_worker_niceness", "0")
    log = Path(args.output).with_suffix(".log") if args.output else Path(os.devnull)
    with ray_nodes(args.nodes, tmp), open(log, "w") as out, contextlib.redirect_stdout(out), \
            instrumented(recorder):
        resnet_hpo(flags)
    return f"{storage.rstrip('/')}/turnover"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/turnover.py", *argv])
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}  load average {load()} at the "
             f"start  {command}"]
    print(lines[0], flush=True)
    recorder: Recorder | None = None
    with tempfile.TemporaryDirectory(prefix="turnover-") as tmp, contextlib.ExitStack() as stack:
        if args.run:
            run = args.run
        else:
            imports = import_seconds()
            lines.append(f"a fresh process imports trainable.tune_adapter in {imports:.2f} s")
            recorder = Recorder()
            storage = stack.enter_context(s3_bucket(tmp)) if args.s3 else args.storage or tmp
            run = run_search(args, storage, recorder, tmp)
        rows = RunDir.open(run).read_table(EPOCHS_FILE).to_pylist()
        lines += report(rows, recorder)
    lines.append(f"# load average {load()} at the end")
    lines.insert(-1, lines.pop())  # the figures' line stays last
    print("\n".join(lines[1:]), flush=True)
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", type=Path, default=TASK,
                        help="space file or shipped name (default: benchmarks/turnover.yaml)")
    parser.add_argument("--data", default="digits", help="data source (default digits)")
    parser.add_argument("--trials", type=int, default=16, help="trials (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed (sampler and training)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as fit)")
    parser.add_argument("--storage", help="where the run goes (default: a temporary directory)")
    parser.add_argument("--s3", action="store_true",
                        help="store the run in a local S3-compatible server's bucket (moto)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="worker nodes of a local Ray cluster that share the CPUs (default 1:"
                             " Ray on one node)")
    parser.add_argument("--output", help="also write this output to FILE (the search's own "
                                         "output goes to FILE with .log)")
    parser.add_argument("--run", help="only report on this finished run directory")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
