"""What each piece of the modern recipe buys on a small-data task: the test accuracy of
ResNet18 at 30 images a class, over several training seeds, with no policy, TrivialAugment,
RandAugment, random erasing and a moving average of the weights, on the CPU.

    nice -n 10 python -m benchmarks.augment_value [--backbone none|pretrained] [--seeds 5]
        [--epochs 15] [--per-class 30] [--workers 2]

`--backbone none` (the default): digits from random weights. Every run is a `fit` of the
same base config (32px, batch 32, SGD lr 0.05 with a warmup epoch, label smoothing 0.1,
`crop` and `flip` as `auto` picks them for digits: a pad crop, no flip) with one piece
added; its best epoch by val_acc (digits' 143 val images) is scored on digits' 359 test
images.

`--backbone pretrained`: benchmarks/transfer.py's backbone (digits 0-4 from random weights,
16px) fine-tuned on its `dissimilar` target, shapes in random colours, places and angles,
with 30 val and 30 test images a class; every layer trains, with transfer.py's `full`
strategy (lr 0.05, layer_decay 0.7), the same warmup, smoothing and auto crop and flip (a
pad crop and a flip for shapes). No ImageNet weights can be downloaded here, so this is
the nearest this machine has to fine-tuning a pretrained network.

Seeds are paired: seed s of every piece starts from the same initial weights and batch
order, so each piece's difference from `none` is given with the standard error of the
paired differences, next to each mean with its standard error.
Everything is seeded: a rerun on the same machine and thread count prints the same numbers,
however many worker processes (one thread each) share the runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks import transfer
from benchmarks.common import describe_device
from benchmarks.transfer import first_per_class, test_accuracy
from trainable import Dataset, TrainConfig, configure_torch, fit, load_dataset

RESOLUTION = 32
PIECES: dict[str, dict[str, Any]] = {
    "none": {},
    "trivial": {"augment": "trivial"},
    "randaugment": {"augment": "randaugment"},
    "random erasing 0.25": {"random_erasing": 0.25},
    "ema 0.95": {"ema_decay": 0.95},  # about 20 steps: 2 epochs of 9 steps
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-bench-") as tmp:
        if args.backbone == "pretrained":
            configure_torch()
            torch.set_num_threads(args.threads)
            args.weights = transfer.pretrain(transfer.all_digits(), Path(tmp) / "backbone",
                                             args.source_epochs, seed=0, check=False)
        accuracies = run_pieces(args)
    print(f"{'piece':20s} {'test_acc mean':>13s} {'se':>7s} {'vs none':>8s} {'se':>7s}")
    for name, values in accuracies.items():
        differences = [a - b for a, b in zip(values, accuracies["none"], strict=True)]
        print(f"{name:20s} {statistics.mean(values):13.4f} {standard_error(values):7.4f} "
              f"{statistics.mean(differences):+8.4f} {standard_error(differences):7.4f}")


def run_pieces(args: argparse.Namespace) -> dict[str, list[float]]:
    """Every piece's test accuracies, in seed order."""
    data = small_data(args.backbone, args.per_class)
    start = ("from random weights" if args.backbone == "none"
             else "fine-tuned from transfer.py's backbone")
    print(f"augment_value: {describe_device(torch.device('cpu'))}, torch {torch.__version__}, "
          f"{data.source} {data.resolution}px {start}, {len(data.train)} train "
          f"({args.per_class} a class), {len(data.val)} val, {len(data.test or [])} test "
          f"images, {args.epochs} epochs, seeds 0-{args.seeds - 1}, {args.workers} workers",
          flush=True)
    jobs = [(name, seed, args) for name in PIECES for seed in range(args.seeds)]
    accuracies: dict[str, list[float]] = {}
    with ProcessPoolExecutor(args.workers, initializer=start_worker, initargs=(args,)) as pool:
        for (name, seed, _), (accuracy, best_epoch, seconds) in zip(
                jobs, pool.map(train_piece, jobs), strict=True):
            accuracies.setdefault(name, []).append(accuracy)
            print(f"  {name:20s} seed {seed}: test_acc {accuracy:.4f} (best epoch "
                  f"{best_epoch}, {seconds:.0f} s)", flush=True)
    return accuracies


@functools.cache  # once a process
def small_data(backbone: str, per_class: int) -> Dataset:
    """Digits at RESOLUTION for a run from random weights; transfer.py's shapes target for
    one from its backbone."""
    if backbone == "none":
        data = load_dataset("digits", RESOLUTION, 0.1)
        data.train = first_per_class(data.train, per_class)
        return data
    classes = tuple(range(len(transfer.SHAPES)))
    val, test, train = transfer.per_class_splits(
        transfer.shape_images(len(classes) * (transfer.VAL_PER_CLASS + transfer.TEST_PER_CLASS
                                              + per_class), seed=0),
        classes, [transfer.VAL_PER_CLASS, transfer.TEST_PER_CLASS, per_class], seed=0)
    return Dataset("shapes", transfer.RESOLUTION, list(transfer.SHAPES), train, val, test)


def start_worker(args: argparse.Namespace) -> None:
    configure_torch()
    torch.set_num_threads(args.threads)


def train_piece(job: tuple[str, int, argparse.Namespace]) -> tuple[float, int, float]:
    """One piece's run with one seed: its test accuracy, best epoch and seconds."""
    name, seed, args = job
    data = small_data(args.backbone, args.per_class)
    backbone: dict[str, Any] = {"weights": "none"} if args.backbone == "none" else {
        "weights": args.weights, "unfreeze_depth": 5, "lr": transfer.FINE_TUNE_LR,
        "layer_decay": transfer.FULL_LAYER_DECAY}
    cfg = TrainConfig(data=data.source, resolution=data.resolution, epochs=args.epochs,
                      batch_size=32, seed=seed, **backbone, **PIECES[name])
    start = time.perf_counter()
    result = fit(cfg, data=data, device="cpu")
    return test_accuracy(result, cfg, data), result.best_epoch, time.perf_counter() - start


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=("none", "pretrained"), default="none",
                        help="random weights on digits, or transfer.py's backbone on shapes")
    parser.add_argument("--source-epochs", type=int, default=15,
                        help="epochs of the pretrained backbone")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per piece")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--per-class", type=int, default=30, help="training images a class")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a worker")
    parser.add_argument("--workers", type=int, default=2, help="processes that share the runs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
