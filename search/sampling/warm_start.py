"""`--warm-start RUN`: a new search starts from what an earlier one learned.

The earlier run's best configs (by this search's metric, within this search's epoch budget)
are enqueued, so they are the first trials; a value outside this space's range is clipped
to it, a choice this space lacks is left to the sampler. Its finished trials whose values
all fit this space are added to the study as history, which TPE and GP model from the
start (they count towards TPE's startup trials). Both read trials.parquet and
epochs.parquet of the earlier run, so any finished or interrupted run will do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
import pyarrow as pa
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search.rundir import EPOCHS_FILE, SEARCH_FILE, TRIALS_FILE, RunDir
from spaces import SearchSpace, fits
from trainable import result_keys
from trainable.errors import UserError
from trainable.ranking import best_epoch_row, rank_trials

WARM_START_ATTR = "warm_start"  # a history trial's user attribute: "RUN trial ID"


@dataclass(frozen=True)
class WarmStart:
    run: str  # the earlier run directory, as the user wrote it
    enqueued: list[tuple[str, dict[str, Any]]]  # (earlier trial id, params), best first
    history: list[tuple[str, optuna.trial.FrozenTrial]]  # (earlier trial id, trial)
    adjusted: dict[str, int]  # "lr clipped" -> how many enqueued configs

    def summary(self) -> str:
        """One line, and a second one when values had to change."""
        line = (f"--warm-start {self.run}: its {len(self.enqueued)} best configs first, "
                f"{len(self.history)} of its trials as the sampler's history")
        if self.adjusted:
            line += "\n--warm-start: outside this space: " + ", ".join(
                f"{what} in {n} config{'s' * (n > 1)}" for what, n in self.adjusted.items())
        return line

    def record(self) -> dict[str, Any]:
        """What search.json keeps of it."""
        return {"run": self.run, "enqueued": [trial_id for trial_id, _ in self.enqueued],
                "history": [trial_id for trial_id, _ in self.history],
                "adjusted": self.adjusted}

    def apply(self, study: optuna.Study) -> None:
        study.add_trials([trial for _, trial in self.history])
        for _, params in self.enqueued:
            study.enqueue_trial(params, skip_if_exists=False)


def _read(run: RunDir, name: str) -> list[dict[str, Any]]:
    try:
        return run.read_table(name).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"--warm-start: {run.uri_of(name)} is not readable Parquet ({e})"
                        ) from None


def _clipped(value: float, d: FloatDistribution | IntDistribution) -> float | int:
    """The nearest value of a numeric distribution (on its step grid, if it has one)."""
    inside = min(max(value, d.low), d.high)
    if d.step:
        inside = d.low + round((inside - d.low) / d.step) * d.step
        inside = min(inside, d.high)
    return round(inside) if isinstance(d, IntDistribution) else float(inside)


def _history_params(trial: dict[str, Any], space: SearchSpace
                    ) -> tuple[dict[str, Any], dict[str, BaseDistribution]] | None:
    """The trial's values of the parameters this space would have sampled, as a define-by-run
    trial would record them; None when one of them does not fit."""
    params: dict[str, Any] = {}
    distributions: dict[str, BaseDistribution] = {}
    for p in space.params:
        if not p.active(params):
            continue
        value = trial.get(p.name)
        if value is None or not fits(value, p.distribution):
            return None
        params[p.name], distributions[p.name] = value, p.distribution
    return params, distributions


def enqueued_params(trial: dict[str, Any], space: SearchSpace
                     ) -> tuple[dict[str, Any], list[str]]:
    """The trial's values for this space's parameters, clipped into range, and what was
    changed; a choice this space lacks is left out (the sampler picks it)."""
    params: dict[str, Any] = {}
    changes = []
    for p in space.params:
        value = trial.get(p.name)
        if value is None or not p.active(params):
            continue
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            if fits(value, d):
                params[p.name] = value
            else:
                changes.append(f"{p.name} {value!r} left to the sampler")
            continue
        assert isinstance(d, FloatDistribution | IntDistribution)
        params[p.name] = _clipped(value, d)
        if params[p.name] != value:
            changes.append(f"{p.name} clipped into [{d.low:g}, {d.high:g}]")
    return params, changes


def plan_warm_start(run_uri: str, space: SearchSpace, top: int) -> WarmStart:
    """What a search of `space` takes from the earlier run at `run_uri`: its `top` best
    configs and its finished trials that fit, ranked by this space's metric at the best
    epoch within this space's epoch budget."""
    run = RunDir.open(run_uri)
    for name in (SEARCH_FILE, TRIALS_FILE, EPOCHS_FILE):
        if not run.exists(name):
            raise UserError(f"--warm-start {run_uri}: no {name} there; give the run directory "
                            "of a search (STORAGE/NAME)")
    trials, epochs = _read(run, TRIALS_FILE), _read(run, EPOCHS_FILE)
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for row in epochs:
        if row["epoch"] <= space.scheduler.max_epochs:
            by_trial.setdefault(row["trial_id"], []).append(row)
    scored = []
    for trial in trials:
        best = best_epoch_row(by_trial.get(trial["trial_id"], []), space.metric, space.mode)
        if trial["status"] == result_keys.TERMINATED and best is not None:
            scored.append({**trial, "value": best[space.metric]})
    ranked = rank_trials(scored, "value", space.mode)
    adjusted: dict[str, int] = {}
    enqueued: list[tuple[str, dict[str, Any]]] = []
    for trial in ranked:
        params, changes = enqueued_params(trial, space)
        if len(enqueued) == top or params in [p for _, p in enqueued]:
            continue
        enqueued.append((trial["trial_id"], params))
        for what in changes:
            adjusted[what] = adjusted.get(what, 0) + 1
    history = []
    for trial in ranked:
        fitting = _history_params(trial, space)
        if fitting is not None:
            params, distributions = fitting
            history.append((trial["trial_id"], optuna.trial.create_trial(
                params=params, distributions=distributions, value=trial["value"],
                user_attrs={WARM_START_ATTR: f"{run.uri} trial {trial['trial_id']}"})))
    return WarmStart(run.uri, enqueued, history, adjusted)
