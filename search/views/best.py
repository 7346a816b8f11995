"""`resnet-hpo best`: the best trial's config as best.yaml and the command that retrains it."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import yaml

from search.rundir import BEST_FILE, TRIALS_FILE, RunDir, SearchRun, Trial
from search.views.searched_params import active_values, format_value, searched_params
from trainable.config import TrainConfig, field_names
from trainable.errors import UserError
from trainable.storage import is_uri


def trial_config(trial: Trial, source: str) -> TrainConfig:
    """The trial's full TrainConfig from its config columns (defaults for columns it lacks)."""
    values = {k: trial[k] for k in field_names() if trial.get(k) is not None}
    return TrainConfig.from_dict(values, source=f"{source} trial {trial['trial_id']}")


def still_improving_note(trial: Trial) -> str | None:
    """One line when the trial was best at the last epoch of its full budget: it may gain
    from more epochs, which the search and the retrain command would not give it."""
    budget = trial.get("epochs")
    if budget is None or trial.get("best_epoch") != budget or trial.get("epochs_run") != budget:
        return None
    return (f"note: trial {trial['trial_id']} was best at its last epoch ({budget} of "
            f"{budget}), so more epochs may help: search with --max-epochs {2 * budget}, or "
            f"retrain with --epochs {2 * budget}")


def best_trial_lines(run: SearchRun) -> list[str]:
    """The trial whose config the search hands over (SearchRun.handed_over) as the end of a
    search, `results` and `best` show it: its metric at its best epoch, whether it was
    still improving, and the searched values it used; after a confirm stage, what each
    confirmed config scored with new seeds against what the search found."""
    trial = run.handed_over
    assert trial is not None, "a run with no scored trial has nothing to hand over"
    found = (f"{run.metric} {trial['best_metric']:.4f} at epoch {trial['best_epoch']} (ran "
             f"{trial['epochs_run']} of {trial['epochs']} epochs)")
    confirm = confirmed(run)
    if confirm is None:
        lines = [f"best trial {trial['trial_id']} of {len(run.trials)}: {found}"]
    else:
        lines = confirm_lines(run, confirm)
        changed = ("" if trial["trial_id"] == run.ranked[0]["trial_id"] else
                   f"; confirming changed it from trial {run.ranked[0]['trial_id']}, the "
                   "search's best")
        lines.append(f"handed over: trial {trial['trial_id']} of {len(run.trials)}, the best "
                     f"confirmed mean{changed}; the search found {found}")
    note = still_improving_note(trial)
    if note and confirm is None:
        lines.append(note)
    values = active_values(trial, searched_params(run))
    return lines + [f"  {name}: {format_value(value)}" for name, value in values.items()]


def confirmed(run: SearchRun) -> dict[str, Any] | None:
    """search.json's record of the confirm stage (search/run/confirm.py) once it chose."""
    confirm = run.info.get("confirm") or {}
    return confirm if confirm.get("handed_over") is not None else None


def confirm_lines(run: SearchRun, confirm: dict[str, Any]) -> list[str]:
    """One line per confirmed config: its search trial's best against the mean ± standard
    error of its confirm runs' best epochs."""
    seeds = confirm["seeds"]
    lines = [f"confirm: the best {len(confirm['configs'])} configs again for "
             f"{confirm['epochs']} epochs with {len(seeds)} new seed{'s' * (len(seeds) > 1)} "
             f"each ({', '.join(map(str, seeds))}); {run.metric} found -> confirmed"]
    for config in confirm["configs"]:
        scored = [r for r in config["runs"] if r["best_metric"] is not None
                  and math.isfinite(r["best_metric"])]
        if config["mean"] is None:
            mean = "no run scored"
        elif config["stderr"] is None:
            mean = f"{config['mean']:.4f} (1 run)"
        else:
            mean = f"{config['mean']:.4f} ± {config['stderr']:.4f} ({len(scored)} runs)"
        chosen = "  <- handed over" if config["trial_id"] == confirm["handed_over"] else ""
        lines.append(f"  trial {config['trial_id']}: {config['found']:.4f} -> {mean}{chosen}")
    return lines


def retrain_epochs(trial: Trial, cfg: TrainConfig) -> int:
    """The epoch at which the trial was best; never shorter than its warmup, which
    TrainConfig requires to fit in the epochs."""
    return max(int(trial["best_epoch"]), math.ceil(cfg.warmup_epochs))


def write_best_config(run: SearchRun, cfg: TrainConfig, output: str | None) -> str:
    """Write best.yaml and return the path that `resnet-hpo train --config` can read here."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if output is not None:
        if is_uri(output):
            raise UserError(f"--output {output}: must be a local file path, since "
                            "`resnet-hpo train --config` reads a local file")
        try:
            Path(output).write_text(text)
        except OSError as e:
            raise UserError(f"--output {output}: cannot write ({e.strerror or e})") from None
        return output
    run.rundir.write_text(BEST_FILE, text)
    here = path_from_here(run.rundir, BEST_FILE)
    if here is not None:
        return here
    local = f"best-{run.name}.yaml"
    Path(local).write_text(text)
    return local


def path_from_here(rundir: RunDir, name: str) -> str | None:
    """RUN/name as the user wrote RUN when it is on this machine (a file:// URI as a path)."""
    local = rundir.local_path(name)
    if local is None:
        return None
    return str(local) if is_uri(rundir.uri) else rundir.uri_of(name)


def model_dir(run: SearchRun) -> str:
    return path_from_here(run.rundir, "best-model") or f"best-{run.name}-model"


def best_command(run_uri: str, output: str | None) -> None:
    run = SearchRun.open(run_uri)
    if not run.ranked:
        raise UserError(f"{run.rundir.uri_of(TRIALS_FILE)}: no trial has reported "
                        f"{run.metric} without failing yet; wait for the search or check its "
                        "errors with `resnet-hpo results`")
    trial = run.handed_over
    assert trial is not None
    cfg = trial_config(trial, run.rundir.uri_of(TRIALS_FILE))
    confirm = confirmed(run)
    if confirm is not None:  # confirmed at full epochs, each run kept its best epoch
        cfg = cfg.replace(epochs=confirm["epochs"])
    config_path = write_best_config(run, cfg, output)
    epochs = cfg.epochs if confirm is not None else retrain_epochs(trial, cfg)
    print("\n".join(best_trial_lines(run)))
    print(f"config: {config_path}")
    if cfg.weights not in ("imagenet", "none"):
        print(f"weights: {cfg.weights} (the search's backbone, which the config names)")
    if confirm is None and epochs != trial["best_epoch"]:
        print(f"note: --epochs {epochs}, not {trial['best_epoch']}: the warmup "
              f"({cfg.warmup_epochs:g} epochs) must fit in the epochs")
    if epochs != cfg.epochs:
        print(f"note: the cosine schedule now ends at epoch {epochs} instead of {cfg.epochs}")
    command = ["resnet-hpo", "train", "--config", config_path, "--epochs", str(epochs),
               "--output", model_dir(run)]
    print("retrain it with:")
    print(shlex.join(command))
