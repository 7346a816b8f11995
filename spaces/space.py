"""Search-space files: load, validate against TrainConfig, and sample with Optuna.

A space file is checked completely (names, types, ranges, conditions, sampler and scheduler)
before Ray starts, and every error is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from trainable.config import (
    DEFAULT_METRIC,
    TrainConfig,
    cast_value,
    field_names,
    field_type,
    read_yaml_mapping,
    unknown_key_message,
)
from trainable.errors import UserError
from trainable.ranking import METRIC_MODES, metric_mode

SHIPPED_DIR = Path(__file__).parent
SAMPLERS = ("tpe", "cmaes", "random", "qmc", "gp")
# At the budgets users run (8-32 trials), random search with the guides' recipes first
# (search/sampling/priors.py) handed over models as good as or better than TPE's on the replay's
# noisy tables (README: How the default search spends its trials).
DEFAULT_SAMPLER = "random"
SCHEDULERS = ("asha", "fifo")
TOP_KEYS = ("metric", "mode", "sampler", "scheduler", "fixed", "search", "resources")
SCHEDULER_KEYS = {"name": str, "max_epochs": int, "grace_period": int, "reduction_factor": float}
RESOURCE_KEYS = {"gpus_per_trial": float, "cpus_per_trial": float, "max_concurrent": int}
PARAM_KEYS = {"float": {"type", "low", "high", "log", "step", "when"},
              "int": {"type", "low", "high", "log", "step", "when"},
              "categorical": {"type", "choices", "when"}}


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig key and its distribution; `when` maps keys to allowed values."""
    name: str
    distribution: optuna.distributions.BaseDistribution
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def active(self, sampled: dict[str, Any]) -> bool:
        return all(key in sampled and sampled[key] in allowed
                   for key, allowed in self.when.items())


@dataclass(frozen=True)
class Scheduler:
    name: str = "asha"
    max_epochs: int = 10
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class SearchSpace:
    source: str  # the file it came from, for messages and the run's metadata
    text: str
    sampler: str = DEFAULT_SAMPLER
    scheduler: Scheduler = Scheduler()
    fixed: dict[str, Any] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The search metric: a config key (`metric`) of every trial, so that `fit`, the
        results and best.yaml all rank epochs by it."""
        return str(self.fixed.get("metric", DEFAULT_METRIC))

    @property
    def mode(self) -> str:
        return metric_mode(self.metric)

    def replace(self, *, sampler: str | None = None, scheduler: dict[str, Any] | None = None,
                fixed: dict[str, Any] | None = None) -> SearchSpace:
        """A copy with command-line overrides, validated like the file itself. A fixed value
        replaces a searched one; parameters conditioned on it stay only if it meets them."""
        changes: dict[str, Any] = {}
        if sampler is not None:
            _check_choice(self.source, "sampler", sampler, SAMPLERS)
            changes["sampler"] = sampler
        sched = self.scheduler
        if scheduler:
            sched = changes["scheduler"] = _scheduler(
                self.source, {**dataclasses.asdict(self.scheduler), **scheduler})
        if fixed:
            merged = _fixed("flags", {**self.fixed, **fixed}, sched)
            params = []
            for p in self.params:
                if p.name in merged:
                    continue
                pinned = {k: v for k, v in p.when.items() if k in merged}
                if all(merged[k] in allowed for k, allowed in pinned.items()):
                    params.append(dataclasses.replace(
                        p, when={k: v for k, v in p.when.items() if k not in pinned}))
            changes.update(fixed=merged, params=tuple(params))
        return dataclasses.replace(self, **changes)

    @property
    def decode_resolution(self) -> int:
        """The side length the data is decoded at, once for the whole search: the largest
        resolution a trial can ask for. Trials at a smaller one resize on their device."""
        base = self.config({}).resolution
        for p in self.params:
            if p.name == "resolution":
                d = p.distribution
                if isinstance(d, optuna.distributions.IntDistribution):
                    largest = d.high
                else:
                    assert isinstance(d, optuna.distributions.CategoricalDistribution)
                    largest = max(TrainConfig.from_dict({"resolution": choice}).resolution
                                  for choice in d.choices)
                # a trial whose `when:` leaves resolution out gets TrainConfig's default
                return max(largest, base) if p.when else largest
        return base

    def config(self, sampled: dict[str, Any]) -> TrainConfig:
        """The full TrainConfig of a trial: defaults, then fixed values, then the sample."""
        return TrainConfig.from_dict(trial_values(self.fixed, self.scheduler, sampled))


def fits(value: Any, d: optuna.distributions.BaseDistribution) -> bool:
    """Whether the value lies in the distribution as Optuna checks it: one of its choices, or
    a number in its range on its step grid."""
    try:
        internal = d.to_internal_repr(value)  # ValueError: no choice, no number, NaN, <= 0 on log
    except (TypeError, ValueError):
        return False
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return True
    assert isinstance(d, optuna.distributions.FloatDistribution
                      | optuna.distributions.IntDistribution)
    if not d.low <= internal <= d.high:
        return False
    if isinstance(d, optuna.distributions.IntDistribution):
        return (internal - d.low) % d.step == 0
    if d.step is None:
        return True
    steps = (internal - d.low) / d.step
    return abs(steps - round(steps)) < 1e-8  # Optuna's tolerance on a float step grid


def trial_values(fixed: dict[str, Any], scheduler: Scheduler,
                 sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's config values over TrainConfig's defaults: the fixed ones, its epochs (the
    scheduler's max_epochs), then what the sampler drew."""
    return {**fixed, "epochs": scheduler.max_epochs, **sampled}


class DefineByRun:
    """Optuna define-by-run function for the searcher (search/run/study_search.py): samples the
    active parameters of a trial and returns the fixed values with them.

    A class, not a closure, so that Tune can pickle it into the experiment state and
    `--resume` can restore the search.
    """

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        sampled: dict[str, Any] = {}
        for param in self.space.params:  # ordered so that conditions come first
            if param.active(sampled):
                sampled[param.name] = _suggest(trial, param)
        return trial_values(self.space.fixed, self.space.scheduler, sampled)


def _suggest(trial: optuna.Trial, param: Param) -> Any:
    d = param.distribution
    if isinstance(d, optuna.distributions.FloatDistribution):
        return trial.suggest_float(param.name, d.low, d.high, log=d.log, step=d.step)
    if isinstance(d, optuna.distributions.IntDistribution):
        return trial.suggest_int(param.name, d.low, d.high, log=d.log, step=d.step)
    assert isinstance(d, optuna.distributions.CategoricalDistribution)
    return trial.suggest_categorical(param.name, d.choices)


def resolve_space_path(name_or_path: str) -> Path:
    """`quick` -> the shipped spaces/quick.yaml; anything with a suffix or a slash is a path."""
    path = Path(name_or_path)
    if path.suffix or "/" in name_or_path or path.exists():
        return path
    shipped = SHIPPED_DIR / f"{name_or_path}.yaml"
    if not shipped.exists():
        names = ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")))
        raise UserError(f"--space {name_or_path}: no such shipped space; use one of {names} "
                        "or a path to a YAML file")
    return shipped


def load_space(name_or_path: str) -> SearchSpace:
    path = resolve_space_path(name_or_path)
    read_yaml_mapping(path)  # one clear line for a missing or unreadable file
    return parse_space(path.read_text(), str(path))


def parse_space(text: str, src: str) -> SearchSpace:
    """A space from its YAML text (e.g. the copy in a run's search.json); `src` names it."""
    try:
        values = _mapping(src, "the file", yaml.safe_load(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{src}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}"
                        ) from None
    for key in values:
        if key not in TOP_KEYS:
            raise UserError(f"{src}: unknown key '{key}'; allowed: {', '.join(TOP_KEYS)}")
    metric = values.get("metric", DEFAULT_METRIC)
    _check_choice(src, "metric", metric, tuple(METRIC_MODES))
    if values.get("mode", metric_mode(metric)) != metric_mode(metric):
        raise UserError(f"{src}: key 'mode' must be {metric_mode(metric)} for metric {metric} "
                        "(or left out)")
    sampler = values.get("sampler", DEFAULT_SAMPLER)
    _check_choice(src, "sampler", sampler, SAMPLERS)
    scheduler = _scheduler(src, _mapping(src, "scheduler", values.get("scheduler", {})))
    fixed = _mapping(src, "fixed", values.get("fixed", {}))
    if fixed.get("metric", metric) != metric:
        raise UserError(f"{src}: key 'fixed.metric' ({fixed['metric']}) differs from 'metric' "
                        f"({metric}); keep one")
    fixed = _fixed(src, {**fixed, "metric": metric}, scheduler)
    search = _mapping(src, "search", values.get("search", {}))
    params = _order(src, [_param(src, name, spec, fixed) for name, spec in search.items()])
    for param in params:
        if param.name in fixed:
            raise UserError(f"{src}: key 'search.{param.name}' is also in 'fixed'; keep one")
    resources = _typed_mapping(src, "resources", values.get("resources", {}), RESOURCE_KEYS)
    return SearchSpace(src, text, sampler, scheduler, fixed, tuple(params), resources)


def _mapping(src: str, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{src}: key '{key}' must be a mapping, got {type(value).__name__}")
    return value


def _check_choice(src: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{src}: key '{key}' must be one of {', '.join(allowed)}, got {value!r}")


def _typed_mapping(src: str, key: str, value: Any, types: dict[str, type]) -> dict[str, Any]:
    out = {}
    for name, item in _mapping(src, key, value).items():
        if name not in types:
            raise UserError(f"{src}: unknown key '{key}.{name}'; allowed: {', '.join(types)}")
        try:
            number = types[name](item)
            if isinstance(item, bool) or (types[name] is not str and number < 0):
                raise ValueError
        except (TypeError, ValueError):
            kind = {str: "a string", int: "an integer >= 0", float: "a number >= 0"}[types[name]]
            raise UserError(f"{src}: key '{key}.{name}' must be {kind}, got {item!r}") from None
        out[name] = number
    return out


def _scheduler(src: str, values: dict[str, Any]) -> Scheduler:
    values = _typed_mapping(src, "scheduler", values, SCHEDULER_KEYS)
    scheduler = Scheduler(**values)
    _check_choice(src, "scheduler.name", scheduler.name, SCHEDULERS)
    for name in ("max_epochs", "grace_period"):
        if getattr(scheduler, name) < 1:
            raise UserError(f"{src}: key 'scheduler.{name}' must be >= 1, "
                            f"got {getattr(scheduler, name)}")
    if scheduler.reduction_factor <= 1:
        raise UserError(f"{src}: key 'scheduler.reduction_factor' must be > 1, "
                        f"got {scheduler.reduction_factor}")
    if scheduler.grace_period > scheduler.max_epochs:
        raise UserError(f"{src}: key 'scheduler.grace_period' ({scheduler.grace_period}) must "
                        f"be <= scheduler.max_epochs ({scheduler.max_epochs})")
    return scheduler


def _fixed(src: str, fixed: dict[str, Any], scheduler: Scheduler) -> dict[str, Any]:
    """Validate fixed values through TrainConfig itself, so they are cast exactly as a config."""
    if "epochs" in fixed:
        raise UserError(f"{src}: key 'fixed.epochs': set scheduler.max_epochs (or --max-epochs) "
                        "instead; it is ASHA's max_t and every trial's epoch budget")
    try:
        cfg = TrainConfig.from_dict(trial_values(fixed, scheduler, {}))
    except UserError as e:
        raise UserError(f"{src}: fixed: {e}") from None
    return {name: getattr(cfg, name) for name in fixed}


def _param(src: str, name: str, spec: Any, fixed: dict[str, Any]) -> Param:
    where = f"{src}: key 'search.{name}'"
    if name not in field_names():
        raise UserError(f"{src}: search: {unknown_key_message(name)}")
    if name in ("data", "val_fraction", "epochs", "metric"):
        # The driver splits the data once, so every trial is ranked on the same val set.
        raise UserError(f"{where} cannot be searched: it is fixed for the whole search "
                        "(--data, fixed.val_fraction, scheduler.max_epochs, metric)")
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping with 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_KEYS:
        raise UserError(f"{where}: 'type' must be float, int or categorical, got {kind!r}")
    for key in spec:
        if key not in PARAM_KEYS[kind]:
            raise UserError(f"{where}: unknown key '{key}' for type {kind}; allowed: "
                            f"{', '.join(sorted(PARAM_KEYS[kind]))}")
    when = _when(src, name, spec.get("when", {}))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: 'choices' must be a non-empty list")
        cast = [cast_value(name, c, where) for c in choices]
        return Param(name, optuna.distributions.CategoricalDistribution(cast), when)
    tp = field_type(name)
    wanted = {"float": (float,), "int": (int,)}[kind]
    if tp not in wanted:
        raise UserError(f"{where}: type {kind} does not fit the config key, which is "
                        f"{getattr(tp, '__name__', 'a choice')}; use type "
                        f"{ {float: 'float', int: 'int'}.get(tp, 'categorical') }")
    bounds = []
    for key in ("low", "high"):
        if key not in spec:
            raise UserError(f"{where}: '{key}' is required for type {kind}")
        bounds.append(cast_value(name, spec[key], f"{src}: key 'search.{name}.{key}'"))
    low, high = bounds
    if low >= high:
        raise UserError(f"{where}: low ({low:g}) must be < high ({high:g})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: 'log' must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: log scale needs low > 0, got {low:g}")
    step = (cast_value(name, spec["step"], f"{src}: key 'search.{name}.step'", check_range=False)
            if "step" in spec else None)
    if step is not None and (step <= 0 or log):
        raise UserError(f"{where}: 'step' must be > 0 and cannot be combined with log")
    if kind == "float":
        return Param(name, optuna.distributions.FloatDistribution(low, high, log=log, step=step),
                     when)
    return Param(name, optuna.distributions.IntDistribution(low, high, log=log, step=step or 1),
                 when)


def _when(src: str, name: str, when: Any) -> dict[str, tuple[Any, ...]]:
    out = {}
    for key, allowed in _mapping(src, f"search.{name}.when", when).items():
        if not isinstance(allowed, list):
            allowed = [allowed]
        out[str(key)] = tuple(allowed)
    return out


def _order(src: str, params: list[Param]) -> list[Param]:
    """Order parameters so each comes after those its `when:` depends on."""
    by_name = {p.name: p for p in params}
    for p in params:
        for key, allowed in p.when.items():
            if key not in by_name:
                raise UserError(f"{src}: key 'search.{p.name}.when' refers to '{key}', which "
                                f"is not searched; searched keys: {', '.join(by_name)}")
            d = by_name[key].distribution
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                bad = [a for a in allowed if a not in d.choices]
                if bad:
                    raise UserError(f"{src}: key 'search.{p.name}.when.{key}': {bad[0]!r} is "
                                    f"not among its choices {list(d.choices)}")
    ordered: list[Param] = []
    visiting: set[str] = set()

    def visit(p: Param) -> None:
        if p in ordered:
            return
        if p.name in visiting:
            raise UserError(f"{src}: key 'search.{p.name}.when': conditions form a cycle")
        visiting.add(p.name)
        for key in p.when:
            visit(by_name[key])
        ordered.append(p)

    for p in params:
        visit(p)
    return ordered
