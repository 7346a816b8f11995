"""What a search searched: its hyperparameters with their distributions, and the values a
trial used of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search.rundir import SEARCH_FILE, SearchRun, Trial
from spaces.space import Param, fits, parse_space
from trainable.config import field_names
from trainable.errors import UserError


def searched_params(run: SearchRun) -> list[Param]:
    """The searched hyperparameters with their distributions from the space in search.json;
    without it, the config columns that vary, with distributions spanning their values."""
    names = run.info.get("searched") or varying_columns(run.trials)
    from_space = {p.name: p for p in space_params(run)}
    return [from_space.get(name) or inferred_param(name, [t[name] for t in run.trials])
            for name in names if name in field_names()]


def space_params(run: SearchRun) -> list[Param]:
    text = run.info.get("space_text")
    if not text:
        return []
    try:
        return list(parse_space(text, run.rundir.uri_of(SEARCH_FILE)).params)
    except UserError:  # a space from another version; fall back to the recorded values
        return []


def varying_columns(trials: list[Trial]) -> list[str]:
    return [name for name in field_names()
            if len({t.get(name) for t in trials if t.get(name) is not None}) > 1]


def inferred_param(name: str, values: list[Any]) -> Param:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        if all(isinstance(v, int) for v in present):
            return Param(name, IntDistribution(min(present), max(present)))
        return Param(name, FloatDistribution(min(present), max(present)))
    return Param(name, CategoricalDistribution(sorted(set(present), key=str)))


def active_values(trial: Trial, params: Sequence[Param]) -> dict[str, Any]:
    """The trial's values of the searched parameters it used (conditions met, in range)."""
    values: dict[str, Any] = {}
    for param in params:
        value = trial.get(param.name)
        if value is not None and param.active(values) and fits(value, param.distribution):
            values[param.name] = value
    return values


def format_value(value: Any) -> str:
    """A hyperparameter value as the table and the plots' axes show it."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
