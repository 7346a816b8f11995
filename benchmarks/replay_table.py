"""Learning-curve tables (benchmarks/data/TASK.parquet): the format that
benchmarks/replay_record.py writes and benchmarks/search_replay.py replays.

A task is a space file (a space as `resnet-hpo search` reads it) and its data. Its table holds
a set of configurations of that space, each trained by `trainable.fit` with several seeds: one
row per configuration, seed and epoch with the searched keys (null where a `when:` condition
leaves a key out), `seed`, `epoch`, `val_acc`, `test_acc` (the epoch's weights scored on a
split that no search selects on), `val_loss` and `epoch_time_s`. A run whose training
diverged ends in a row with val_acc NaN.

The configurations are a design (`design` in the metadata): `grid` is every combination of
the space's keys discretised (a float key into `levels[key]` values from low to high, evenly
spaced, in log space where the space says log; an int and a categorical key into all their
values); `points` is N quasi-random configurations (Optuna's QMC sampler) plus the recipes a
new search tries first (search/sampling/priors.py). A configuration a sampler draws is
replayed as the nearest recorded one: the L1 distance over the searched keys, each scaled to
[0, 1] over its range (in log space for a log key), a categorical key 0 when equal else 1, a
key active in one and inactive in the other 1. On a grid that is the nearest grid value of
every key.

What a search hands over is a configuration, retrained: `Table.handed_over(i)` is the mean
over the recorded seeds of each run's test_acc at its best epoch by val_acc (what `resnet-hpo
train --config best.yaml` keeps and scores), chance accuracy for a run that diverged before
any epoch scored. The schema's metadata holds the space file's text, the design and how the
table was recorded (date, CPU, commit), so that a table replays without its recorder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq

from spaces import Param, SearchSpace, parse_space

DATA_DIR = Path(__file__).resolve().parent / "data"
CURVE_COLUMNS = ("epoch", "val_acc", "test_acc", "val_loss", "epoch_time_s")
Config = tuple[Any, ...]  # one value per searched key in the space's order; None: inactive


def grid_values(param: Param, levels: dict[str, int]) -> list[Any]:
    d = param.distribution
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, optuna.distributions.IntDistribution):
        return list(range(d.low, d.high + 1, d.step))
    assert isinstance(d, optuna.distributions.FloatDistribution)
    if param.name not in levels:
        raise SystemExit(f"float key {param.name!r} needs a number of levels")
    if d.log:
        return [float(v) for v in np.geomspace(d.low, d.high, levels[param.name])]
    return [float(v) for v in np.linspace(d.low, d.high, levels[param.name])]


def config_of(space: SearchSpace, sampled: dict[str, Any]) -> Config:
    return tuple(sampled.get(p.name) for p in space.params)


@dataclass
class Curve:
    """One seed's run of one configuration; a NaN last val_acc: diverged in that epoch."""
    val_acc: np.ndarray
    test_acc: np.ndarray
    epoch_time_s: np.ndarray

    @property
    def diverged(self) -> bool:
        return bool(np.isnan(self.val_acc[-1]))

    @property
    def best_epoch(self) -> int | None:
        """The index of the best val_acc (the earliest of equals), None if none is finite."""
        if np.all(np.isnan(self.val_acc)):
            return None
        return int(np.nanargmax(self.val_acc))


def retrained_score(runs: list[Curve], num_classes: int) -> float:
    """A configuration's test_acc as retrained: the mean over its runs of the test_acc at
    each run's best epoch by val_acc; chance for a run with no scored epoch."""
    return float(np.mean([1.0 / num_classes if c.best_epoch is None
                          else float(c.test_acc[c.best_epoch]) for c in runs]))


@dataclass
class Table:
    task: str
    data: str  # the source the task trains on, as `auto` flip and crop read it
    space: SearchSpace
    design: dict[str, Any]
    num_classes: int
    recorded: dict[str, Any]
    configs: list[Config]
    runs: list[list[Curve]]  # per configuration, one curve per recorded seed

    @cached_property
    def _coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """(scaled numeric keys, categorical keys as choice indices); NaN / -1: inactive."""
        numeric = np.full((len(self.configs), len(self.space.params)), np.nan)
        choices = np.full((len(self.configs), len(self.space.params)), -1)
        for i, config in enumerate(self.configs):
            numeric[i], choices[i] = self._coordinate(config)
        return numeric, choices

    def _coordinate(self, config: Config) -> tuple[np.ndarray, np.ndarray]:
        numeric = np.full(len(config), np.nan)
        choices = np.full(len(config), -1)
        for k, (param, value) in enumerate(zip(self.space.params, config, strict=True)):
            d = param.distribution
            if value is None:
                continue
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                choices[k] = d.choices.index(value)
            else:
                assert isinstance(d, optuna.distributions.FloatDistribution
                                  | optuna.distributions.IntDistribution)
                scale = math.log if d.log else float
                span = scale(d.high) - scale(d.low)
                numeric[k] = (scale(value) - scale(d.low)) / span if span else 0.0
        return numeric, choices

    def nearest(self, sampled: dict[str, Any]) -> int:
        """The index of the recorded configuration nearest to a sampled one."""
        numeric, choices = self._coordinates
        x, c = self._coordinate(config_of(self.space, sampled))
        active, x_active = ~np.isnan(numeric), ~np.isnan(x)
        gap = np.where(active & x_active, np.abs(numeric - x), 0.0)
        gap += active != x_active
        is_categorical = (choices >= 0) | (c >= 0)
        gap = np.where(is_categorical, (choices != c).astype(float), gap)
        return int(np.argmin(gap.sum(axis=1)))

    @cached_property
    def handed_over_scores(self) -> np.ndarray:
        return np.array([retrained_score(runs, self.num_classes) for runs in self.runs])

    def handed_over(self, index: int) -> float:
        """What configuration `index`, retrained, scores on the test split: the mean over the
        recorded seeds."""
        return float(self.handed_over_scores[index])

    @property
    def seeds(self) -> int:
        return min(len(runs) for runs in self.runs)


def table_schema(space: SearchSpace, task: str, data: str, num_classes: int,
                 design: dict[str, Any], recorded: dict[str, Any]) -> pa.Schema:
    types = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
    fields = []
    for p in space.params:
        d = p.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            fields.append(pa.field(p.name, types[type(d.choices[0])]))
        elif isinstance(d, optuna.distributions.IntDistribution):
            fields.append(pa.field(p.name, pa.int64()))
        else:
            fields.append(pa.field(p.name, pa.float64()))
    fields += [pa.field("seed", pa.int64()), pa.field("epoch", pa.int64())]
    fields += [pa.field(c, pa.float64()) for c in CURVE_COLUMNS[1:]]
    meta = {"task": task, "data": data, "num_classes": num_classes, "space_text": space.text,
            "space_source": space.source, "design": design, "recorded": recorded}
    return pa.schema(fields, metadata={"replay": json.dumps(meta)})


def read_table(path: Path) -> Table:
    arrow = pq.read_table(path)
    meta = json.loads(arrow.schema.metadata[b"replay"])
    space = parse_space(meta["space_text"], meta["space_source"])
    keys = [p.name for p in space.params]
    columns = arrow.to_pydict()
    rows: dict[Config, dict[int, list[tuple[int, float, float, float]]]] = {}
    for i in range(arrow.num_rows):
        config = tuple(columns[k][i] for k in keys)
        rows.setdefault(config, {}).setdefault(columns["seed"][i], []).append(
            (columns["epoch"][i], columns["val_acc"][i], columns["test_acc"][i],
             columns["epoch_time_s"][i]))
    configs, runs = [], []
    for config, seeds in rows.items():
        configs.append(config)
        curves = []
        for seed in sorted(seeds):
            epochs = sorted(seeds[seed])
            curves.append(Curve(*(np.array([e[k] for e in epochs], dtype=float)
                                  for k in (1, 2, 3))))
        runs.append(curves)
    return Table(meta["task"], meta["data"], space, meta["design"], meta["num_classes"],
                 meta["recorded"], configs, runs)
