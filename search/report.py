"""`resnet-hpo results`: leaderboard, hyperparameter importances and plots of a search."""

from __future__ import annotations

import argparse
import io
import math
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search.best import SearchRun, Trial
from search.rundir import ENSEMBLE_FILE, EPOCHS_FILE, PLOTS_DIR
from spaces.space import Param, load_space
from trainable.config import field_names
from trainable.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_CURVES = 10  # more learning curves than this make the plot unreadable
MIN_TRIALS_FOR_IMPORTANCE = 3
LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1}


def results_command(run_uri: str, top: int) -> None:
    if top < 1:
        raise UserError(f"--top {top}: must be >= 1")
    run = SearchRun.open(run_uri)
    params = searched_params(run)
    print(summary(run))
    print()
    print(leaderboard(run, params, top))
    print()
    print(importance_text(run, params))
    if run.rundir.exists(ENSEMBLE_FILE):
        print()
        print(ensemble_text(run.rundir.read_json(ENSEMBLE_FILE)))
    written = write_plots(run, params, top)
    if written:
        print()
        print("plots: " + ", ".join(written))


# --- what was searched ---------------------------------------------------------------------

def searched_params(run: SearchRun) -> list[Param]:
    """The searched hyperparameters with their distributions from the space in search.json;
    without it, the config columns that vary, with distributions spanning their values."""
    names = run.info.get("searched") or varying_columns(run.trials)
    from_space = {p.name: p for p in space_params(run.info.get("space_text"))}
    return [from_space.get(name) or inferred_param(name, [t[name] for t in run.trials])
            for name in names if name in field_names()]


def space_params(space_text: str | None) -> list[Param]:
    if not space_text:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "space.yaml")
        path.write_text(space_text)
        try:
            return list(load_space(str(path)).params)
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
        if value is not None and param.active(values) and fits(param.distribution, value):
            values[param.name] = value
    return values


def fits(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    assert isinstance(distribution, FloatDistribution | IntDistribution)
    return bool(distribution.low <= value <= distribution.high)


# --- text ----------------------------------------------------------------------------------

def summary(run: SearchRun) -> str:
    statuses = Counter(t["status"] for t in run.trials)
    by_status = ", ".join(f"{n} {status}" for status, n in statuses.most_common())
    stopped = sum(bool(t.get("stopped_early")) for t in run.trials)
    gpu_hours = sum(t.get("gpu_hours") or 0.0 for t in run.trials)
    lines = [f"run {run.rundir.uri}: {len(run.trials)} trials ({by_status}); {stopped} stopped "
             f"early; {gpu_hours:.3f} GPU-hours in all",
             f"metric {run.metric} ({run.mode}) at each trial's best epoch"]
    failed = [t for t in run.trials if t["status"] == "ERROR"]
    lines += [f"failed: {t['trial_id']}: {t.get('error') or 'no message'}" for t in failed]
    return "\n".join(lines)


def leaderboard(run: SearchRun, params: Sequence[Param], top: int) -> str:
    shown = run.ranked[:top]
    if not shown:
        return f"no trial has reported {run.metric} yet"
    header = ["#", "trial", *(p.name for p in params), run.metric, "best ep", "epochs",
              "GPU-h", "status"]
    rows = [header]
    for rank, trial in enumerate(shown, start=1):
        values = active_values(trial, params)
        rows.append([str(rank), trial["trial_id"],
                     *(format_value(values[p.name]) if p.name in values else "-" for p in params),
                     f"{trial['best_metric']:.4f}", str(trial["best_epoch"]),
                     str(trial.get("epochs_run") or ""), f"{trial.get('gpu_hours') or 0.0:.3f}",
                     status_text(trial)])
    title = f"top {len(shown)} of {len(run.ranked)} scored trials, best first"
    return title + "\n" + align(rows)


def status_text(trial: Trial) -> str:
    if trial["status"] == "RUNNING":
        return "running"
    return "stopped early" if trial.get("stopped_early") else "done"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def align(rows: list[list[str]]) -> str:
    """Plain-text columns: text left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = [all(is_number(row[i]) or row[i] == "-" for row in rows[1:])
               for i in range(len(widths))]
    lines = ["  ".join(cell.rjust(w) if num else cell.ljust(w)
                       for cell, w, num in zip(row, widths, numeric, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines)


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def importance_text(run: SearchRun, params: Sequence[Param]) -> str:
    importances, note = importances_of(run, params)
    if note:
        return f"hyperparameter importances: {note}"
    width = max(len(name) for name in importances)
    lines = [f"hyperparameter importances (fANOVA over {len(finished_trials(run))} finished "
             "trials; conditional ones left out):"]
    lines += [f"  {name.ljust(width)}  {value:5.3f}  {'#' * round(40 * value)}"
              for name, value in importances.items()]
    return "\n".join(lines)


def finished_trials(run: SearchRun) -> list[Trial]:
    return [t for t in run.ranked if t["status"] == "TERMINATED"]


def importances_of(run: SearchRun, params: Sequence[Param]) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA over the finished trials (those ASHA stopped count at their best
    epoch); a one-line note instead when there is too little to rate."""
    if not params:
        return {}, "nothing was searched"
    trials = finished_trials(run)
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, (f"need at least {MIN_TRIALS_FOR_IMPORTANCE} finished trials, "
                    f"have {len(trials)}")
    if len({t["best_metric"] for t in trials}) < 2:
        return {}, f"every finished trial has the same {run.metric}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if run.mode == "max" else "minimize")
    distributions = {p.name: p.distribution for p in params}
    for trial in trials:
        values = active_values(trial, params)
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions={k: distributions[k] for k in values},
            value=trial["best_metric"]))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    if not importances:
        return {}, "no searched hyperparameter was used by every finished trial"
    return {name: float(value) for name, value in importances.items()}, ""


def ensemble_text(ensemble: dict[str, Any]) -> str:
    """RUN/ensemble.json in one line; its gain is over the best member, on test if it has one."""
    def score(key: str) -> str:
        value = ensemble.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    members = [m["trial_id"] if isinstance(m, dict) else str(m)
               for m in ensemble.get("members") or []]
    split = "val" if ensemble.get("test_acc") is None else "test"
    gain = ensemble.get("gain")
    gain_text = "n/a" if gain is None else f"{gain:+.4f} on {split}"
    return (f"ensemble of the top {ensemble.get('top')} ({ensemble.get('method')}: "
            f"{', '.join(members)}): val_acc {score('val_acc')}, test_acc {score('test_acc')}; "
            f"best member: val_acc {score('best_member_val_acc')}, test_acc "
            f"{score('best_member_test_acc')}; gain {gain_text}; model in "
            f"{ensemble.get('output_dir')}")


# --- plots ---------------------------------------------------------------------------------

def write_plots(run: SearchRun, params: Sequence[Param], top: int) -> list[str]:
    """Write the PNGs to RUN/plots/ and return their paths as the user named the run."""
    if not run.ranked:
        return []
    figures: dict[str, Figure] = {}
    if run.rundir.exists(EPOCHS_FILE):
        epochs = run.rundir.read_table(EPOCHS_FILE).to_pylist()
        figures["learning_curves.png"] = learning_curves(run, epochs, min(top, MAX_CURVES))
    if params:
        figures["metric_vs_params.png"] = metric_vs_params(run, params)
        figures["parallel_coordinates.png"] = parallel_coordinates(run, params)
    run.rundir.fs.create_dir(run.rundir.join(PLOTS_DIR), recursive=True)
    for name, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        with run.rundir.fs.open_output_stream(run.rundir.join(PLOTS_DIR, name)) as f:
            f.write(buffer.getvalue())
    return [run.rundir.uri_of(PLOTS_DIR, name) for name in figures]


def learning_curves(run: SearchRun, epochs: list[dict[str, Any]], count: int) -> Figure:
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys([run.metric, "val_acc", "val_loss"]))[:2]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for rank, trial in enumerate(run.ranked[:count], start=1):
        rows = sorted((e for e in epochs if e["trial_id"] == trial["trial_id"]),
                      key=lambda e: e["epoch"])
        for ax, key in zip(axes, panels, strict=True):
            xs = [e["epoch"] for e in rows if e.get(key) is not None]
            ys = [e[key] for e in rows if e.get(key) is not None]
            (line,) = ax.plot(xs, ys, marker=".", label=f"#{rank} {trial['trial_id']}")
            if key == run.metric:
                ax.plot([trial["best_epoch"]], [trial["best_metric"]], marker="*",
                        markersize=12, color=line.get_color())
    for ax, key in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch", fontsize=11)
        ax.set_ylabel(key, fontsize=11)
        ax.set_title(f"{key} per epoch" + (" (star: best epoch)" if key == run.metric else ""),
                     fontsize=12)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if key.endswith("loss"):  # a diverging first epoch would flatten the rest
            ax.set_yscale("log")
    axes[0].legend(title="rank, trial", fontsize=9)
    fig.suptitle(f"{run.name}: learning curves of the top {min(count, len(run.ranked))} trials",
                 fontsize=13)
    return fig


def metric_vs_params(run: SearchRun, params: Sequence[Param]) -> Figure:
    from matplotlib.figure import Figure

    cols = min(3, len(params))
    rows = math.ceil(len(params) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    rng = np.random.default_rng(0)
    groups = {"full budget": [t for t in run.ranked if not t.get("stopped_early")],
              "stopped early": [t for t in run.ranked if t.get("stopped_early")]}
    for ax, param in zip(axes, params, strict=False):
        for (label, trials), colour in zip(groups.items(), ("tab:blue", "tab:orange"),
                                           strict=True):
            points = [(active_values(t, params).get(param.name), t["best_metric"])
                      for t in trials]
            points = [(x, y) for x, y in points if x is not None]
            xs = [position(param.distribution, x, rng) for x, _ in points]
            ax.scatter(xs, [y for _, y in points], s=28, alpha=0.8, color=colour, label=label)
        best = active_values(run.ranked[0], params).get(param.name)
        if best is not None:
            ax.scatter([position(param.distribution, best, None)], [run.ranked[0]["best_metric"]],
                       marker="*", s=220, color="tab:red", zorder=3, label="best trial")
        style_param_axis(ax, param.distribution)
        ax.set_xlabel(param.name, fontsize=11)
        ax.set_ylabel(run.metric, fontsize=11)
        ax.grid(alpha=0.3)
    for ax in axes[len(params):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=10)
    fig.suptitle(f"{run.name}: {run.metric} at the best epoch against each searched "
                 f"hyperparameter ({len(run.ranked)} trials)", fontsize=13)
    return fig


def position(distribution: BaseDistribution, value: Any,
             rng: np.random.Generator | None) -> float:
    """x of a value: itself, or a categorical choice's index (jittered when rng is given)."""
    if isinstance(distribution, CategoricalDistribution):
        jitter = rng.uniform(-0.15, 0.15) if rng is not None else 0.0
        return distribution.choices.index(value) + jitter
    return float(value)


def style_param_axis(ax: Any, distribution: BaseDistribution) -> None:
    if isinstance(distribution, CategoricalDistribution):
        ax.set_xticks(range(len(distribution.choices)),
                      [format_value(c) for c in distribution.choices])
        ax.set_xlim(-0.5, len(distribution.choices) - 0.5)
    elif getattr(distribution, "log", False):
        ax.set_xscale("log")


def parallel_coordinates(run: SearchRun, params: Sequence[Param]) -> Figure:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    metrics = [t["best_metric"] for t in run.ranked]
    low, high = min(metrics), max(metrics)
    fig = Figure(figsize=(max(8.0, 1.15 * (len(params) + 1) + 2.5), 5.5),
                 layout="constrained")
    ax = fig.subplots()
    mappable = ScalarMappable(norm=Normalize(low, high if high > low else low + 1e-9),
                              cmap="viridis")
    # The best trials are drawn last, on top.
    for trial in reversed(run.ranked):
        values = active_values(trial, params)
        ys = [normalised(p.distribution, values.get(p.name)) for p in params]
        ys.append(0.5 if high == low else (trial["best_metric"] - low) / (high - low))
        ax.plot(range(len(ys)), ys, color=mappable.to_rgba(trial["best_metric"]), alpha=0.8,
                linewidth=1.5)
    for i, param in enumerate(params):
        ax.axvline(i, color="grey", linewidth=0.8)
        for y, text in axis_ticks(param.distribution):
            ax.text(i + 0.04, y, text, fontsize=9, va="center", bbox=LABEL_BOX)
    ax.axvline(len(params), color="grey", linewidth=0.8)
    for y, value in ((0.0, low), (1.0, high)):
        ax.text(len(params) + 0.04, y, f"{value:.4g}", fontsize=9, va="center", bbox=LABEL_BOX)
    ax.set_xticks(range(len(params) + 1), [p.name for p in params] + [run.metric],
                  rotation=30, ha="right", fontsize=10)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(params) + 0.5)
    ax.set_ylim(-0.05, 1.05)
    fig.colorbar(mappable, ax=ax, label=f"{run.metric} ({run.mode})")
    ax.set_title(f"{run.name}: parallel coordinates of {len(run.ranked)} trials (each axis "
                 "spans its search range; a gap: not used by that trial)", fontsize=12)
    return fig


def normalised(distribution: BaseDistribution, value: Any) -> float:
    """0..1 along the search range (log-scaled for log ranges); NaN breaks the line."""
    if value is None:
        return math.nan
    if isinstance(distribution, CategoricalDistribution):
        n = len(distribution.choices)
        return 0.5 if n == 1 else distribution.choices.index(value) / (n - 1)
    assert isinstance(distribution, FloatDistribution | IntDistribution)
    scale = math.log if distribution.log else float
    low, high = scale(distribution.low), scale(distribution.high)
    return 0.5 if high == low else (scale(value) - low) / (high - low)


def axis_ticks(distribution: BaseDistribution) -> list[tuple[float, str]]:
    if isinstance(distribution, CategoricalDistribution):
        return [(normalised(distribution, c), format_value(c)) for c in distribution.choices]
    assert isinstance(distribution, FloatDistribution | IntDistribution)
    return [(0.0, format_value(distribution.low)), (1.0, format_value(distribution.high))]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "results", help="leaderboard, hyperparameter importances and plots of a search",
        description="Print the best trials (at their best epoch), Optuna's fANOVA "
                    "importances, GPU-hours and early stops; write PNG plots to RUN/plots/.")
    parser.add_argument("run_dir", metavar="RUN", help="run directory of a search (STORAGE/NAME)")
    parser.add_argument("--top", type=int, default=10, metavar="K",
                        help="trials in the table and learning curves (default: 10)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    results_command(args.run_dir, args.top)
