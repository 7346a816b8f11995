"""Per-epoch time of a trial whose frozen stages run once (`trainable.frozen`) against the
same trial running them in every epoch, on the CPU.

    python -m benchmarks.frozen [--images 400] [--resolution 32] [--epochs 3]

Both run `trainable.fit` with random weights, no crop, no flip and no mixing on digits,
first at unfreeze depth 1 (layer4 and fc train), then as a linear probe (depth 0, fc only).
With the cache the frozen stages map every train and val image once before the first epoch
and each epoch runs only the trainable ones; without it they run in every epoch, as they do
when the images are augmented. The first epoch is not timed; its time with the one-time work
before it, less a timed epoch, is each run's one-time cost, and the cached run's less the
uncached run's is the cache's. The repeats alternate the two paths; each path's fastest
timed epoch and least one-time cost count. The last line is `ratio: X.XX`: the uncached
per-epoch time over the cached at depth 0; the line above it is the same at depth 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile

import torch

import trainable.frozen
from benchmarks.common import Stopwatch, describe_device
from trainable import Dataset, Split, TrainConfig, configure_torch, fit, load_dataset

TARGET_RATIO = {0: 20.0, 1: 1.5}  # uncached / cached per-epoch time, by unfreeze depth
STAGES_TRAINED = {0: "fc only", 1: "layer4 + fc"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_torch()
    torch.set_num_threads(args.threads)
    clock = "cpu" if args.threads == 1 else "wall"
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-bench-") as tmp:
        os.environ["RESNET_HPO_CACHE"] = tmp
        data = subsample(load_dataset("digits", args.resolution, 0.1), args.images)
        print(f"frozen: {describe_device(torch.device('cpu'))}, torch {torch.__version__}, "
              f"digits {args.resolution}px, {len(data.train)} train + {len(data.val)} val "
              f"images, batch {args.batch_size}, {args.epochs} epochs (the first not timed), "
              f"{args.repeats} repeats, {clock} clock")
        ratios = {depth: measure(depth, data, args, clock) for depth in (1, 0)}
    print(f"depth 1 ratio: {ratios[1]:.2f} (target >= {TARGET_RATIO[1]:g})")
    print(f"ratio: {ratios[0]:.2f}")


def measure(depth: int, data: Dataset, args: argparse.Namespace, clock: str) -> float:
    """Both paths at one depth; prints them and returns uncached over cached s/epoch."""
    cfg = TrainConfig(data="digits", resolution=args.resolution, weights="none",
                      unfreeze_depth=depth, crop="none", flip="none",
                      batch_size=args.batch_size, epochs=args.epochs, warmup_epochs=0.0)
    best: dict[bool, tuple[float, float]] = {}
    for repeat, cached in itertools.product(range(args.repeats), (True, False)):
        epoch_s, one_time_s, val_acc = timed_fit(cfg, data, cached, clock == "cpu")
        print(f"  depth {depth} repeat {repeat + 1} {'cached  ' if cached else 'uncached'} "
              f"s per timed epoch: {' '.join(f'{s:.4f}' for s in epoch_s)}; one-time "
              f"{one_time_s:.3f} s; last val_acc {val_acc:.4f}", flush=True)
        fastest, least = best.get(cached, (float("inf"), float("inf")))
        best[cached] = (min(fastest, *epoch_s), min(least, one_time_s))
    (cached_s, cached_once), (uncached_s, uncached_once) = best[True], best[False]
    print(f"depth {depth} ({STAGES_TRAINED[depth]}): uncached {uncached_s:.4f} s/epoch, "
          f"cached {cached_s:.4f} s/epoch; the cache's one-time cost "
          f"{cached_once - uncached_once:+.3f} s")
    return uncached_s / cached_s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="training images")
    parser.add_argument("--resolution", type=int, default=32, help="px")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per run; all but the first are timed")
    parser.add_argument("--repeats", type=int, default=2,
                        help="run both paths this many times, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; with 1 the "
                        "timer counts this process's CPU seconds, robust to other load on a "
                        "shared machine, else elapsed seconds")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not timed")
    return args


def subsample(data: Dataset, images: int) -> Dataset:
    data.train = Split(data.train.images[:images], data.train.labels[:images])
    return data


def timed_fit(cfg: TrainConfig, data: Dataset, cached: bool,
              cpu_time: bool) -> tuple[list[float], float, float]:
    """(seconds of each epoch after the first, the one-time cost, the last val_acc)."""
    trainable.frozen.CACHE_OUTPUTS = cached
    clock = Stopwatch(torch.device("cpu"), cpu_time)
    ends: list[float] = []
    clock.start()
    history = fit(cfg, lambda _metrics, _save: ends.append(clock.seconds()), data=data,
                  device="cpu").history
    epoch_s = [end - start for start, end in itertools.pairwise(ends)]
    return epoch_s, ends[0] - sorted(epoch_s)[len(epoch_s) // 2], history[-1]["val_acc"]


if __name__ == "__main__":
    main()
