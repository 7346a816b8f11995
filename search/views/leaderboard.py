"""The text of `resnet-hpo results`: totals and the best trial, the leaderboard, fANOVA
importances and the last ensemble."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import optuna

from search.rundir import SearchRun, Trial
from search.views.best import best_trial_lines
from search.views.searched_params import active_values, format_value
from spaces.space import Param
from trainable import result_keys
from trainable.config import DEFAULT_METRIC
from trainable.ranking import study_direction

MIN_TRIALS_FOR_IMPORTANCE = 3


def summary(run: SearchRun) -> str:
    statuses = Counter(t["status"] for t in run.trials)
    by_status = ", ".join(f"{n} {status}" for status, n in statuses.most_common())
    stopped = sum(bool(t.get("stopped_early")) for t in run.trials)
    gpu_hours = sum(t.get("gpu_hours") or 0.0 for t in run.trials)
    lines = [f"run {run.rundir.uri}: {len(run.trials)} trials ({by_status}); {stopped} stopped "
             f"early; {gpu_hours:.3f} GPU-hours in all",
             f"metric {run.metric} ({run.mode}) at each trial's best epoch"]
    failed = [t for t in run.trials if t["status"] == result_keys.ERROR]
    lines += [f"failed: {t['trial_id']}: {t.get('error') or 'no message'}" for t in failed]
    return "\n".join(lines + (best_trial_lines(run) if run.ranked else []))


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
    if trial["status"] == result_keys.RUNNING:
        return "running"
    return "stopped early" if trial.get("stopped_early") else "done"


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
    return [t for t in run.ranked if t["status"] == result_keys.TERMINATED]


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
    study = optuna.create_study(direction=study_direction(run.mode))
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

    members = [m["trial_id"] for m in ensemble.get("members") or []]
    split = "val" if ensemble.get("test_acc") is None else "test"
    gain = ensemble.get("gain")
    gain_text = "n/a" if gain is None else f"{gain:+.4f} on {split}"
    metric = ensemble.get("metric", DEFAULT_METRIC)
    chosen = (f", the best {metric} of all methods" if ensemble.get("requested") == "all"
              else "")
    best = ensemble.get("best_member")
    return (f"ensemble of the top {ensemble.get('top')} ({ensemble.get('method')}{chosen}: "
            f"{', '.join(members)}): val_acc {score('val_acc')}, test_acc {score('test_acc')}; "
            f"best member{f' ({best}, by {metric})' if best else ''}: val_acc "
            f"{score('best_member_val_acc')}, test_acc "
            f"{score('best_member_test_acc')}; gain {gain_text}; model in "
            f"{ensemble.get('output_dir')}")
