"""Record the learning-curve tables that benchmarks/search_replay.py replays: every
configuration of a task's design (benchmarks/replay_table.py) trained by `trainable.fit` (no
Ray) with several seeds for the space's max_epochs, each epoch's val_acc, test_acc and seconds.

    python -m benchmarks.replay_record [--tasks digits_hard,shapes,transfer,transfer_wide]
        [--seeds 3] [--points N] [--workers 2] [--output benchmarks/data] [--limit N]

Tasks (the space file says the ranges, the scheduler and the fixed keys):
- digits_hard (benchmarks/digits_hard.yaml): scikit-learn's digits at 8px, half held out, from
  random weights; lr over four decades of which about one trains, flip and crop that hurt.
- shapes (benchmarks/replay_shapes.yaml): generated shapes from random weights, where flips
  and crops keep the class and augmentation choices matter.
- transfer (benchmarks/replay_transfer.yaml): digits 5-9 fine-tuned from a backbone that
  `fit` trains first on digits 0-4 (benchmarks/transfer.py's source), saved as `resnet-hpo
  train` saves a model; unfreeze depth, layer decay and lr searched.
- transfer_wide (benchmarks/replay_transfer_wide.yaml): the same data and backbone over the
  fine-tuning space a user searches (optimizer, lr, weight decay, layer decay, unfreeze depth,
  warmup, label smoothing, mixup).
A task's design is a grid (levels per float key) or `points` quasi-random configurations plus
the recipes (search/sampling/priors.py); `--points N` records N points for every task instead. Seeds
are 0..seeds-1, one thread a worker. `--limit N` records the first N configurations only (a
smoke run; the table then does not cover the space).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks import transfer
from benchmarks.replay_table import DATA_DIR, grid_values, table_schema
from search.sampling.priors import prior_params
from spaces import DefineByRun, SearchSpace, load_space
from trainable import Dataset, TrainingDiverged, configure_torch, fit
from trainable.data import load_dataset
from trainable.device_images import DeviceImages
from trainable.model_files import MODEL_FILE
from trainable.runtime import Runtime
from trainable.train import evaluate

BENCHMARKS = Path(__file__).resolve().parent
SHAPES_PER_CLASS = 40  # to train, as many to score and as many to test
TRANSFER_PER_CLASS = 30  # to train, as many to score and as many to test
SOURCE_EPOCHS = 15


def digits_hard(space: SearchSpace) -> Dataset:
    cfg = space.config({})
    return load_dataset("digits", cfg.resolution, cfg.val_fraction)


def shapes(space: SearchSpace) -> Dataset:
    classes = tuple(range(len(transfer.SHAPES)))
    pool = transfer.shape_images(3 * SHAPES_PER_CLASS * len(classes), seed=0)
    val, test, train = transfer.per_class_splits(
        pool, classes, [SHAPES_PER_CLASS, SHAPES_PER_CLASS, None], seed=0)
    return Dataset("shapes", space.config({}).resolution, list(transfer.SHAPES), train, val,
                   test)


def transfer_digits(space: SearchSpace) -> Dataset:
    val, train, test, _ = transfer.per_class_splits(
        transfer.all_digits(), transfer.TARGET_DIGITS,
        [TRANSFER_PER_CLASS, TRANSFER_PER_CLASS, TRANSFER_PER_CLASS, None], seed=0)
    return Dataset("digits 5-9", space.config({}).resolution,
                   [str(d) for d in transfer.TARGET_DIGITS], train, val, test)


@dataclass(frozen=True)
class Task:
    space_file: str
    data: Callable[[SearchSpace], Dataset]
    levels: dict[str, int] = field(default_factory=dict)  # a grid of these float levels
    points: int = 0  # else this many quasi-random configurations and the recipes
    backbone: bool = False  # fine-tuned from the digits 0-4 backbone

    def space(self) -> SearchSpace:
        return load_space(str(BENCHMARKS / self.space_file))


TASKS: dict[str, Task] = {
    "digits_hard": Task("digits_hard.yaml", digits_hard, points=64),
    "shapes": Task("replay_shapes.yaml", shapes, points=64),
    "transfer": Task("replay_transfer.yaml", transfer_digits,
                     levels={"lr": 5, "layer_decay": 3}, backbone=True),
    "transfer_wide": Task("replay_transfer_wide.yaml", transfer_digits, points=64,
                          backbone=True),
}


def design(task: Task, space: SearchSpace, data_source: str,
           points: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The configurations to record (as sampled dicts) and the design's metadata."""
    points = points or task.points
    if not points:
        grid = {p.name: grid_values(p, task.levels) for p in space.params}
        combos = [dict(zip(grid, values, strict=True))
                  for values in itertools.product(*grid.values())]
        return combos, {"grid": task.levels}
    recipes = prior_params(space, data_source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.QMCSampler(seed=0, warn_independent_sampling=False)
    # QMC takes its space from the first complete trial: tell each point complete
    study = optuna.create_study(sampler=sampler)
    define, keys = DefineByRun(space), {p.name for p in space.params}
    configs: list[dict[str, Any]] = list(recipes)
    for _ in range(points):
        trial = study.ask()
        configs.append({k: v for k, v in define(trial).items() if k in keys})
        study.tell(trial, 0.0)
    return configs, {"points": points, "recipes": len(recipes)}


_worker: dict[str, Any] = {}  # a worker process's task: its space, data and fixed keys


def start_worker(task: str, fixed: dict[str, Any]) -> None:
    configure_torch()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = TASKS[task].space()
    _worker.update(space=space, data=TASKS[task].data(space), fixed=fixed)


def record_run(job: tuple[dict[str, Any], int]) -> list[dict[str, Any]]:
    """The rows of one configuration's run with one seed: one per epoch, the last NaN if it
    diverged."""
    sampled, seed = job
    space: SearchSpace = _worker["space"]
    data: Dataset = _worker["data"]
    cfg = space.config({**_worker["fixed"], **sampled, "seed": seed})
    rt = Runtime.for_config(cfg, "cpu")
    assert data.test is not None
    test = DeviceImages(data.test, rt.device)
    rows: list[dict[str, Any]] = []

    def test_acc(model: torch.nn.Module) -> dict[str, float]:
        return {"test_acc": evaluate(model, test, rt, cfg.eval_batch_size)[1]}

    def report(metrics: dict[str, float], _: object) -> None:
        rows.append({**sampled, "seed": seed, "epoch": int(metrics["epoch"]),
                     **{k: metrics[k] for k in ("val_acc", "test_acc", "val_loss",
                                                "epoch_time_s")}})

    start = time.perf_counter()
    try:
        fit(cfg, report, data=data, device="cpu", extra_metrics=test_acc)
    except TrainingDiverged:
        spent = time.perf_counter() - start - sum(r["epoch_time_s"] for r in rows)
        rows.append({**sampled, "seed": seed, "epoch": len(rows) + 1, "val_acc": math.nan,
                     "test_acc": math.nan, "val_loss": math.nan, "epoch_time_s": spent})
    return rows


def record(name: str, args: argparse.Namespace, backbone: str | None) -> Path:
    task = TASKS[name]
    space = task.space()
    data = task.data(space)  # decoded into the cache once, before the workers read it
    configs, layout = design(task, space, data.source, args.points)
    configs = configs[:args.limit]
    fixed = {"weights": backbone} if backbone else {}
    jobs = [(config, seed) for config in configs for seed in range(args.seeds)]
    print(f"{name}: {len(configs)} configurations x {args.seeds} seeds x "
          f"{space.scheduler.max_epochs} epochs, {args.workers} workers", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.workers, initializer=start_worker,
                             initargs=(name, fixed)) as pool:
        for i, run_rows in enumerate(pool.map(record_run, jobs), 1):
            rows += run_rows
            if i % max(1, len(jobs) // 10) == 0:
                print(f"  {i}/{len(jobs)} ({time.perf_counter() - start:.0f} s)", flush=True)
    recorded = {"date": time.strftime("%Y-%m-%d"), "device": describe_machine(),
                "torch": torch.__version__, "commit": commit(), "seeds": args.seeds,
                "seconds": round(time.perf_counter() - start), "fixed": fixed and {
                    "weights": "a backbone fit on digits 0-4 for "
                               f"{SOURCE_EPOCHS} epochs (benchmarks/transfer.py pretrain)"}}
    assert data.test is not None
    schema = table_schema(space, name, data.source, data.num_classes, layout, recorded)
    path = Path(args.output) / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
    diverged = sum(1 for r in rows if np.isnan(r["val_acc"]))
    print(f"{name}: {len(rows)} epochs of {len(jobs)} runs ({diverged} diverged) in "
          f"{time.perf_counter() - start:.0f} s; {data.summary()} -> {path}", flush=True)
    return path


def source_backbone(directory: Path, epochs: int) -> str:
    """The transfer tasks' backbone: the one in `directory` if it holds a model, else
    trained there (benchmarks/transfer.py's source, seed 0)."""
    if (directory / MODEL_FILE).exists():
        return str(directory)
    return transfer.pretrain(transfer.all_digits(), directory, epochs, seed=0,
                             check=epochs == SOURCE_EPOCHS)


def describe_machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip()
                     for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), 1 thread a worker"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=BENCHMARKS, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, of: "
                        + ", ".join(TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="training seeds a configuration")
    parser.add_argument("--points", type=int, default=None,
                        help="record N quasi-random configurations (and the recipes) of "
                             "every task instead of its own design")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--output", default=str(DATA_DIR))
    parser.add_argument("--backbone", type=Path, default=None,
                        help="the transfer tasks' backbone directory: reused if it holds a "
                             "model, else trained there (default: a temporary directory)")
    parser.add_argument("--limit", type=int, default=None,
                        help="record only the first N configurations (a smoke run)")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    configure_torch()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-replay-") as tmp:
        os.environ["RESNET_HPO_CACHE"] = str(Path(tmp) / "cache")
        backbone = None
        for name in tasks:
            if TASKS[name].backbone and backbone is None:
                backbone = source_backbone(args.backbone or Path(tmp) / "backbone",
                                           SOURCE_EPOCHS if args.limit is None else 1)
            record(name, args, backbone if TASKS[name].backbone else None)


if __name__ == "__main__":
    main()
