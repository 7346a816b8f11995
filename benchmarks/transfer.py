"""Which fine-tuning strategy for which data: the test accuracy and time of five ways to
train ResNet18 on a target, from a backbone pretrained here, on the CPU.

    python -m benchmarks.transfer [--sizes 10,30,100] [--epochs 12] [--trials 8] [--quick]

No ImageNet weights can be downloaded here, so the source is digits 0-4 at 16px: `fit` from
random weights, saved as `resnet-hpo train` saves a model; its directory is the `weights`
of every pretrained run. Two targets of five classes: `similar`, digits 5-9 (the source's
domain, other classes), and `dissimilar`, shapes (disc, ring, square, triangle, plus) drawn
in random colours, sizes, places and angles on darker noisy coloured backgrounds. Each target has
the same val and test splits (30 images a class) for every training size, and the training
images of a smaller size are among those of a larger one.

Strategies, each a `fit` without crop or flip (so that frozen stages run once), with a fixed
number of epochs, whose best epoch by val_acc is scored on the test split: scratch (random
weights, everything trains), frozen (the backbone's fc only: a linear probe), partial
(layer3, layer4 and fc), full (everything, layer_decay 0.7) and search (unfreeze_depth,
layer_decay and lr by the product's seeded TPE sampler, an Optuna study asked and told
directly, no Ray; the trial with the best val_acc is scored). Everything is seeded: a
rerun on the same machine and thread count prints the same accuracies.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from PIL import Image, ImageDraw

from benchmarks.common import describe_device
from search.sampling.samplers import make_sampler
from trainable import (
    Dataset,
    FitResult,
    Split,
    TrainConfig,
    TrainingDiverged,
    configure_torch,
    fit,
    load_dataset,
)
from trainable.device_images import DeviceImages
from trainable.runtime import Runtime
from trainable.saved import save_model_dir
from trainable.train import evaluate

RESOLUTION = 16
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
SHAPES = ("disc", "ring", "square", "triangle", "plus")
VAL_PER_CLASS = TEST_PER_CLASS = 30
SOURCE_VAL_PER_CLASS = 30
MIN_SOURCE_VAL_ACC = 0.95
BATCH_SIZE = 25  # divides every training size (5 classes x 10, 30, 100): no image is dropped
SCRATCH_LR = 0.1  # from scratch: the quick space's range (0.01..0.3), nothing to keep
PROBE_LR = 0.1  # a linear probe only moves a new fc: a high lr is safe
FINE_TUNE_LR = 0.05  # the default; effective lr 0.5 (momentum 0.9), inside the SGD prior
FULL_LAYER_DECAY = 0.7  # timm's layer-wise decay is 0.75; the shipped spaces search 0.3..1
SEARCH_LR = (0.003, 0.3)  # log; effective 0.03..3 at momentum 0.9: fine-tuning's to scratch's
SEARCH_LAYER_DECAY = (0.3, 1.0)  # the shipped spaces' range
STRATEGIES = ("scratch", "frozen", "partial", "full", "search")


@dataclass
class Outcome:
    test_acc: float
    seconds: float
    chosen: str = ""  # the search's best trial


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_torch()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    print(f"transfer: {describe_device(torch.device('cpu'))}, torch {torch.__version__}, "
          f"{RESOLUTION}px, batch {BATCH_SIZE}, {args.epochs} epochs a run, {args.trials} "
          f"search trials, seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-bench-") as tmp:
        os.environ["RESNET_HPO_CACHE"] = str(Path(tmp) / "cache")
        digits = all_digits()
        backbone = pretrain(digits, Path(tmp) / "backbone", args.source_epochs, args.seed,
                            check=not args.quick)
        shapes = shape_images(len(SHAPES) * (VAL_PER_CLASS + TEST_PER_CLASS + max(args.sizes)),
                              args.seed)
        targets = {"similar": (digits, TARGET_DIGITS, [str(d) for d in TARGET_DIGITS]),
                   "dissimilar": (shapes, tuple(range(len(SHAPES))), list(SHAPES))}
        rows: dict[tuple[str, int], dict[str, Outcome]] = {}
        for name, (images, classes, class_names) in targets.items():
            val, test, train_pool = per_class_splits(
                images, classes, [VAL_PER_CLASS, TEST_PER_CLASS, max(args.sizes)], args.seed)
            for size in args.sizes:
                data = Dataset(name, RESOLUTION, class_names,
                               first_per_class(train_pool, size), val, test)
                rows[name, size] = run_strategies(data, backbone, args)
                print_cell(name, size, rows[name, size])
    print_tables(rows)
    print_lessons(rows, args.sizes)


def pretrain(pool: Split, directory: Path, epochs: int, seed: int, check: bool = True) -> str:
    """The source backbone: digits 0-4 from random weights, saved as `resnet-hpo train`
    saves a model; returns its directory, a `weights` location. `check`: exit unless it
    learned its source (val_acc above MIN_SOURCE_VAL_ACC)."""
    val, train = per_class_splits(pool, SOURCE_CLASSES, [SOURCE_VAL_PER_CLASS, None], seed)
    data = Dataset("digits 0-4", RESOLUTION, [str(d) for d in SOURCE_CLASSES], train, val, None)
    cfg = run_config("digits 0-4", seed, epochs=epochs, weights="none", unfreeze_depth=5,
                     lr=SCRATCH_LR)
    start = time.perf_counter()
    result = fit(cfg, data=data, device="cpu")
    val_acc = result.best["val_acc"]
    save_model_dir(directory, cfg, result.model, {
        "metric": cfg.metric, "best_epoch": result.best_epoch, "best": result.best,
        "test_acc": None, "class_names": data.class_names, "history": result.history})
    print(f"source: {data.summary()}, {epochs} epochs from random weights: "
          f"val_acc {val_acc:.4f} at epoch {result.best_epoch} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    if check and val_acc <= MIN_SOURCE_VAL_ACC:
        raise SystemExit(f"the source backbone reached val_acc {val_acc:.4f}, not above "
                         f"{MIN_SOURCE_VAL_ACC}: raise --source-epochs")
    return str(directory)


def run_config(data: str, seed: int, **values: object) -> TrainConfig:
    return TrainConfig.from_dict({"data": data, "resolution": RESOLUTION, "crop": "none",
                                  "flip": "none", "batch_size": BATCH_SIZE, "seed": seed,
                                  **values})


def run_strategies(data: Dataset, backbone: str,
                   args: argparse.Namespace) -> dict[str, Outcome]:
    def config(**values: object) -> TrainConfig:
        return run_config(data.source, args.seed,
                          **{"weights": backbone, "epochs": args.epochs, **values})

    fixed = {"scratch": config(weights="none", unfreeze_depth=5, lr=SCRATCH_LR),
             "frozen": config(unfreeze_depth=0, lr=PROBE_LR),
             "partial": config(unfreeze_depth=2, lr=FINE_TUNE_LR),
             "full": config(unfreeze_depth=5, lr=FINE_TUNE_LR, layer_decay=FULL_LAYER_DECAY)}
    outcomes = {}
    for strategy, cfg in fixed.items():
        start = time.perf_counter()
        result = fit(cfg, data=data, device="cpu")
        outcomes[strategy] = Outcome(test_accuracy(result, cfg, data),
                                     time.perf_counter() - start)
    outcomes["search"] = search(data, config, args.trials, args.seed)
    return outcomes


def search(data: Dataset, config: Callable[..., TrainConfig], trials: int,
           seed: int) -> Outcome:
    """`trials` fits sampled by the product's TPE sampler; the test accuracy of the trial
    with the best val_acc (the first of equals), and the time of them all."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed, trials))
    best: tuple[float, float, str] = (-math.inf, 0.0, "")
    start = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        cfg = config(unfreeze_depth=trial.suggest_int("unfreeze_depth", 0, 5),
                     layer_decay=trial.suggest_float("layer_decay", *SEARCH_LAYER_DECAY),
                     lr=trial.suggest_float("lr", *SEARCH_LR, log=True))
        try:
            result = fit(cfg, data=data, device="cpu")
        except TrainingDiverged:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        val_acc = result.best["val_acc"]
        study.tell(trial, val_acc)
        if val_acc > best[0]:
            best = (val_acc, test_accuracy(result, cfg, data),
                    f"depth {cfg.unfreeze_depth}, layer_decay {cfg.layer_decay:.2f}, "
                    f"lr {cfg.lr:.3g}")
    return Outcome(best[1], time.perf_counter() - start, best[2])


def test_accuracy(result: FitResult, cfg: TrainConfig, data: Dataset) -> float:
    """As `resnet-hpo train` scores a test split."""
    assert data.test is not None
    rt = Runtime.for_config(cfg, "cpu")
    return evaluate(result.model, DeviceImages(data.test, rt.device), rt, cfg.eval_batch_size)[1]


# --- data ----------------------------------------------------------------------------------

def all_digits() -> Split:
    """scikit-learn's digits as `trainable` decodes them, every split in one."""
    data = load_dataset("digits", RESOLUTION, 0.1)
    parts = [split for split in (data.train, data.val, data.test) if split is not None]
    return Split(np.concatenate([p.images for p in parts]),
                 np.concatenate([p.labels for p in parts]))


def per_class_splits(pool: Split, classes: tuple[int, ...], counts: list[int | None],
                     seed: int) -> list[Split]:
    """Disjoint splits with `counts[i]` images of each of `classes` (None: the rest), drawn
    in a seeded order and labelled by the class's position in `classes`."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for c in classes:
        order = rng.permutation(np.flatnonzero(pool.labels == c))
        rest = len(order) - sum(n for n in counts if n is not None)
        ends = np.cumsum([rest if n is None else n for n in counts])
        if rest < 0 or ends[-1] > len(order):
            raise SystemExit(f"class {c} has {len(order)} images, {ends[-1]} are needed")
        for rows, part in zip(parts, np.split(order, ends[:-1]), strict=True):
            rows.append(part)
    relabel = np.full(int(pool.labels.max()) + 1, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    return [Split(pool.images[idx], relabel[pool.labels[idx]])
            for idx in (np.concatenate(rows) for rows in parts)]


def first_per_class(split: Split, count: int) -> Split:
    """The first `count` images of each class."""
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:count]
                          for c in np.unique(split.labels)])
    return Split(split.images[idx], split.labels[idx])


def shape_images(count: int, seed: int) -> Split:
    """`count` images (classes in turn) of one of SHAPES each: a random colour, size, place
    and angle on a noisy background of a darker random colour, drawn 4x larger and reduced."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int64) % len(SHAPES)
    side = 4 * RESOLUTION
    images = np.empty((count, 3, RESOLUTION, RESOLUTION), dtype=np.uint8)
    for i, label in enumerate(labels):
        # brighter than the background in every channel, as digits are: with a random
        # polarity, 100 images a class trained from scratch stayed at chance (0.25)
        background = rng.uniform(0, 100, 3)
        colour = background + rng.uniform(100, 155, 3)
        canvas = Image.new("RGB", (side, side), tuple(int(v) for v in background))
        radius = rng.uniform(0.3, 0.45) * side
        centre = rng.uniform(radius, side - radius, 2)
        draw_shape(ImageDraw.Draw(canvas), SHAPES[label], centre, radius,
                   rng.uniform(0, 2 * np.pi), tuple(int(v) for v in colour))
        small = np.asarray(canvas.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX),
                           dtype=np.float64)
        noisy = small + rng.normal(0, 8, small.shape)
        images[i] = np.clip(noisy, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return Split(images, labels)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: np.ndarray, radius: float,
               angle: float, colour: tuple[int, ...]) -> None:
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, round(radius / 3)))
    elif shape == "plus":
        arm = radius / 3
        for turn in (0.0, np.pi / 2):
            draw.polygon(rotated([(-radius, -arm), (radius, -arm), (radius, arm), (-radius, arm)],
                                 angle + turn, centre), fill=colour)
    else:
        corners = 4 if shape == "square" else 3
        draw.regular_polygon((x, y, radius), corners, rotation=np.degrees(angle), fill=colour)


def rotated(points: list[tuple[float, float]], angle: float,
            centre: np.ndarray) -> list[tuple[float, float]]:
    cos, sin = np.cos(angle), np.sin(angle)
    return [(centre[0] + px * cos - py * sin, centre[1] + px * sin + py * cos)
            for px, py in points]


# --- report --------------------------------------------------------------------------------

def print_cell(target: str, size: int, outcomes: dict[str, Outcome]) -> None:
    print(f"  {target} {size}/class: " + ", ".join(
        f"{s} {o.test_acc:.4f} ({o.seconds:.0f} s)" for s, o in outcomes.items())
        + f"; search chose {outcomes['search'].chosen}", flush=True)


def print_tables(rows: dict[tuple[str, int], dict[str, Outcome]]) -> None:
    header = f"{'target':<11} {'per class':>9}" + "".join(f" {s:>8}" for s in STRATEGIES)
    for title, cell in (("test accuracy (the best epoch by val_acc; search: the trial with "
                         "the best val_acc)", lambda o: f"{o.test_acc:.4f}"),
                        ("wall seconds (search: all its trials)", lambda o: f"{o.seconds:.1f}")):
        print(f"\n{title}\n{header}")
        for (target, size), outcomes in rows.items():
            print(f"{target:<11} {size:>9}" + "".join(f" {cell(outcomes[s]):>8}"
                                                     for s in STRATEGIES))


def print_lessons(rows: dict[tuple[str, int], dict[str, Outcome]], sizes: list[int]) -> None:
    """What the numbers say, computed from them."""
    print("\nwhat it teaches:")
    fixed = STRATEGIES[:-1]
    for target in dict.fromkeys(t for t, _ in rows):
        cells = [rows[target, size] for size in sizes]
        winners = ["/".join(s for s in STRATEGIES if o[s].test_acc == max(
            o[s].test_acc for s in STRATEGIES)) for o in cells]
        gains = [max(o[s].test_acc for s in fixed[1:]) - o["scratch"].test_acc for o in cells]
        probe_gap = [o["frozen"].test_acc - o["full"].test_acc for o in cells]
        print(f"  {target}: best " + ", ".join(f"{w} at {n}/class" for w, n in
                                               zip(winners, sizes, strict=True)))
        print(f"  {target}: the best pretrained fixed strategy minus scratch: " + ", ".join(
            f"{g:+.4f} at {n}/class" for g, n in zip(gains, sizes, strict=True)))
        print(f"  {target}: frozen (linear probe) minus full fine-tuning: " + ", ".join(
            f"{g:+.4f} at {n}/class" for g, n in zip(probe_gap, sizes, strict=True)))
    outcomes = list(rows.values())
    matched = sum(o["search"].test_acc >= max(o[s].test_acc for s in fixed) for o in outcomes)
    cost = (sum(o["search"].seconds for o in outcomes)
            / sum(o[s].seconds for o in outcomes for s in fixed))
    print(f"  the search matched or beat every fixed strategy in {matched} of {len(outcomes)} "
          f"cells, taking {cost:.2f}x the time of the four fixed strategies together")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,30,100",
                        help="training images a class, comma-separated (at most 100)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every target run")
    parser.add_argument("--source-epochs", type=int, default=15,
                        help="epochs of the source backbone")
    parser.add_argument("--trials", type=int, default=8, help="trials of each search")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; more than one "
                        "on a busy machine is far slower (each small operation waits for "
                        "every core)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 images a "
                        "class, 2 epochs (the source's too), 2 search trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.epochs, args.source_epochs, args.trials = "10", 2, 2, 2
    args.sizes = sorted({int(n) for n in args.sizes.split(",")})
    return args


if __name__ == "__main__":
    main()
