"""The PNGs in RUN/plots/: learning curves, the metric against each searched
hyperparameter and parallel coordinates (`resnet-hpo results`), and the confusion matrices
of an ensemble and its members (`resnet-hpo ensemble`)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search.rundir import EPOCHS_FILE, PLOTS_DIR, RunDir, SearchRun
from search.views.searched_params import active_values, format_value
from spaces.space import Param

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_CURVES = 10  # more learning curves than this make the plot unreadable
MAX_ANNOTATED_CLASSES = 15  # cells of larger confusion matrices are too small for numbers
MAX_CLASS_TICKS = 20
LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1}


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
    return [write_plot(run.rundir, name, png_bytes(fig)) for name, fig in figures.items()]


def title(fig: Figure, text: str) -> None:
    """The figure's title, wrapped at its edges: a long run name or a narrow figure (one
    searched hyperparameter) would otherwise cut it off."""
    fig.suptitle(text, fontsize=13, wrap=True)


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_plot(rundir: RunDir, name: str, png: bytes) -> str:
    """Write RUN/plots/NAME; returns its path as the user named the run."""
    rundir.fs.create_dir(rundir.join(PLOTS_DIR), recursive=True)
    with rundir.fs.open_output_stream(rundir.join(PLOTS_DIR, name)) as f:
        f.write(png)
    return rundir.uri_of(PLOTS_DIR, name)


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
    title(fig, f"{run.name}: learning curves of the top {min(count, len(run.ranked))} trials")
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
    title(fig, f"{run.name}: {run.metric} at the best epoch against each searched "
          f"hyperparameter ({len(run.ranked)} trials)")
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
    title(fig, f"{run.name}: parallel coordinates of {len(run.ranked)} trials (each axis spans "
          "its search range; a gap: not used by that trial)")
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


def confusion_matrices(panels: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str],
                       heading: str) -> Figure:
    """One row-normalised confusion matrix per panel (true class down, predicted across),
    each cell labelled with its percentage where the classes are few enough to read."""
    from matplotlib.figure import Figure

    classes = len(class_names)
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols + 1.2, 4.3 * rows + 0.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    every = math.ceil(classes / MAX_CLASS_TICKS)
    ticks = list(range(0, classes, every))
    long_names = max(len(name) for name in class_names) > 3
    image = None
    for ax, (name, matrix) in zip(axes, panels, strict=False):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
        if classes <= MAX_ANNOTATED_CLASSES:
            for (t, p), value in np.ndenumerate(matrix):
                if value >= 0.005:
                    ax.text(p, t, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 0.5 else "black")
        ax.set_xticks(ticks, [class_names[i] for i in ticks], fontsize=8,
                      rotation=45 if long_names else 0, ha="right" if long_names else "center")
        ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=8)
        ax.set_xlabel("predicted class", fontsize=10)
        ax.set_ylabel("true class", fontsize=10)
        ax.set_title(name, fontsize=11)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:len(panels)]), shrink=0.8, fraction=0.03, pad=0.01,
                     label="share of the true class's images")
    title(fig, heading)
    return fig
