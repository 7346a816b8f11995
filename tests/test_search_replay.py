"""benchmarks/search_replay.py on a tiny table made here: it runs, prints its verdict, gives
the same numbers for the same seeds, and its ASHA decides as Ray's."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import search_replay
from benchmarks.replay_table import read_table, table_schema
from spaces import Scheduler, parse_space

SPACE = """\
metric: val_acc
mode: max
sampler: tpe
scheduler: {name: asha, max_epochs: 4, grace_period: 1, reduction_factor: 2}
fixed: {resolution: 8, weights: none, unfreeze_depth: 5, batch_size: 32}
search:
  lr:   {type: float, low: 1.0e-3, high: 1.0, log: true}
  flip: {type: categorical, choices: [horizontal, none]}
  crop: {type: categorical, choices: [pad, none]}
"""
LEVELS = {"lr": 4}


def write_tiny_table(path: Path) -> Path:
    """Curves that rise towards a peak at lr 0.1 with flip none and crop pad; the lr-1.0
    configurations with flip horizontal diverge in their second epoch."""
    space = parse_space(SPACE, "tiny.yaml")
    rows = []
    for lr, flip, crop in itertools.product(np.geomspace(1e-3, 1.0, 4).tolist(),
                                            ["horizontal", "none"], ["pad", "none"]):
        final = 0.9 - 0.2 * abs(np.log10(lr) + 1) - 0.1 * (flip == "horizontal") \
            - 0.05 * (crop == "none")
        for epoch in range(1, 5):
            diverged = lr == 1.0 and flip == "horizontal" and epoch == 2
            rows.append({"lr": lr, "flip": flip, "crop": crop, "epoch": epoch,
                         "val_acc": np.nan if diverged else final * epoch / 4,
                         "val_loss": np.nan if diverged else 1.0 / epoch,
                         "epoch_time_s": 1.0 + 0.1 * epoch})
            if diverged:
                break
    schema = table_schema(space, LEVELS, "tiny", "shapes", {"date": "test"})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_a_table_reads_back_with_every_grid_point_and_snaps_samples_to_it(
        tmp_path: Path) -> None:
    table = read_table(write_tiny_table(tmp_path / "tiny.parquet"))
    assert len(table.curves) == 4 * 2 * 2
    assert table.config_of({"lr": 0.09, "flip": "none", "crop": "pad"}) == (0.1, "none", "pad")
    diverged = table.curves[(1.0, "horizontal", "pad")]
    assert diverged.diverged and len(diverged.val_acc) == 2
    assert not table.curves[(1.0, "none", "pad")].diverged


def test_replay_prints_the_verdict_and_repeats_its_numbers_from_the_seeds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tables = tmp_path / "tables"
    tables.mkdir()
    write_tiny_table(tables / "tiny.parquet")
    argv = ["--tables", str(tables), "--budgets", "4,8", "--seeds", "3", "--workers", "1"]
    search_replay.main(argv)
    first = capsys.readouterr().out
    search_replay.main(argv)
    assert capsys.readouterr().out == first
    lines = first.strip().splitlines()
    assert re.fullmatch(r"default >= random\+asha at every budget on [01] of 1 tasks; "
                        r">= random\+asha at 2x trials on [01] of 1 tasks", lines[-1])
    for name in [*search_replay.STRATEGIES, *search_replay.BASELINES]:
        assert any(line.split()[:1] == [name] for line in lines), name
    recipe = next(line for line in lines if line.split()[:1] == ["recipe"])
    assert recipe.split()[1] == "0.800"  # lr 0.05 snaps to 0.1; auto: flip (not digits), pad


def test_replay_counts_every_epoch_and_asha_stops_some(tmp_path: Path) -> None:
    table = read_table(write_tiny_table(tmp_path / "tiny.parquet"))
    fifo = search_replay.replay(table, search_replay.STRATEGIES["random+fifo"], 8, 0, 2)
    asha = search_replay.replay(table, search_replay.STRATEGIES["random+asha"], 8, 0, 2)
    assert asha.epochs < fifo.epochs <= 8 * 4
    assert fifo.seconds > 0 and 0 < fifo.best <= 0.9


def test_asha_decides_as_rays_asha_scheduler() -> None:
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = Scheduler("asha", max_epochs=9, grace_period=1, reduction_factor=3)
    ours = search_replay.Asha(scheduler)
    rays = ASHAScheduler(time_attr="epoch", metric="best_val_acc", mode="max", max_t=9,
                         grace_period=1, reduction_factor=3)
    rng = np.random.default_rng(0)
    # Ray's scheduler reads only a trial's id and the result: stand-ins for its Trial and
    # controller
    controller: Any = None
    running: dict[str, Any] = {f"t{i}": SimpleNamespace(trial_id=f"t{i}", epoch=0)
                               for i in range(12)}
    for trial in running.values():
        rays.on_trial_add(controller, trial)
    decisions = 0
    while running:
        trial = running[rng.choice(sorted(running))]
        trial.epoch += 1
        value = float(rng.uniform())
        stop = ours.stops(trial.trial_id, trial.epoch, value)
        ray_action = rays.on_trial_result(controller, trial, {"epoch": trial.epoch,
                                                        "best_val_acc": value})
        assert stop == (ray_action == TrialScheduler.STOP), (trial.trial_id, trial.epoch)
        decisions += 1
        if stop:
            del running[trial.trial_id]
    assert decisions > 12
