"""Learning-curve tables (benchmarks/data/TASK.parquet): the format that
benchmarks/replay_record.py writes and benchmarks/search_replay.py replays.

A task's space file (a space as `resnet-hpo search` reads it) is discretised: a float key
into `levels[key]` values from low to high (evenly spaced, in log space where the space says
log), an int key and a categorical key into all their values. The table holds one row per
configuration of that grid and epoch: the grid keys, `epoch` (1..max_epochs), `val_acc`,
`val_loss` and `epoch_time_s`. A configuration whose training diverged ends in a row with
val_acc NaN. A value a sampler draws is snapped to the nearest grid value (in log space for
a log key), so every point a sampler can ask for is in the table. The schema's metadata holds
the space file's text and the levels, so that a table replays without its recorder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq

from spaces import Param, SearchSpace, parse_space

DATA_DIR = Path(__file__).resolve().parent / "data"
CURVE_COLUMNS = ("epoch", "val_acc", "val_loss", "epoch_time_s")
Config = tuple[Any, ...]  # one value per searched key, in the space's order


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


def snap(param: Param, value: Any, values: list[Any]) -> Any:
    """The grid value nearest to a sampled one."""
    if isinstance(param.distribution, optuna.distributions.CategoricalDistribution):
        return value
    log = getattr(param.distribution, "log", False)
    def distance(v: Any) -> float:
        return abs(math.log(v) - math.log(value)) if log else abs(v - value)
    return min(values, key=distance)


@dataclass
class Curve:
    val_acc: np.ndarray  # one per epoch run; a NaN last value: diverged in that epoch
    epoch_time_s: np.ndarray

    @property
    def diverged(self) -> bool:
        return bool(np.isnan(self.val_acc[-1]))


@dataclass
class Table:
    task: str
    data: str  # the source the task trains on, as `auto` flip and crop read it
    space: SearchSpace
    levels: dict[str, int]
    curves: dict[Config, Curve]

    @property
    def grid(self) -> dict[str, list[Any]]:
        return {p.name: grid_values(p, self.levels) for p in self.space.params}

    def config_of(self, sampled: dict[str, Any]) -> Config:
        grid = self.grid
        return tuple(snap(p, sampled[p.name], grid[p.name]) for p in self.space.params)


def table_schema(space: SearchSpace, levels: dict[str, int], task: str, data: str,
                 recorded: dict[str, Any]) -> pa.Schema:
    types = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
    fields = [pa.field(p.name, types[type(grid_values(p, levels)[0])]) for p in space.params]
    fields += [pa.field("epoch", pa.int64())] + [pa.field(c, pa.float64())
                                                 for c in CURVE_COLUMNS[1:]]
    meta = {"task": task, "data": data, "space_text": space.text, "space_source": space.source,
            "levels": levels, "recorded": recorded}
    return pa.schema(fields, metadata={"replay": json.dumps(meta)})


def read_table(path: Path) -> Table:
    arrow = pq.read_table(path)
    meta = json.loads(arrow.schema.metadata[b"replay"])
    space = parse_space(meta["space_text"], meta["space_source"])
    keys = [p.name for p in space.params]
    columns = arrow.to_pydict()
    rows: dict[Config, list[tuple[int, float, float]]] = {}
    for i in range(arrow.num_rows):
        config = tuple(columns[k][i] for k in keys)
        rows.setdefault(config, []).append(
            (columns["epoch"][i], columns["val_acc"][i], columns["epoch_time_s"][i]))
    curves = {}
    for config, epochs in rows.items():
        epochs.sort()
        curves[config] = Curve(np.array([e[1] for e in epochs], dtype=float),
                               np.array([e[2] for e in epochs], dtype=float))
    return Table(meta["task"], meta["data"], space, meta["levels"], curves)
