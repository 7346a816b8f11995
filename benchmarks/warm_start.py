"""Warm start on digits: does a search started from an earlier run (`--warm-start`) reach
a cold search's best val_acc with fewer epochs than the cold search?

    python -m benchmarks.warm_start [--space benchmarks/digits_hard.yaml] [--trials 8]
        [--source-trials 8] [--warm-start-top 4] [--seed 0] [--repeats 3] [--max-epochs N]
        [--resolution PX] [--storage DIR] [--output DIR]

For each seed S it runs three real `resnet-hpo search`es of the same space (its sampler and
scheduler) on one local Ray: the earlier run, `--source-trials` trials with seed S+1000;
then, both with seed S, a cold search of `--trials` trials and the same search with
`--warm-start` from the earlier run (its best `--warm-start-top` configs first, its trials as
the sampler's history). The earlier run's epochs are not counted: it is a search that was
already done. The target is the cold search's best val_acc; epochs are counted as
benchmarks/search_efficiency.py counts them (every epoch of every trial, in the order they
ended). The script prints, for each seed, the epochs each search needed to first reach the
target and their ratio; the last line is `epochs ratio (warm / cold), median of N seeds:
X.XX` (`never` if the warm search missed the target for half of the seeds or more). With
`--output DIR` it writes DIR/warm_start.txt (this output); the searches' own output goes to
search.log (in DIR, else in the storage).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from benchmarks.search_efficiency import (
    Run,
    add_task_args,
    benchmark_session,
    fmt,
    median_ratio,
    ratio,
    run_search,
    task_flags,
)

SOURCE_SEED_OFFSET = 1000  # the earlier run's seed: S + this


def table(source: Run, cold: Run, warm: Run) -> list[str]:
    target = cold.best
    reached = {run.label: run.reach(target) for run in (cold, warm)}
    lines = [f"seed {cold.seed}: target = the cold search's best val_acc {target:.4f} (the "
             f"earlier run, seed {source.seed}: best {source.best:.4f} in {len(source.curve)} "
             "epochs)",
             f"  {'search':8s} {'epochs spent':>12s} {'best val_acc':>12s} "
             f"{'epochs to target':>16s} {'wall s':>7s} {'handed over':>11s}"]
    for run in (cold, warm):
        lines.append(f"  {run.label:8s} {len(run.curve):12d} {run.best:12.4f} "
                     f"{fmt(reached[run.label]):>16s} {run.seconds:7.0f} "
                     f"{run.handed_over:11.4f}")
    warm_ratio = ratio(reached["warm"], reached["cold"])
    lines.append("  epochs ratio (warm / cold): "
                 + ("never" if math.isinf(warm_ratio) else f"{warm_ratio:.2f}"))
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    title = "\n".join([
        f"warm start on digits: space {args.space}, {args.trials} trials cold and warm, "
        f"warm-started from a {args.source_trials}-trial run (its {args.warm_start_top} best "
        f"configs first), resolution {args.resolution or 'as the space says'}, max epochs "
        f"{args.max_epochs or 'as the space says'}, {os.cpu_count()} CPUs",
        "epochs spent = every epoch of every trial, in the order they ended (trials run side "
        "by side); the earlier run's epochs are not counted"])
    ratios = []
    with benchmark_session(args, title, "warm_start", argv) as (storage, log, lines):
        for seed in range(args.seed, args.seed + args.repeats):
            source_name = f"source-seed{seed}"
            source = run_search("earlier", source_name, seed + SOURCE_SEED_OFFSET,
                                [*task_flags(args), "--trials", str(args.source_trials)],
                                storage, log, args.retrain_seeds)
            flags = [*task_flags(args), "--trials", str(args.trials)]
            cold = run_search("cold", f"cold-seed{seed}", seed, flags, storage, log,
                              args.retrain_seeds)
            warm = run_search("warm", f"warm-seed{seed}", seed,
                              [*flags, "--warm-start", str(storage / source_name),
                               "--warm-start-top", str(args.warm_start_top)], storage, log,
                              args.retrain_seeds)
            ratios.append(ratio(warm.reach(cold.best), cold.reach(cold.best)))
            lines += table(source, cold, warm)
            print("\n".join(lines[-5:]), flush=True)
        lines.append(f"epochs ratio (warm / cold), median of {len(ratios)} seed"
                     f"{'s' * (len(ratios) > 1)}: {median_ratio(ratios)}")
        print(lines[-1], flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8,
                        help="trials of the cold and the warm search (default 8)")
    parser.add_argument("--source-trials", type=int, default=8,
                        help="trials of the earlier run (default 8)")
    parser.add_argument("--warm-start-top", type=int, default=4,
                        help="the earlier run's best configs tried first (default 4)")
    add_task_args(parser)
    args = parser.parse_args(argv)
    if min(args.trials, args.source_trials, args.warm_start_top, args.repeats,
           args.retrain_seeds) < 1:
        parser.error("--trials, --source-trials, --warm-start-top, --repeats and "
                     "--retrain-seeds must be >= 1")
    return args


if __name__ == "__main__":
    main()
