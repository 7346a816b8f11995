"""Search efficiency on digits: the best val_acc reached against the epochs spent, for
TPE+ASHA, random+ASHA and random+FIFO with the same space, number of trials and seeds.

    python -m benchmarks.search_efficiency [--space benchmarks/digits_hard.yaml]
        [--trials 10] [--seed 0] [--repeats 3] [--max-epochs N] [--resolution PX]
        [--storage DIR] [--output DIR] [--strategies tpe+asha,random+asha,random+fifo]

Each strategy is a real `resnet-hpo search` through the project's own driver, all three on
one local Ray started here. The default task (benchmarks/digits_hard.yaml: half of digits'
training images held out, 8px, 3 epochs a trial, lr over four decades of which about one
trains, and a flip and a crop that cost accuracy) is one where the sampler matters; on the
quick space every strategy ended at the same val_acc.
The epochs of a search are taken in the order they ended (epochs.parquet, end_time), all
trials together: with trials running side by side, "epochs spent" after k epochs counts
every epoch of every trial finished by then. For each seed the target is the baseline's
best val_acc (random+FIFO's; random+ASHA's when `--strategies` leaves random+FIFO out); the
script prints the epochs each strategy needed to first reach it and that against the
baseline's. The last line is `epochs ratio (tpe+asha / BASELINE), median of N seeds: X.XX`
(`never` if TPE+ASHA missed the target for half of the seeds or more), then what each search
hands over: the config `resnet-hpo best` exports from it (its best trial by val_acc),
retrained by `fit` at its full epochs with `--retrain-seeds` seeds that no trial used and
scored on digits' test split, which no search selects on (the mean test_acc of each run's
best epoch by val_acc), with the winner's curse (its best val_acc minus that). The last line
is `handed-over (tpe+asha - random+asha), mean of N seeds: +X +- SE`. With
`--output DIR` it writes DIR/search_efficiency.txt (this output) and
DIR/search_efficiency.png (the curves). The searches' own output goes to search.log (in DIR,
else in the storage).

tpe+asha was what `resnet-hpo search` did by default until 2026-12-07: random draws up to
TPE's startup trials (search/sampling/samplers.py startup_trials: a quarter of the trials, 2 to 10),
then TPE's model. The default now samples at random (README: How the default search spends
its trials): random+asha here, where digits trains from random weights and gets no recipes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow.parquet as pq

from search.cli import main as resnet_hpo
from search.rundir import EPOCHS_FILE, TRIALS_FILE, SearchRun
from search.views.best import trial_config
from trainable import fit, load_dataset
from trainable.device_images import DeviceImages
from trainable.runtime import Runtime
from trainable.train import evaluate

METRIC = "val_acc"
TASK = Path(__file__).resolve().with_name("digits_hard.yaml")
STRATEGIES = {"tpe+asha": ("tpe", "asha"), "random+asha": ("random", "asha"),
              "random+fifo": ("random", "fifo")}
CHALLENGER = "tpe+asha"
RETRAIN_SEED = 10_000  # retrains use seeds from here on: no search trial does


def baseline(names: Sequence[str]) -> str:
    return "random+fifo" if "random+fifo" in names else "random+asha"


def best_so_far(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """Best val_acc after each epoch spent, the epochs of all trials in the order they ended
    (NaN or missing values count as spent but reach nothing)."""
    best, curve = -math.inf, []
    for row in sorted(rows, key=lambda r: r["end_time"]):
        value = row[METRIC]
        if value is not None and math.isfinite(value):
            best = max(best, value)
        curve.append(best)
    return curve


def first_reach(curve: Sequence[float], target: float) -> int | None:
    return next((k for k, best in enumerate(curve, 1) if best >= target), None)


def epochs_to_reach(rows: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """Epochs spent until the best val_acc first reached `target`; None if it never did."""
    return first_reach(best_so_far(rows), target)


def ratio(epochs: int | None, base: int | None) -> float:
    """epochs / base; infinite when `epochs` never reached the target."""
    return math.inf if epochs is None or not base else epochs / base


def median_ratio(ratios: Sequence[float]) -> str:
    """The median, `never` when it is infinite (half of the seeds or more never reached the
    target)."""
    middle = statistics.median(ratios)
    return "never" if math.isinf(middle) else f"{middle:.2f}"


def fmt(epochs: int | None) -> str:
    return "never" if epochs is None else str(epochs)


@dataclass(frozen=True)
class Run:
    label: str
    seed: int
    curve: list[float]
    seconds: float
    handed_over: float  # the exported config's mean test_acc, retrained

    @property
    def curse(self) -> float:
        """What the search found minus what it hands over."""
        return self.best - self.handed_over

    @property
    def best(self) -> float:
        return self.curve[-1] if self.curve else -math.inf

    def reach(self, target: float) -> int | None:
        return first_reach(self.curve, target)


def task_flags(args: argparse.Namespace) -> list[str]:
    """The flags of every search of a benchmark: the space, digits, and the overrides."""
    flags = ["--space", str(args.space), "--data", "digits"]
    if args.resolution:
        flags += ["--resolution", str(args.resolution)]
    if args.max_epochs:
        flags += ["--max-epochs", str(args.max_epochs)]
    return flags


def run_search(label: str, name: str, seed: int, flags: list[str], storage: Path,
               log: IO[str], retrain_seeds: int) -> Run:
    """One `resnet-hpo search ... --seed SEED` as STORAGE/NAME; its curve from
    epochs.parquet and what it hands over."""
    start = time.monotonic()
    with contextlib.redirect_stdout(log):
        resnet_hpo(["search", *flags, "--seed", str(seed), "--storage", str(storage),
                    "--name", name])
    rows = pq.read_table(storage / name / EPOCHS_FILE).to_pylist()
    seconds = time.monotonic() - start
    run = Run(label, seed, best_so_far(rows), seconds,
              handed_over(storage / name, retrain_seeds))
    print(f"  ran {label} seed {seed}: {len(run.curve)} epochs, {run.seconds:.0f} s, hands "
          f"over test_acc {run.handed_over:.4f}", flush=True)
    return run


def handed_over(run_dir: Path, seeds: int) -> float:
    """The mean test_acc of the run's exported config (its best trial's, as `resnet-hpo
    best` exports it) retrained with `seeds` new seeds: each run's best epoch by val_acc."""
    run = SearchRun.open(str(run_dir))
    cfg = trial_config(run.ranked[0], str(run_dir / TRIALS_FILE))
    data = load_dataset(cfg.data, cfg.resolution, cfg.val_fraction)
    assert data.test is not None
    scores = []
    for k in range(seeds):
        retrain = cfg.replace(seed=RETRAIN_SEED + k)
        rt = Runtime.for_config(retrain, None)
        model = fit(retrain, data=data).model
        scores.append(evaluate(model, DeviceImages(data.test, rt.device), rt,
                               retrain.eval_batch_size)[1])
    return float(np.mean(scores))


def paired_difference(results: list[dict[str, Run]], name: str, reference: str
                      ) -> tuple[float, float]:
    """(mean, standard error) over the seeds of name's handed-over test_acc minus the
    reference's (0 error from one seed)."""
    diffs = np.array([runs[name].handed_over - runs[reference].handed_over
                      for runs in results])
    se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
    return float(diffs.mean()), se


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}"


@contextlib.contextmanager
def benchmark_session(args: argparse.Namespace, title: str, script: str, argv: list[str]
                      ) -> Iterator[tuple[Path, IO[str], list[str]]]:
    """A local Ray (unless one is running: the tests'), the storage, the searches' log and
    the lines of the output; on leaving, DIR/<script>.txt with a header when `--output DIR`
    was given."""
    import ray

    started = not ray.is_initialized()
    if started:  # address="local": never join a cluster another process started here
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
    load_before = os.getloadavg()[0]
    lines = [title]
    print(title, flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f"{script}-") as tmp:
            storage = Path(args.storage or tmp)
            logs = args.output or storage
            logs.mkdir(parents=True, exist_ok=True)
            with open(logs / "search.log", "a") as log:
                yield storage, log, lines
    finally:
        if started:
            ray.shutdown()
    if args.output:
        command = shlex.join(["python", f"benchmarks/{script}.py", *argv])
        header = (f"# {time.strftime('%Y-%m-%d')}  {machine()} (load average {load_before:.1f} "
                  f"at the start, {os.getloadavg()[0]:.1f} at the end)  {command}")
        (args.output / f"{script}.txt").write_text("\n".join([header, *lines]) + "\n")


def table(runs: dict[str, Run]) -> list[str]:
    base_name = baseline(list(runs))
    target = runs[base_name].best
    base = runs[base_name].reach(target)
    lines = [f"seed {runs[base_name].seed}: target = {base_name}'s best val_acc {target:.4f}",
             f"  {'strategy':12s} {'epochs spent':>12s} {'best val_acc':>12s} "
             f"{'epochs to target':>16s} {'vs base':>7s} {'wall s':>7s} {'handed over':>11s}"]
    for name, run in runs.items():
        reached = run.reach(target)
        vs = "-" if reached is None else f"{ratio(reached, base):.2f}"
        lines.append(f"  {name:12s} {len(run.curve):12d} {run.best:12.4f} {fmt(reached):>16s} "
                     f"{vs:>7s} {run.seconds:7.0f} {run.handed_over:11.4f}")
    return lines


def summary(results: list[dict[str, Run]]) -> list[str]:
    base_name = baseline(list(results[0]))
    ratios = {name: [ratio(runs[name].reach(runs[base_name].best),
                           runs[base_name].reach(runs[base_name].best)) for runs in results]
              for name in results[0]}
    lines = []
    if len(results) > 1:
        lines += [f"median of {len(results)} seeds",
                  f"  {'strategy':12s} {'epochs spent':>12s} {'best val_acc':>12s} "
                  f"{'vs base':>7s}  per seed"]
        for name, per_seed in ratios.items():
            spent = statistics.median(len(runs[name].curve) for runs in results)
            best = statistics.median(runs[name].best for runs in results)
            seeds = " ".join("never" if math.isinf(r) else f"{r:.2f}" for r in per_seed)
            lines.append(f"  {name:12s} {spent:12.1f} {best:12.4f} "
                         f"{median_ratio(per_seed):>7s}  {seeds}")
    lines.append(f"epochs ratio ({CHALLENGER} / {base_name}), median of {len(results)} seed"
                 f"{'s' * (len(results) > 1)}: {median_ratio(ratios[CHALLENGER])}")
    lines.append(f"  {'strategy':12s} {'handed over':>11s} {'found':>7s} {'curse':>7s}  "
                 f"(means of {len(results)} seeds)")
    for name in results[0]:
        runs = [r[name] for r in results]
        lines.append(f"  {name:12s} {np.mean([r.handed_over for r in runs]):11.4f} "
                     f"{np.mean([r.best for r in runs]):7.4f} "
                     f"{np.mean([r.curse for r in runs]):+7.4f}")
    mean, se = paired_difference(results, CHALLENGER, "random+asha")
    lines.append(f"handed-over ({CHALLENGER} - random+asha), mean of {len(results)} seed"
                 f"{'s' * (len(results) > 1)}: {mean:+.4f} +- {se:.4f}")
    return lines


def plot(results: list[dict[str, Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, name in zip(("C0", "C1", "C2"), results[0], strict=False):
        for i, runs in enumerate(results):
            curve = runs[name].curve
            ax.step(range(1, len(curve) + 1), curve, where="post", color=colour,
                    alpha=1.0 if len(results) == 1 else 0.6, label=name if i == 0 else None)
    for runs in results:
        ax.axhline(runs[baseline(list(runs))].best, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="epochs spent (all trials, in the order they ended)",
           ylabel="best val_acc so far", title="search efficiency on digits")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    title = "\n".join([
        f"search efficiency on digits: space {args.space}, {args.trials} trials, resolution "
        f"{args.resolution or 'as the space says'}, max epochs "
        f"{args.max_epochs or 'as the space says'}, {os.cpu_count()} CPUs",
        "epochs spent = every epoch of every trial, in the order they ended (trials run side "
        "by side)"])
    results = []
    with benchmark_session(args, title, "search_efficiency", argv) as (storage, log, lines):
        for seed in range(args.seed, args.seed + args.repeats):
            runs = {}
            for label in args.strategies:
                sampler, scheduler = STRATEGIES[label]
                flags = [*task_flags(args), "--trials", str(args.trials),
                         "--sampler", sampler, "--scheduler", scheduler]
                runs[label] = run_search(label, f"{sampler}-{scheduler}-seed{seed}", seed,
                                         flags, storage, log, args.retrain_seeds)
            results.append(runs)
            lines += table(runs)
            print("\n".join(lines[-len(runs) - 2:]), flush=True)
        tail = summary(results)
        lines += tail
        print("\n".join(tail), flush=True)
    if args.output:
        plot(results, args.output / "search_efficiency.png")


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """The flags both search benchmarks share: the task, the seeds, where runs go."""
    parser.add_argument("--space", type=Path, default=TASK,
                        help="space file or shipped name (default: benchmarks/digits_hard.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (sampler and training)")
    parser.add_argument("--repeats", type=int, default=3, help="seeds seed..seed+R-1 (default 3)")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (default: the space's)")
    parser.add_argument("--resolution", type=int, help="px (default: the space's)")
    parser.add_argument("--storage", type=Path,
                        help="keep the run directories here (default: a temporary directory)")
    parser.add_argument("--output", type=Path, help="write the results here")
    parser.add_argument("--retrain-seeds", type=int, default=3,
                        help="seeds each search's exported config is retrained with (default 3)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per search (default 10)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated, tpe+asha and random+asha among them (default "
                             f"{','.join(STRATEGIES)})")
    add_task_args(parser)
    args = parser.parse_args(argv)
    if min(args.trials, args.repeats, args.retrain_seeds) < 1:
        parser.error("--trials, --repeats and --retrain-seeds must be >= 1")
    args.strategies = args.strategies.split(",")
    if not {CHALLENGER, "random+asha"} <= set(args.strategies) <= set(STRATEGIES):
        parser.error(f"--strategies: {CHALLENGER} and random+asha, and random+fifo if wanted")
    return args


if __name__ == "__main__":
    main()
