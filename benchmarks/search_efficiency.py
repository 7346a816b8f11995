"""Search efficiency on digits: the best val_acc reached against the epochs spent, for
TPE+ASHA, random+ASHA and random+FIFO with the same space, number of trials and seeds.

    python benchmarks/search_efficiency.py [--space quick] [--trials 16] [--seed 0]
        [--repeats 1] [--max-epochs N] [--resolution 16] [--output DIR]

Each strategy is a real `resnet-hpo search` through the project's own driver, all three on
one local Ray started here. The epochs of a search are taken in the order they ended
(epochs.parquet, end_time), all trials together: with trials running side by side, "epochs
spent" after k epochs counts every epoch of every trial finished by then. For each seed the
target is random+FIFO's best val_acc; the script prints the epochs each strategy needed to
first reach it. The last line is `epochs ratio (tpe+asha / random+fifo): X.XX` (summed over
the seeds; `never` if TPE+ASHA missed the target for some seed). With `--output DIR` it
writes DIR/search_efficiency.txt (this output) and DIR/search_efficiency.png (the curves).
The searches' own output goes to search.log (in DIR, else in the temporary storage).

TPE's first startup trials (search/study.py startup_trials: a quarter of the trials, 2 to
10) are random draws from the same seed as the random sampler's: TPE can only differ from
random after them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq

from search.cli import main as resnet_hpo
from search.rundir import EPOCHS_FILE

METRIC = "val_acc"
STRATEGIES = {"tpe+asha": ("tpe", "asha"), "random+asha": ("random", "asha"),
              "random+fifo": ("random", "fifo")}
BASELINE, CHALLENGER = "random+fifo", "tpe+asha"


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


@dataclass(frozen=True)
class Run:
    strategy: str
    seed: int
    curve: list[float]
    seconds: float

    @property
    def best(self) -> float:
        return self.curve[-1] if self.curve else -math.inf

    def reach(self, target: float) -> int | None:
        return first_reach(self.curve, target)


def run_search(strategy: str, seed: int, args: argparse.Namespace, storage: Path,
               log: Any) -> Run:
    sampler, scheduler = STRATEGIES[strategy]
    name = f"{sampler}-{scheduler}-seed{seed}"
    flags = ["search", "--space", args.space, "--data", "digits", "--trials", str(args.trials),
             "--sampler", sampler, "--scheduler", scheduler, "--seed", str(seed),
             "--resolution", str(args.resolution), "--storage", str(storage), "--name", name]
    if args.max_epochs:
        flags += ["--max-epochs", str(args.max_epochs)]
    start = time.monotonic()
    with contextlib.redirect_stdout(log):
        resnet_hpo(flags)
    rows = pq.read_table(storage / name / EPOCHS_FILE).to_pylist()
    return Run(strategy, seed, best_so_far(rows), time.monotonic() - start)


def fmt(epochs: int | None) -> str:
    return "never" if epochs is None else str(epochs)


def table(runs: dict[str, Run]) -> list[str]:
    target = runs[BASELINE].best
    base = runs[BASELINE].reach(target)
    lines = [f"seed {runs[BASELINE].seed}: target = random+fifo's best val_acc {target:.4f}",
             f"  {'strategy':12s} {'epochs spent':>12s} {'best val_acc':>12s} "
             f"{'epochs to target':>16s} {'vs fifo':>7s} {'wall s':>7s}"]
    for name, run in runs.items():
        reached = run.reach(target)
        ratio = "-" if reached is None or base is None else f"{reached / base:.2f}"
        lines.append(f"  {name:12s} {len(run.curve):12d} {run.best:12.4f} {fmt(reached):>16s} "
                     f"{ratio:>7s} {run.seconds:7.0f}")
    return lines


def summary(results: list[dict[str, Run]]) -> list[str]:
    targets = [runs[BASELINE].best for runs in results]
    reached = {name: [runs[name].reach(t) for runs, t in zip(results, targets, strict=True)]
               for name in STRATEGIES}
    lines = []
    if len(results) > 1:
        lines.append(f"mean over {len(results)} seeds (epochs to target: mean over the seeds "
                     "that reached it)")
        for name, hits in reached.items():
            spent = sum(len(runs[name].curve) for runs in results) / len(results)
            best = sum(runs[name].best for runs in results) / len(results)
            done = [h for h in hits if h is not None]
            mean = f"{sum(done) / len(done):.1f}" if done else "never"
            lines.append(f"  {name:12s} {spent:12.1f} {best:12.4f} {mean:>16s} "
                         f"({len(done)}/{len(hits)} reached)")
    ours = [h for h in reached[CHALLENGER] if h is not None]
    base = sum(b or 0 for b in reached[BASELINE])
    ratio = (f"{sum(ours) / base:.2f}" if len(ours) == len(results) else
             f"never ({len(ours)} of {len(results)} seeds reached it)")
    lines.append(f"epochs ratio ({CHALLENGER} / {BASELINE}): {ratio}")
    return lines


def plot(results: list[dict[str, Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, name in zip(("C0", "C1", "C2"), STRATEGIES, strict=True):
        for i, runs in enumerate(results):
            curve = runs[name].curve
            ax.step(range(1, len(curve) + 1), curve, where="post", color=colour,
                    alpha=1.0 if len(results) == 1 else 0.6, label=name if i == 0 else None)
    for runs in results:
        ax.axhline(runs[BASELINE].best, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="epochs spent (all trials, in the order they ended)",
           ylabel="best val_acc so far", title="search efficiency on digits")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import ray

    started = not ray.is_initialized()  # else join it (as the tests do)
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    lines = [f"search efficiency on digits: space {args.space}, {args.trials} trials, "
             f"resolution {args.resolution}, max epochs "
             f"{args.max_epochs or 'as the space says'}, {os.cpu_count()} CPUs",
             "epochs spent = every epoch of every trial, in the order they ended (trials run "
             "side by side)"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
        storage = Path(args.storage or tmp)
        logs = args.output or storage
        logs.mkdir(parents=True, exist_ok=True)
        results = []
        with open(logs / "search.log", "a") as log:
            for seed in range(args.seed, args.seed + args.repeats):
                runs = {}
                for name in STRATEGIES:
                    runs[name] = run = run_search(name, seed, args, storage, log)
                    print(f"  ran {name} seed {seed}: {len(run.curve)} epochs, "
                          f"{run.seconds:.0f} s", flush=True)
                results.append(runs)
                lines += table(runs)
                print("\n".join(lines[-len(runs) - 2:]), flush=True)
    if started:
        ray.shutdown()
    tail = summary(results)
    print("\n".join(tail))
    if args.output:
        device = f"{os.cpu_count()}-core {platform.machine()} CPU"
        command = shlex.join(["python", "benchmarks/search_efficiency.py", *argv])
        header = f"# {time.strftime('%Y-%m-%d')}  {device}  {command}"
        (args.output / "search_efficiency.txt").write_text("\n".join([header, *lines, *tail])
                                                           + "\n")
        plot(results, args.output / "search_efficiency.png")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="quick", help="shipped space name or YAML file")
    parser.add_argument("--trials", type=int, default=16, help="trials per search")
    parser.add_argument("--seed", type=int, default=0, help="first seed (sampler and training)")
    parser.add_argument("--repeats", type=int, default=1, help="seeds seed..seed+R-1")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--resolution", type=int, default=16, help="px (default 16)")
    parser.add_argument("--storage", type=Path,
                        help="keep the run directories here (default: a temporary directory)")
    parser.add_argument("--output", type=Path, help="write the results text and PNG here")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.repeats < 1:
        parser.error("--trials and --repeats must be >= 1")
    return args


if __name__ == "__main__":
    main()
