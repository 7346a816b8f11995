"""Record the learning-curve tables that benchmarks/search_replay.py replays: every
configuration of a task's discretised space (benchmarks/replay_table.py) trained by
`trainable.fit` (no Ray) for the space's max_epochs, each epoch's val_acc and seconds.

    python benchmarks/replay_record.py [--tasks digits_hard,shapes,transfer] [--workers 2]
        [--output benchmarks/data] [--limit N]

Tasks (the space file says the ranges, the scheduler and the fixed keys):
- digits_hard (benchmarks/digits_hard.yaml): scikit-learn's digits at 8px, half held out, from
  random weights; lr over four decades of which about one trains, flip and crop that hurt.
- shapes (benchmarks/replay_shapes.yaml): generated shapes from random weights, where flips
  and crops keep the class and augmentation choices matter.
- transfer (benchmarks/replay_transfer.yaml): digits 5-9 fine-tuned from a backbone that
  `fit` trains first on digits 0-4 (benchmarks/transfer.py's source), saved as `resnet-hpo
  train` saves a model; unfreeze depth, layer decay and lr searched.
Each configuration trains with seed 0, one thread a worker. `--limit N` records the first N
configurations only (a smoke run; the table then does not cover the space).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks import transfer
from benchmarks.replay_table import DATA_DIR, Config, grid_values, table_schema
from spaces import SearchSpace, load_space
from trainable import Dataset, TrainConfig, TrainingDiverged, configure_torch, fit, load_dataset

BENCHMARKS = Path(__file__).resolve().parent
SHAPES_PER_CLASS = 40  # to train, and as many to score
TRANSFER_PER_CLASS = 30
SOURCE_EPOCHS = 15


def digits_hard(space: SearchSpace) -> Dataset:
    cfg = space.config({})
    return load_dataset("digits", cfg.resolution, cfg.val_fraction)


def shapes(space: SearchSpace) -> Dataset:
    classes = tuple(range(len(transfer.SHAPES)))
    pool = transfer.shape_images(2 * SHAPES_PER_CLASS * len(classes), seed=0)
    val, train = transfer.per_class_splits(pool, classes, [SHAPES_PER_CLASS, None], seed=0)
    return Dataset("shapes", space.config({}).resolution, list(transfer.SHAPES), train, val,
                   None)


def transfer_digits(space: SearchSpace) -> Dataset:
    val, train = transfer.per_class_splits(
        transfer.all_digits(), transfer.TARGET_DIGITS, [TRANSFER_PER_CLASS, TRANSFER_PER_CLASS],
        seed=0)
    return Dataset("digits 5-9", space.config({}).resolution,
                   [str(d) for d in transfer.TARGET_DIGITS], train, val, None)


# task -> (space file, levels of its float keys, its data)
TASKS: dict[str, tuple[str, dict[str, int], Callable[[SearchSpace], Dataset]]] = {
    "digits_hard": ("digits_hard.yaml", {"lr": 7, "weight_decay": 2, "label_smoothing": 2,
                                         "warmup_epochs": 2}, digits_hard),
    "shapes": ("replay_shapes.yaml", {"lr": 7, "label_smoothing": 2, "mixup_alpha": 2}, shapes),
    "transfer": ("replay_transfer.yaml", {"lr": 7, "layer_decay": 3},
                 transfer_digits),
}

_worker: dict[str, Any] = {}  # a worker process's task: its space, data and fixed keys


def start_worker(task: str, fixed: dict[str, Any]) -> None:
    configure_torch()
    torch.set_num_threads(1)
    space = load_space(str(BENCHMARKS / TASKS[task][0]))
    _worker.update(space=space, data=TASKS[task][2](space), fixed=fixed)


def record_config(sampled: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one configuration: one per epoch, the last NaN if it diverged."""
    space: SearchSpace = _worker["space"]
    cfg = TrainConfig.from_dict({**space.fixed, "epochs": space.scheduler.max_epochs,
                                 **_worker["fixed"], **sampled})
    rows: list[dict[str, Any]] = []

    def report(metrics: dict[str, float], _: object) -> None:
        rows.append({**sampled, "epoch": int(metrics["epoch"]), "val_acc": metrics["val_acc"],
                     "val_loss": metrics["val_loss"], "epoch_time_s": metrics["epoch_time_s"]})

    start = time.perf_counter()
    try:
        fit(cfg, report, data=_worker["data"], device="cpu")
    except TrainingDiverged:
        spent = time.perf_counter() - start - sum(r["epoch_time_s"] for r in rows)
        rows.append({**sampled, "epoch": len(rows) + 1, "val_acc": math.nan,
                     "val_loss": math.nan, "epoch_time_s": spent})
    return rows


def record(task: str, args: argparse.Namespace, backbone: str | None) -> Path:
    space_file, levels, task_data = TASKS[task]
    space = load_space(str(BENCHMARKS / space_file))
    data = task_data(space)  # decoded into the cache once, before the workers read it
    grid = {p.name: grid_values(p, levels) for p in space.params}
    configs: list[Config] = list(itertools.product(*grid.values()))[:args.limit]
    fixed = {"weights": backbone} if backbone else {}
    print(f"{task}: {len(configs)} configurations x {space.scheduler.max_epochs} epochs, "
          f"{args.workers} workers", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.workers, initializer=start_worker,
                             initargs=(task, fixed)) as pool:
        jobs = [dict(zip(grid, config, strict=True)) for config in configs]
        for i, config_rows in enumerate(pool.map(record_config, jobs), 1):
            rows += config_rows
            if i % max(1, len(configs) // 10) == 0:
                print(f"  {i}/{len(configs)} ({time.perf_counter() - start:.0f} s)", flush=True)
    recorded = {"date": time.strftime("%Y-%m-%d"), "device": describe_machine(),
                "torch": torch.__version__, "commit": commit(), "seed": 0,
                "seconds": round(time.perf_counter() - start), "fixed": fixed and {
                    "weights": "a backbone fit on digits 0-4 for "
                               f"{SOURCE_EPOCHS} epochs (benchmarks/transfer.py pretrain)"}}
    schema = table_schema(space, levels, task, data.source, recorded)
    path = Path(args.output) / f"{task}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
    diverged = sum(1 for r in rows if np.isnan(r["val_acc"]))
    print(f"{task}: {len(rows)} epochs of {len(configs)} configurations ({diverged} diverged) "
          f"in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return path


def describe_machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, 1 thread a worker"


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
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--output", default=str(DATA_DIR))
    parser.add_argument("--limit", type=int, default=None,
                        help="record only the first N configurations (a smoke run)")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    configure_torch()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="resnet-hpo-replay-") as tmp:
        os.environ["RESNET_HPO_CACHE"] = str(Path(tmp) / "cache")
        for task in tasks:
            backbone = None
            if task == "transfer":
                backbone = transfer.pretrain(transfer.all_digits(), Path(tmp) / "backbone",
                                             SOURCE_EPOCHS if args.limit is None else 1, seed=0,
                                             check=args.limit is None)
            record(task, args, backbone)


if __name__ == "__main__":
    main()
