"""How many trials should share one GPU? Aggregate images/s of N concurrent trials.

    python -m benchmarks.packing --device cuda [--trials 1,2,4,8] [--resolution 32]

For each N, starts N processes that each run `trainable.fit` on the same generated data
(what Ray does with `--gpus-per-trial 1/N`: fractional GPUs only place N trial processes on
one GPU). The processes wait at a barrier until all have loaded their data and started
CUDA, then train together. The first epoch of each warms up; the aggregate counts the
images of every later epoch of every process over the wall time from the first of them to
start its timed epochs to the last to finish. Peak memory is PyTorch's per process (the
CUDA context, about 0.5 GiB a process, comes on top). No Ray needed: the script imports
only `trainable`. `--device cpu` makes a smoke run of the same code.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import time
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

import torch

from benchmarks.common import (
    describe_device,
    peak_memory_gib,
    reset_peak_memory,
    resolve_device,
    synthetic_dataset,
)
from trainable import TrainConfig, configure_torch, fit

NUM_CLASSES = 10
RESULT_TIMEOUT_S = 1800  # per process; a trial that long means something is stuck


@dataclass
class TrialTiming:
    timed_start: float  # monotonic clock, end of the warm-up epoch
    timed_end: float
    timed_images: int
    images_per_s: float  # mean of fit's per-epoch figure over the timed epochs
    peak_gib: float


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    print(f"packing: {describe_device(device)}, torch {torch.__version__}, {args.resolution}px, "
          f"batch {args.batch_size}, stem {args.stem}, epochs of {args.steps} steps: 1 warm-up "
          f"+ {args.epochs} timed")
    print(f"{'trials':>6} {'aggregate img/s':>16} {'per trial img/s':>16} {'vs 1 trial':>10} "
          f"{'peak GiB/trial':>15}")
    aggregate: dict[int, float] = {}
    for n in args.trials:
        timings = run_concurrently(n, args)
        start = min(t.timed_start for t in timings)
        end = max(t.timed_end for t in timings)
        aggregate[n] = sum(t.timed_images for t in timings) / (end - start)
        per_trial = sum(t.images_per_s for t in timings) / n
        versus = aggregate[n] / aggregate[args.trials[0]]
        print(f"{n:>6} {aggregate[n]:>16.1f} {per_trial:>16.1f} {versus:>9.2f}x "
              f"{max(t.peak_gib for t in timings):>15.2f}", flush=True)
    n = 4 if 4 in aggregate else args.trials[-1]
    print(f"ratio ({n} trials vs {args.trials[0]}): {aggregate[n] / aggregate[args.trials[0]]:.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--trials", default="1,2,4,8",
                        help="comma-separated numbers of concurrent trials; the first is the "
                        "reference")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    parser.add_argument("--steps", type=int, default=50, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up")
    args = parser.parse_args(argv)
    args.trials = [int(n) for n in args.trials.split(",")]
    if any(n < 1 for n in args.trials) or args.steps * args.batch_size < NUM_CLASSES:
        parser.error("--trials must be positive and steps * batch size at least "
                     f"{NUM_CLASSES}")
    return args


def run_concurrently(n: int, args: argparse.Namespace) -> list[TrialTiming]:
    """Start n trial processes together and collect their timings."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, results = ctx.Barrier(n), ctx.Queue()
    settings = {key: getattr(args, key) for key in
                ("device", "resolution", "batch_size", "stem", "steps", "epochs")}
    settings["threads"] = max(1, (os.cpu_count() or 1) // n)
    processes = [ctx.Process(target=trial_process, args=(rank, settings, barrier, results))
                 for rank in range(n)]
    for process in processes:
        process.start()
    timings = []
    try:
        for _ in processes:
            timings.append(next_result(results, processes))
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return timings


def next_result(results: Any, processes: list[Any]) -> TrialTiming:
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return TrialTiming(**results.get(timeout=5))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:
                raise SystemExit(f"a trial process failed (exit code {failed[0]}); "
                                 "see above") from None
    raise SystemExit(f"no trial process finished within {RESULT_TIMEOUT_S} s")


def trial_process(rank: int, settings: dict[str, Any], barrier: Barrier, results: Any) -> None:
    """One trial: load data, start the device, wait for the others, then `fit`."""
    configure_torch()
    torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    n_train = settings["steps"] * settings["batch_size"]
    data = synthetic_dataset(n_train, max(settings["batch_size"], NUM_CLASSES), NUM_CLASSES,
                             settings["resolution"])
    cfg = TrainConfig(data=data.source, resolution=settings["resolution"], weights="none",
                      stem=settings["stem"], batch_size=settings["batch_size"],
                      epochs=1 + settings["epochs"], seed=rank)
    torch.zeros(1, device=device)  # start CUDA before the barrier
    reset_peak_memory(device)
    epoch_ends: list[float] = []
    rates: list[float] = []

    def record(metrics: dict[str, float], _save: Any) -> None:
        epoch_ends.append(time.monotonic())
        rates.append(metrics["images_per_s"])

    barrier.wait()
    fit(cfg, record, data=data, device=device)
    timed = rates[1:]
    # A dict, not a TrialTiming: the class is __mp_main__'s here, which the parent lacks.
    results.put(asdict(TrialTiming(epoch_ends[0], epoch_ends[-1], len(timed) * n_train,
                                   sum(timed) / len(timed), peak_memory_gib(device))))


if __name__ == "__main__":
    main()
